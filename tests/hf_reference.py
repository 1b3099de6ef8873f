"""Reference outputs from transformers (the oracle): builds tiny random GLM-4 checkpoints with
EVERY parameter randomised, saves them as transformers does, reloads them in fp32 with eager
attention and records named outputs. Used by make_fixtures.py (committed goldens) and by the
live comparison tests. Imports torch/transformers; nothing in glm4rt does."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import transformers
from transformers import (DynamicCache, Glm4Config, Glm4ForCausalLM, Glm4ForSequenceClassification,
                          Glm4ForTokenClassification)

PAD = 0  # pad_token_id of the tiny models

# name -> geometry and storage options. Together: GQA ratios 1, 2, 8 (and 2 in the heads), head_dim
# 16/24/8 (never 128), partial_rotary_factor 0.5 and 0.75, attention_bias False, tied embeddings,
# both config.json dialects, fp32 and bf16 weights, single-file and sharded checkpoints.
GEOMETRIES = {
    "gqa1_official": dict(
        config=dict(vocab_size=211, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5,
                    partial_rotary_factor=0.5, rope_theta=10000.0),
        head="causal", dialect="official", dtype="float32", shard=False),
    "gqa2_nobias_tied_v5": dict(
        config=dict(vocab_size=173, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    partial_rotary_factor=0.75, rope_theta=500.0, attention_bias=False,
                    tie_word_embeddings=True),
        head="causal", dialect="v5", dtype="float32", shard=False),
    "gqa8_bf16_sharded": dict(
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
                    partial_rotary_factor=0.5, rope_theta=2500.0),
        head="causal", dialect="official", dtype="bfloat16", shard=True),
    "generation": dict(
        config=dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                    partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=160),
        head="causal", dialect="v5", dtype="bfloat16", shard=False, generate=True),
    "seqcls": dict(
        config=dict(vocab_size=150, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                    num_labels=3),
        head="seqcls", dialect="v5", dtype="float32", shard=False),
    "seqcls_regression": dict(
        config=dict(vocab_size=120, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                    num_labels=1),
        head="seqcls", dialect="official", dtype="float32", shard=False),
    "tokcls": dict(
        config=dict(vocab_size=150, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                    num_labels=5),
        head="tokcls", dialect="v5", dtype="float32", shard=False),
}
HEAD_CLASSES = {"causal": Glm4ForCausalLM, "seqcls": Glm4ForSequenceClassification,
                "tokcls": Glm4ForTokenClassification}


def _hf_config(spec: dict) -> Glm4Config:
    c = dict(spec["config"])
    rope = {"rope_type": "default", "rope_theta": c.pop("rope_theta", 10000.0),
            "partial_rotary_factor": c.pop("partial_rotary_factor", 0.5)}
    c.setdefault("max_position_embeddings", 64)
    return Glm4Config(**c, rope_parameters=rope, pad_token_id=PAD, eos_token_id=[1, 2])


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, at a scale that keeps activations O(1) and logits O(1-10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith(".bias"):
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            elif name.startswith(("lm_head", "score")):
                p.copy_(r * 3.0 / math.sqrt(p.shape[1]))
            else:
                p.copy_(r / math.sqrt(p.shape[1]))


def to_official_dialect(directory: str) -> None:
    """Rewrite config.json as the official GLM-4-0414 checkpoints have it: top-level rope_theta,
    partial_rotary_factor and torch_dtype, no rope_parameters."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.51.3"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def build_checkpoint(directory: str, name: str, seed: int = 0) -> None:
    """Save a random checkpoint of geometry ``name`` into ``directory`` as transformers does."""
    spec = GEOMETRIES[name]
    torch.manual_seed(seed)
    model = HEAD_CLASSES[spec["head"]](_hf_config(spec)).eval()
    randomise(model, seed)
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="40KB" if spec["shard"] else "5GB")
    if spec["dialect"] == "official":
        to_official_dialect(directory)


def load_reference(directory: str, head: str) -> torch.nn.Module:
    """The checkpoint as transformers loads it: fp32 (bf16 weights widened exactly), eager attention."""
    return HEAD_CLASSES[head].from_pretrained(directory, dtype=torch.float32,
                                              attn_implementation="eager").eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().copy()


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], left: bool):
    """Rows of the given lengths padded with PAD to the longest; returns (ids, mask, rows)."""
    T = max(lengths)
    ids = np.full((len(lengths), T), PAD, dtype=np.int64)
    mask = np.zeros((len(lengths), T), dtype=np.int64)
    rows = [rng.integers(1, vocab, size=n) for n in lengths]
    for b, row in enumerate(rows):
        sl = slice(T - len(row), T) if left else slice(0, len(row))
        ids[b, sl] = row
        mask[b, sl] = 1
    return ids, mask


