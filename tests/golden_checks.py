"""Checks of glm4rt against named reference arrays from transformers (golden.npz or live).

Shared by test_golden.py (committed fixtures, no torch needed) and test_live_transformers.py
(fresh checkpoints built by transformers in the same run), and by the other tests that compare
logits with a golden or with another glm4rt path.

Tolerances are absolute (rtol 0), about twice the largest difference measured on every ISA (the
committed fixtures and 48 other seeds of each geometry, logits up to |30|): glm4rt and transformers
both compute in fp32 with their own summation orders, so they differ by fp32 rounding carried
through the layers, not by an amount proportional to each value."""
from __future__ import annotations

import numpy as np

import glm4rt

LOGITS_ATOL = 5e-5     # logits and losses: measured <= 2.4e-5 (fixtures), 4.1e-5 (other seeds)
HIDDEN_ATOL = 1.5e-5   # hidden states, |h| <= 10: measured <= 4.7e-6 (fixtures), 7.0e-6
ATTENTION_ATOL = 3e-6  # attention probabilities: measured <= 8.3e-7 (fixtures), 1.1e-6
HEADS = {"causal": glm4rt.Glm4ForCausalLM, "seqcls": glm4rt.Glm4ForSequenceClassification,
         "tokcls": glm4rt.Glm4ForTokenClassification}


def close(actual, expected, what: str = "", atol: float = LOGITS_ATOL) -> None:
    """``actual`` equals ``expected`` to ``atol`` (absolute; no relative term)."""
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0, err_msg=what)


def check_full_forward(model, g) -> None:
    """Logits, every hidden state and every attention map of an unpadded batch."""
    out = model(g["ids"], output_hidden_states=True, output_attentions=True)
    close(out.logits, g["logits"], "logits")
    n_hidden = len([k for k in g.keys() if k.startswith("hidden_states.")])
    assert len(out.hidden_states) == n_hidden == model.config.num_hidden_layers + 1
    for i, h in enumerate(out.hidden_states):
        close(h, g[f"hidden_states.{i}"], f"hidden_states[{i}]", atol=HIDDEN_ATOL)
    assert len(out.attentions) == model.config.num_hidden_layers
    for i, a in enumerate(out.attentions):
        close(a, g[f"attentions.{i}"], f"attentions[{i}]", atol=ATTENTION_ATOL)


def _valid_positions(mask: np.ndarray):
    return [np.nonzero(row)[0] for row in mask]


def check_padding(model, g) -> None:
    """Left/right padded batches match transformers at every real token."""
    for side in ("left", "right"):
        ids, mask = g[f"{side}_ids"], g[f"{side}_mask"]
        pos = g[f"{side}_pos"] if side == "left" else None
        out = model(ids, attention_mask=mask, position_ids=pos)
        ref = g[f"{side}_logits"]
        if ref.ndim == 2:  # sequence classification: one pooled row per sequence
            close(out.logits, ref, f"{side}-padded logits")
            continue
        for b, valid in enumerate(_valid_positions(mask)):
            close(out.logits[b, valid], ref[b, valid], f"{side}-padded row {b}")


def check_causal_extras(model, g) -> None:
    close(model(g["ids"], labels=g["labels"]).loss, g["loss"], "causal LM loss")
    close(model(g["ids"], position_ids=g["offset_pos"]).logits, g["offset_logits"],
          "explicit position_ids far from 0 (rotary angles)")
    close(model(g["ids"], logits_to_keep=2).logits, g["logits_keep2"], "logits_to_keep=2")
    close(model(g["ids"], logits_to_keep=np.array([0, 4, 8])).logits, g["logits_keep_idx"],
          "logits_to_keep=[0, 4, 8]")
    # Prefill 5 tokens, then one token at a time through our cache.
    ids = g["ids"]
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        steps.append(out.logits)
    close(np.concatenate(steps, axis=1), g["cache_logits"], "prefill + one-token decode logits")
    close(np.concatenate(steps, axis=1), g["logits"], "cached decode vs full forward")
    # A prefill that keeps one position (its last layer runs attention and MLP for that row only)
    # still fills the cache for every position: the decode after it is the same.
    out = model(ids[:, :5], use_cache=True, logits_to_keep=1)
    close(out.logits, g["cache_logits"][:, 4:5], "prefill with logits_to_keep=1")
    cache = out.past_key_values
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        close(out.logits, g["cache_logits"][:, t:t + 1], f"decode step {t} after a logits_to_keep=1 prefill")
    # Left padding: the last position of every row is real.
    out = model(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"], logits_to_keep=1)
    close(out.logits[:, 0], g["left_logits"][:, -1], "left-padded batch, logits_to_keep=1")


def check_seqcls_extras(model, g) -> None:
    for kind in ("single_label_classification", "multi_label_classification", "regression"):
        model.config.problem_type = kind
        labels = g["labels_" + {"single_label_classification": "single",
                                "multi_label_classification": "multi",
                                "regression": "regression"}[kind]]
        close(model(g["ids"], labels=labels).loss, g[f"loss_{kind}"], f"{kind} loss")
    model.config.problem_type = None


def check_tokcls_extras(model, g) -> None:
    close(model(g["ids"], labels=g["labels"]).loss, g["loss"], "token classification loss")


def check_all(directory: str, head: str, g, dtype: str = "float32") -> None:
    """Every golden check that applies to a checkpoint with this head. The default dtype computes
    in fp32 as transformers did (bf16 checkpoints widened exactly); bf16 compute is checked against
    the NumPy reference in test_numpy_reference.py."""
    model = HEADS[head].from_pretrained(directory, dtype=dtype)
    check_full_forward(model, g)
    check_padding(model, g)
    {"causal": check_causal_extras, "seqcls": check_seqcls_extras,
     "tokcls": check_tokcls_extras}[head](model, g)
