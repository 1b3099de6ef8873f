"""Forward-pass inputs on the gqa1_official fixture: validation errors that name the problem,
inputs_embeds, legacy caches, cache_position rewinds, output forms, padding and thread counts."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import glm4rt
from glm4rt import Glm4Cache, Glm4ForCausalLM
from conftest import fixture_dir, golden
from golden_checks import close

NAME = "gqa1_official"


@pytest.fixture(scope="module")
def model():
    return Glm4ForCausalLM.from_pretrained(fixture_dir(NAME))


@pytest.fixture(scope="module")
def g():
    return golden(NAME)


@pytest.fixture(scope="module")
def full_logits(model, g):
    logits = model(g["ids"], use_cache=False).logits
    close(logits, g["logits"], "the reference itself is right")
    return logits


def test_fixture_geometry(model):
    c = model.config
    assert (c.vocab_size, c.max_position_embeddings, c.num_hidden_layers) == (211, 64, 2)
    assert (c.num_key_value_heads, c.head_dim) == (4, 16)


# ---- input_ids / inputs_embeds validation -----------------------------------------------------

def test_token_id_equal_to_vocab_size(model):
    with pytest.raises(ValueError, match=r"token id 211 .*vocab_size 211"):
        model(np.array([[1, 2, 211, 3]]))


def test_negative_token_id(model):
    with pytest.raises(ValueError, match=r"token id -3 .*vocab_size 211"):
        model(np.array([[1, -3, 2]]))


def test_largest_valid_token_id(model):
    out = model(np.array([[0, 210]]))
    assert out.logits.shape == (1, 2, 211) and np.isfinite(out.logits).all()


def test_float_input_ids(model, g):
    with pytest.raises(ValueError, match="input_ids must be integers.*float"):
        model(g["ids"].astype(np.float32))


def test_one_dimensional_input_ids(model, g):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\].*\(9,\)"):
        model(g["ids"][0])


def test_both_ids_and_embeds(model, g):
    embeds = model.model.embed_tokens[g["ids"]].astype(np.float32)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(g["ids"], inputs_embeds=embeds)


def test_neither_ids_nor_embeds(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_inputs_embeds_equal_ids(model, g, full_logits):
    embeds = model.model.embed_tokens[g["ids"]].astype(np.float32)
    assert embeds.shape == (2, 9, 48)
    out = model(inputs_embeds=embeds)
    close(out.logits, full_logits, "inputs_embeds vs input_ids", atol=0)


# ---- max_position_embeddings ------------------------------------------------------------------

def _long_ids(n):
    return (np.arange(n, dtype=np.int64) * 7 % 211)[None]


def test_sequence_longer_than_max_positions(model):
    assert model(_long_ids(64)).logits.shape == (1, 64, 211)  # exactly the limit is fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(_long_ids(65))


def test_cache_growing_past_max_positions(model):
    ids = _long_ids(65)
    out = model(ids[:, :60], use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 60
    with pytest.raises(ValueError, match=r"65 .*max_position_embeddings 64"):
        model(ids[:, 60:65], past_key_values=cache)
    # Four more (64 in all) still fit.
    out = model(ids[:, 60:64], past_key_values=cache, use_cache=True)
    assert out.past_key_values.get_seq_length() == 64


# ---- shapes of mask, positions, legacy cache ---------------------------------------------------

def test_attention_mask_wrong_shape(model, g):
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D.*\[2, 9\].*\(2, 8\)"):
        model(g["ids"], attention_mask=np.ones((2, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model(g["ids"], attention_mask=np.ones((2, 1, 9, 9), dtype=np.int64))


def test_position_ids_wrong_shape(model, g):
    with pytest.raises(ValueError, match=r"position_ids must be \[2, 9\] or \[1, 9\].*\(2, 10\)"):
        model(g["ids"], position_ids=np.arange(10)[None].repeat(2, 0))
    with pytest.raises(ValueError, match="position_ids"):
        model(g["ids"], position_ids=np.arange(9)[None].repeat(3, 0))


def test_legacy_cache_wrong_shapes(model, g):
    ids = g["ids"]
    legacy = model(ids[:, :5], use_cache=True).past_key_values.to_legacy_cache()
    k, v = legacy[0]
    bad_head_dim = ((k[..., :8], v[..., :8]), legacy[1])
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids[:, 5:], past_key_values=bad_head_dim)
    bad_heads = ((k[:, :2], v[:, :2]), legacy[1])
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids[:, 5:], past_key_values=bad_heads)
    with pytest.raises(ValueError, match="past_key_values has 1 layers"):
        model(ids[:, 5:], past_key_values=legacy[:1])
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids[:, 5:], past_key_values=((k[0], v[0]), (k[0], v[0])))  # 3-D
    mismatched = ((k, v[:, :, :4]), legacy[1])  # value shorter than key
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids[:, 5:], past_key_values=mismatched)


# ---- caches ------------------------------------------------------------------------------------

def test_legacy_cache_round_trip(model, g, full_logits):
    ids = g["ids"]
    out = model(ids[:, :5], use_cache=True)
    assert isinstance(out.past_key_values, Glm4Cache)
    legacy = out.past_key_values.to_legacy_cache()
    assert isinstance(legacy, tuple) and len(legacy) == 2
    for k, v in legacy:
        assert k.shape == v.shape == (2, 4, 5, 16)
        assert k.dtype == v.dtype == np.float32
        assert np.abs(k).max() > 0 and np.abs(v).max() > 0
    close(out.logits, full_logits[:, :5], "prefill logits")

    rest = model(ids[:, 5:], past_key_values=legacy, use_cache=True)
    close(rest.logits, full_logits[:, 5:], "continuation from a legacy cache")
    assert rest.past_key_values.get_seq_length() == 9
    # The legacy tuples are inputs, not updated in place.
    assert legacy[0][0].shape == (2, 4, 5, 16)

    via_cache_kw = model(ids[:, 5:], cache=legacy)
    close(via_cache_kw.logits, full_logits[:, 5:], "cache= keyword")
    np.testing.assert_array_equal(via_cache_kw.logits, rest.logits)


def test_cache_and_past_key_values_together(model, g):
    legacy = model(g["ids"][:, :5], use_cache=True).past_key_values.to_legacy_cache()
    with pytest.raises(ValueError, match="either past_key_values or cache"):
        model(g["ids"][:, 5:], past_key_values=legacy, cache=legacy)


def test_cache_position_rewinds(model, g, full_logits):
    ids = g["ids"]
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 9
    again = model(ids[:, 7:], past_key_values=cache, cache_position=np.array([7, 8]), use_cache=True)
    assert again.logits.shape == (2, 2, 211)
    close(again.logits, full_logits[:, 7:], "rewound positions 7, 8")
    assert again.past_key_values.get_seq_length() == 9
    # Rewind further and feed different tokens: the result is that of the edited sequence.
    edited = ids.copy()
    edited[:, 3:] = ids[:, ::-1][:, 3:]
    rewound = model(edited[:, 3:], past_key_values=cache, cache_position=np.arange(3, 9))
    close(rewound.logits, model(edited, use_cache=False).logits[:, 3:], "rewound to 3, new tokens")


# ---- output forms ------------------------------------------------------------------------------

def test_return_dict_false(model, g, full_logits):
    out = model(g["ids"], return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and len(out) == 1
    close(out[0], full_logits, "tuple[0]", atol=0)
    with_cache = model(g["ids"], return_dict=False)
    assert isinstance(with_cache, tuple) and len(with_cache) == 2
    close(with_cache[0], full_logits, "tuple[0] with cache", atol=0)
    assert isinstance(with_cache[1], Glm4Cache)


def test_output_indexing(model, g, full_logits):
    out = model(g["ids"])
    close(out["logits"], full_logits, 'out["logits"]', atol=0)
    close(out[0], full_logits, "out[0]", atol=0)
    assert out["logits"] is out.logits is out[0]
    with pytest.raises(KeyError):
        out["loss"]  # None fields are absent, as in transformers


def test_use_cache_false(model, g):
    assert model(g["ids"], use_cache=False).past_key_values is None
    assert isinstance(model(g["ids"], use_cache=True).past_key_values, Glm4Cache)


# ---- padding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_unpadded(model, g, side):
    ids, mask = g[f"{side}_ids"], g[f"{side}_mask"]
    if side == "left":
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        np.testing.assert_array_equal(pos, g["left_pos"])
    else:
        pos = None
    assert (mask == 0).any()  # the batch really is padded
    out = model(ids, attention_mask=mask, position_ids=pos)
    for b in range(ids.shape[0]):
        valid = np.nonzero(mask[b])[0]
        alone = model(ids[b:b + 1, valid]).logits[0]
        close(out.logits[b, valid], alone, f"{side}-padded row {b} vs alone")
        close(out.logits[b, valid], g[f"{side}_logits"][b, valid], f"{side}-padded row {b} vs golden")


# ---- threads -----------------------------------------------------------------------------------

def test_thread_count_does_not_change_results(model, g):
    before = glm4rt.get_num_threads()
    try:
        glm4rt.set_num_threads(1)
        assert glm4rt.get_num_threads() == 1
        one = model(g["ids"]).logits
        glm4rt.set_num_threads(2)
        assert glm4rt.get_num_threads() == 2
        two = model(g["ids"]).logits
    finally:
        glm4rt.set_num_threads(before)
    assert glm4rt.get_num_threads() == before
    np.testing.assert_array_equal(one, two)
    close(one, g["logits"])


def test_set_num_threads_1000_is_refused_not_fatal():
    # issue 18: 1000 threads made libgomp's thread creation fail, and it exits the process
    before = glm4rt.get_num_threads()
    limit = glm4rt.ops.max_num_threads()
    assert limit == 4 * os.cpu_count()
    with pytest.raises(ValueError, match=rf"number of threads must be <= {limit} \(4 per logical CPU\), got 1000"):
        glm4rt.set_num_threads(1000)
    with pytest.raises(ValueError, match=r"must be <= .* got 10000000000000000000000"):
        glm4rt.set_num_threads(10**22)  # no overflow into C++'s int
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        glm4rt.set_num_threads(0)
    assert glm4rt.get_num_threads() == before
    try:
        glm4rt.set_num_threads(np.int64(limit))  # the limit itself is allowed
        assert glm4rt.get_num_threads() == limit
    finally:
        glm4rt.set_num_threads(before)


@pytest.mark.parametrize("bad", [2.5, 2.0, "4", True, b"2"])
def test_set_num_threads_takes_only_integers(bad):
    with pytest.raises(TypeError, match=rf"number of threads must be an integer, got {re.escape(repr(bad))}"):
        glm4rt.set_num_threads(bad)


@pytest.mark.parametrize("value, message", [
    ("1000", "GLM4RT_NUM_THREADS=1000: number of threads must be <= "),
    ("0", "GLM4RT_NUM_THREADS=0: number of threads must be >= 1, got 0"),
    ("two", "GLM4RT_NUM_THREADS must be an integer, got 'two'"),
])
def test_glm4rt_num_threads_env_is_checked(tmp_path, value, message):
    r = subprocess.run([sys.executable, "-c", "import glm4rt"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GLM4RT_NUM_THREADS": value}, cwd=tmp_path)  # the installed glm4rt
    assert r.returncode == 1 and message in r.stderr


def _rows_seen_by_last_mlp(model, monkeypatch) -> list[int]:
    """Record the number of rows the last layer's down_proj multiplies in each call."""
    rows = []
    mlp = model.model.layers[-1].mlp
    down = mlp.down_proj

    def recording(x, *args, **kwargs):
        rows.append(x.shape[0])
        return down(x, *args, **kwargs)

    monkeypatch.setattr(mlp, "down_proj", recording)
    return rows