def goldens(directory: str, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Named reference arrays for the checkpoint in ``directory``."""
    spec = GEOMETRIES[name]
    head = spec["head"]
    model = load_reference(directory, head)
    cfg = model.config
    rng = np.random.default_rng(1000 + seed)
    out: dict[str, np.ndarray] = {}
    ids = rng.integers(1, cfg.vocab_size, size=(2, 9))
    out["ids"] = ids
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        full = model(t_ids, output_hidden_states=True, output_attentions=True)
        out["logits"] = _np(full.logits)
        for i, h in enumerate(full.hidden_states):
            out[f"hidden_states.{i}"] = _np(h)
        for i, a in enumerate(full.attentions):
            out[f"attentions.{i}"] = _np(a)

        # Padded batches (lengths 9, 6, 3): left padding with generate()-style positions, and right.
        for side in ("left", "right"):
            p_ids, p_mask = padded_batch(rng, cfg.vocab_size, [9, 6, 3], left=side == "left")
            kwargs = {}
            if side == "left":
                pos = np.clip(np.cumsum(p_mask, axis=1) - 1, 0, None)
                kwargs["position_ids"] = torch.from_numpy(pos)
                out[f"{side}_pos"] = pos
            res = model(torch.from_numpy(p_ids), attention_mask=torch.from_numpy(p_mask), **kwargs)
            out[f"{side}_ids"], out[f"{side}_mask"], out[f"{side}_logits"] = p_ids, p_mask, _np(res.logits)

        if head == "causal":
            labels = ids.copy()
            labels[0, 3] = -100
            labels[1, 0] = -100
            out["labels"] = labels
            out["loss"] = np.array(model(t_ids, labels=torch.from_numpy(labels)).loss.item())
            offset = np.arange(9)[None].repeat(2, 0) + np.array([[40], [53]])
            out["offset_pos"] = offset
            out["offset_logits"] = _np(model(t_ids, position_ids=torch.from_numpy(offset)).logits)
            out["logits_keep2"] = _np(model(t_ids, logits_to_keep=2).logits)
            out["logits_keep_idx"] = _np(model(t_ids, logits_to_keep=torch.tensor([0, 4, 8])).logits)
            # KV cache: prefill 5 tokens, then one token at a time.
            cache = DynamicCache(config=cfg)
            steps = [model(t_ids[:, :5], cache=cache, use_cache=True).logits]
            for t in range(5, 9):
                steps.append(model(t_ids[:, t:t + 1], cache=cache, use_cache=True).logits)
            out["cache_logits"] = _np(torch.cat(steps, dim=1))
        elif head == "seqcls":
            # Right-padded rows exercise pooling at the last non-pad token.
            labels_int = rng.integers(0, cfg.num_labels, size=2)
            labels_multi = (rng.random((2, cfg.num_labels)) > 0.5).astype(np.float32)
            labels_reg = rng.standard_normal((2, cfg.num_labels)).astype(np.float32)
            out["labels_single"], out["labels_multi"], out["labels_regression"] = labels_int, labels_multi, labels_reg
            for kind, labels in (("single_label_classification", labels_int),
                                 ("multi_label_classification", labels_multi),
                                 ("regression", labels_reg)):
                model.config.problem_type = kind
                out[f"loss_{kind}"] = np.array(model(t_ids, labels=torch.from_numpy(labels)).loss.item())
            model.config.problem_type = None
        else:
            labels = rng.integers(0, cfg.num_labels, size=ids.shape)
            labels[0, 2] = -100
            out["labels"] = labels
            out["loss"] = np.array(model(t_ids, labels=torch.from_numpy(labels)).loss.item())
        if spec.get("generate"):
            out.update(generation_goldens(model, rng))
    out["transformers_version"] = np.array(transformers.__version__)
    return out


def generation_goldens(model, rng: np.random.Generator, new: int = 64) -> dict[str, np.ndarray]:
    """transformers' greedy ``generate`` outputs: a single prompt and a left-padded batch that run
    the full ``new`` tokens without meeting eos, the same with a repetition penalty, and a batch
    where one row stops early on an eos id (later tokens of that row become pad)."""
    vocab, eos = model.config.vocab_size, [1, 2]
    out = {}

    def gen(ids, mask=None, **kw):
        kw.setdefault("eos_token_id", eos)
        res = model.generate(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                             max_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)
        return res.numpy()

    for _ in range(100):  # a prompt whose greedy continuation never hits eos
        prompt = rng.integers(3, vocab, size=(1, 11))
        res = gen(prompt)
        if res.shape[1] == 11 + new and not np.isin(res[0, 11:], eos).any():
            break
    else:
        raise RuntimeError("no eos-free prompt found")
    out["gen_prompt"], out["gen_greedy"] = prompt, res
    out["gen_rep"] = gen(prompt, repetition_penalty=1.3, eos_token_id=[])

    for _ in range(100):
        ids, mask = padded_batch(rng, vocab, [11, 7, 4], left=True)
        ids[mask == 1] = np.maximum(ids[mask == 1], 3)
        res = gen(ids, mask)
        if res.shape[1] == 11 + new and not np.isin(res[:, 11:], eos).any():
            break
    else:
        raise RuntimeError("no eos-free batch found")
    out["gen_batch_ids"], out["gen_batch_mask"], out["gen_batch_out"] = ids, mask, res
    # Early stop: make row 0's 6th new token an eos id; rows 1 and 2 go on (or stop on it too).
    stop_id = int(res[0, 11 + 5])
    out["gen_stop_id"] = np.array(stop_id)
    out["gen_stop_out"] = gen(ids, mask, eos_token_id=[stop_id])
    return out