def test_logits_to_keep_prunes_the_last_layer(model, g, full_logits, monkeypatch):
    """With logits_to_keep, the last layer's MLP runs on the kept rows only (the rest of the prompt's
    last-layer work feeds nothing returned) and the kept logits equal the full forward's."""
    rows = _rows_seen_by_last_mlp(model, monkeypatch)
    B, T = g["ids"].shape
    close(model(g["ids"], logits_to_keep=1).logits, full_logits[:, -1:], "keep 1")
    close(model(g["ids"], logits_to_keep=np.array([1, 3])).logits, full_logits[:, [1, 3]], "keep [1, 3]")
    close(model(g["ids"], logits_to_keep=np.array([-1])).logits, full_logits[:, -1:], "keep [-1]")
    assert rows == [B, 2 * B, B]
    rows.clear()
    # Indices out of order or repeated, every position, hidden states asked for: the full last layer.
    close(model(g["ids"], logits_to_keep=np.array([3, 1, 3])).logits, full_logits[:, [3, 1, 3]], "keep [3, 1, 3]")
    close(model(g["ids"], logits_to_keep=T + 5).logits, full_logits, "keep more than T")
    out = model(g["ids"], logits_to_keep=1, output_hidden_states=True)
    close(out.logits, full_logits[:, -1:], "keep 1 with hidden states")
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (B, T, model.config.hidden_size)
    assert rows == [B * T] * 3


def test_logits_to_keep_bad_values(model, g):
    T = g["ids"].shape[1]
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(g["ids"], logits_to_keep=-1)
    with pytest.raises(ValueError, match=rf"logits_to_keep indices must be in \[-{T}, {T}\)"):
        model(g["ids"], logits_to_keep=np.array([T]))
    with pytest.raises(ValueError, match="logits_to_keep indices must be integers"):
        model(g["ids"], logits_to_keep=np.array([0.5]))


def test_sequence_classification_prunes_the_last_layer(monkeypatch):
    """The sequence classifier pools one position per row: the last layer computes the distinct
    pooled positions only, and the pooled logits still equal transformers' (padded batches)."""
    from glm4rt import Glm4ForSequenceClassification
    g = golden("seqcls")
    model = Glm4ForSequenceClassification.from_pretrained(fixture_dir("seqcls"))
    rows = _rows_seen_by_last_mlp(model, monkeypatch)
    for side in ("left", "right"):
        ids, mask = g[f"{side}_ids"], g[f"{side}_mask"]
        pos = g[f"{side}_pos"] if side == "left" else None
        out = model(ids, attention_mask=mask, position_ids=pos)
        close(out.logits, g[f"{side}_logits"], side)
        pooled = (np.arange(ids.shape[1]) * (ids != model.config.pad_token_id)).argmax(-1)
        assert rows[-1] == ids.shape[0] * np.unique(pooled).size < ids.size, (side, rows)


def test_empty_batch_and_fractional_cache_positions_are_refused():
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"))
    with pytest.raises(ValueError, match=r"the input is empty: batch 0, sequence 3"):
        model(np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match=r"non-empty \[batch, seq\] integer array"):
        model.generate(np.zeros((0, 3), np.int64), max_new_tokens=1)
    for bad in ([0.9, 1.9], np.array(["0", "1"])):
        with pytest.raises(ValueError, match="cache_position must be integers"):
            model(np.array([[1, 2]]), cache_position=bad)


def test_quant_linear_checks_in_features():
    # 33 .. 64 columns pack into the same two blocks of 32: the packed size cannot tell them apart.
    from glm4rt.quant import QuantLinear, quantize_weight

    for fmt in ("int8", "int4"):
        lin = QuantLinear(quantize_weight(np.ones((16, 64), np.float32), fmt), fmt, 16, 64)
        for k in (33, 63, 65):
            with pytest.raises(ValueError, match=rf"x: dimension 1 must be 64 \(in_features\), got shape \(2, {k}\)"):
                lin(np.ones((2, k), np.float32))
        np.testing.assert_allclose(lin(np.ones((2, 64), np.float32)), 64.0, rtol=1e-2)
