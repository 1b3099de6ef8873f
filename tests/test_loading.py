"""from_pretrained: weight formats (bf16 kept memory-mapped, fp16, sharded), hub ids from the local
cache, config overrides, new heads, and a clear error for every broken checkpoint or setting.

Every test that damages a checkpoint works on a copy under tmp_path; the committed fixtures are
never touched."""
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import glm4rt
from glm4rt import bf16
from glm4rt import (CheckpointError, ConfigError, Glm4ForCausalLM, Glm4ForSequenceClassification,
                    Glm4ForTokenClassification, Glm4Model)
from conftest import TESTS, fixture_dir, golden
from golden_checks import LOGITS_ATOL, close
from helpers import by_offset

CAUSAL = "gqa1_official"
BF16 = "gqa8_bf16_sharded"


def copy_fixture(name, tmp_path, dest="ckpt"):
    target = tmp_path / dest
    shutil.copytree(fixture_dir(name), target)
    return target


# ---- raw safetensors access (independent of glm4rt; handles bf16, which NumPy lacks) -----------

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_raw(path):
    """{name: (safetensors dtype, shape, bytes)} of one safetensors file, in header order."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {name: (e["dtype"], tuple(e["shape"]), data[e["data_offsets"][0]:e["data_offsets"][1]])
            for name, e in header.items()}


def write_raw(path, tensors):
    """Write {name: (dtype, shape, bytes)} as one safetensors file."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, raw in tensors.values():
            f.write(raw)


def raw_array(entry):
    dtype, shape, raw = entry
    return np.frombuffer(raw, dtype=_ST_DTYPES[dtype]).reshape(shape)


def bf16_shard_tensors():
    """Every tensor of the sharded bf16 fixture, read straight from its shards."""
    directory = fixture_dir(BF16)
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
        out.update(read_raw(os.path.join(directory, shard)))
    return out


def memmap_base(a):
    """The file-backed numpy.memmap that ``a`` is a view of, or None when ``a`` owns (a copy of)
    its data. (A copy of a memmap slice is still of class np.memmap, so walk ``.base`` to the root
    array and require that it is backed by an ``mmap.mmap``.)"""
    while isinstance(a.base, np.ndarray):
        a = a.base
    if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap):
        return a
    return None


def matrices(model):
    """A sample of the causal LM's matrix weights: (name, array)."""
    layer = model.model.layers[0]
    return [("model.layers.0.self_attn.q_proj.weight", layer.self_attn.qkv_proj.parts["q_proj"].weight),
            ("model.layers.0.self_attn.o_proj.weight", layer.self_attn.o_proj.weight),
            ("model.layers.0.mlp.gate_up_proj.weight", layer.mlp.gate_up_proj.weight),
            ("model.layers.1.mlp.down_proj.weight", model.model.layers[1].mlp.down_proj.weight),
            ("lm_head.weight", model.lm_head.weight),
            ("model.embed_tokens.weight", model.model.embed_tokens)]


def small_vectors(model):
    """Norm weights and biases: (name, array)."""
    layer = model.model.layers[0]
    return [("model.layers.0.input_layernorm.weight", layer.input_layernorm),
            ("model.layers.0.post_self_attn_layernorm.weight", layer.post_self_attn_layernorm),
            ("model.layers.0.post_attention_layernorm.weight", layer.post_attention_layernorm),
            ("model.layers.0.post_mlp_layernorm.weight", layer.post_mlp_layernorm),
            ("model.norm.weight", model.model.norm),
            ("model.layers.0.self_attn.q_proj.bias", layer.self_attn.qkv_proj.parts["q_proj"].bias),
            ("model.layers.0.self_attn.k_proj.bias", layer.self_attn.qkv_proj.parts["k_proj"].bias)]


# ---- weight formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_bf16_checkpoint_keeps_bf16_matrices_memory_mapped(dtype):
    model = Glm4ForCausalLM.from_pretrained(fixture_dir(BF16), dtype=dtype)
    stored = bf16_shard_tensors()
    for name, w in matrices(model):
        assert w.dtype == np.uint16, name
        mm = memmap_base(w)
        assert mm is not None, f"{name} was copied instead of memory-mapped"
        assert np.shares_memory(w, mm), name
        assert os.path.dirname(os.path.abspath(mm.filename)) == os.path.abspath(fixture_dir(BF16)), name
        assert mm.filename.endswith(".safetensors"), name
        assert not w.flags.writeable, name  # read-only map: the file cannot be altered through it
        assert stored[name][0] == "BF16"
        np.testing.assert_array_equal(w, raw_array(stored[name]), err_msg=name)
    for name, v in small_vectors(model):
        assert v.dtype == np.float32, name
        np.testing.assert_array_equal(v, bf16.to_f32(raw_array(stored[name])), err_msg=name)
    g = golden(BF16)  # bf16 compute (activations rounded to bf16): within bf16 rounding
    close(model(g["ids"]).logits, g["logits"], f"logits with dtype={dtype}", atol=1e-2 * np.abs(g["logits"]).max())


def test_bf16_checkpoint_as_float32():
    model = Glm4ForCausalLM.from_pretrained(fixture_dir(BF16), dtype="float32")
    stored = bf16_shard_tensors()
    for name, w in matrices(model) + small_vectors(model):
        assert w.dtype == np.float32, name
        np.testing.assert_array_equal(w, bf16.to_f32(raw_array(stored[name])), err_msg=name)  # exact
    g = golden(BF16)
    close(model(g["ids"]).logits, g["logits"], "logits with dtype=float32")


def test_bf16_dtypes_agree_with_each_other():
    g = golden(BF16)
    logits = {dt: Glm4ForCausalLM.from_pretrained(fixture_dir(BF16), dtype=dt)(g["ids"]).logits
              for dt in ("auto", "bfloat16", "float32")}
    np.testing.assert_array_equal(logits["auto"], logits["bfloat16"])  # auto keeps bf16 as bf16
    close(logits["float32"], g["logits"], "float32 vs transformers")     # widened: exact fp32 compute
    scale = np.abs(g["logits"]).max()
    close(logits["bfloat16"], logits["float32"], "bfloat16 vs float32", atol=1e-2 * scale)


def test_fp32_checkpoint_matrices_are_float32_views():
    model = Glm4ForCausalLM.from_pretrained(fixture_dir(CAUSAL))
    stored = load_file(os.path.join(fixture_dir(CAUSAL), "model.safetensors"))
    for name, w in matrices(model):
        assert w.dtype == np.float32, name
        assert memmap_base(w) is not None, f"{name}: fp32 weights should not be copied"
        np.testing.assert_array_equal(w, stored[name], err_msg=name)


def _write_fp32_copy(tensors, tmp_path, dest, fn):
    target = tmp_path / dest
    target.mkdir()
    shutil.copy(os.path.join(fixture_dir(CAUSAL), "config.json"), target)
    save_file({k: fn(v) for k, v in tensors.items()}, str(target / "model.safetensors"))
    return target


def test_fp16_checkpoint(tmp_path):
    tensors = load_file(os.path.join(fixture_dir(CAUSAL), "model.safetensors"))
    assert all(v.dtype == np.float32 for v in tensors.values())
    fp16_dir = _write_fp32_copy(tensors, tmp_path, "fp16", lambda v: v.astype(np.float16))
    rounded_dir = _write_fp32_copy(tensors, tmp_path, "rounded",
                                   lambda v: v.astype(np.float16).astype(np.float32))
    assert read_raw(fp16_dir / "model.safetensors")["lm_head.weight"][0] == "F16"

    fp16 = Glm4ForCausalLM.from_pretrained(fp16_dir)
    for name, w in matrices(fp16) + small_vectors(fp16):
        assert w.dtype == np.float32, name  # fp16 is widened: compute is float32
        np.testing.assert_array_equal(w, tensors[name].astype(np.float16).astype(np.float32), err_msg=name)

    ids = golden(CAUSAL)["ids"]
    got = fp16(ids).logits
    exact = Glm4ForCausalLM.from_pretrained(fixture_dir(CAUSAL))(ids).logits
    rounded = Glm4ForCausalLM.from_pretrained(rounded_dir)(ids).logits
    close(got, rounded, "fp16 checkpoint vs fp32 weights rounded to fp16")
    # fp16 rounding (relative 2**-11) moves logits of magnitude ~10 by ~0.01 (measured 0.008) ...
    close(got, exact, "fp16 checkpoint vs the fp32 model", atol=3e-2)
    # ... but does move them: the rounded weights really were used.
    assert np.abs(got - exact).max() > 1e-6


def test_sharded_equals_single_file(tmp_path):
    stored = bf16_shard_tensors()
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(os.path.join(fixture_dir(BF16), "config.json"), single)
    write_raw(single / "model.safetensors", stored)

    sharded = Glm4ForCausalLM.from_pretrained(fixture_dir(BF16), dtype="float32")
    merged = Glm4ForCausalLM.from_pretrained(single, dtype="float32")
    a, b = sharded.named_parameters(), merged.named_parameters()
    assert sorted(a) == sorted(b) == sorted(stored)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    g = golden(BF16)
    out_a, out_b = sharded(g["ids"]).logits, merged(g["ids"]).logits
    np.testing.assert_array_equal(out_a, out_b)
    close(out_b, g["logits"], "single-file logits")


# ---- hub ids, resolved from a local cache only ------------------------------------------------

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-glm"
    snap = repo / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(fixture_dir(CAUSAL), f), snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return cache


def _offline_env(monkeypatch, cache):
    """HF_HUB_OFFLINE / HF_HUB_CACHE in the environment; huggingface_hub reads both into
    ``huggingface_hub.constants`` at import time, so set those too for this process."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_from_offline_cache_env(tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path)
    _offline_env(monkeypatch, cache)
    model = Glm4ForCausalLM.from_pretrained("org/tiny-glm")
    assert model.name_or_path == "org/tiny-glm"
    g = golden(CAUSAL)
    close(model(g["ids"]).logits, g["logits"], "hub-cache model logits")
    assert model.model.layers[0].self_attn.qkv_proj.parts["q_proj"].weight.shape == (64, 48)


def test_hub_id_with_explicit_cache_dir(tmp_path):
    cache = fake_hub_cache(tmp_path)
    model = Glm4ForCausalLM.from_pretrained("org/tiny-glm", cache_dir=str(cache), local_files_only=True)
    g = golden(CAUSAL)
    close(model(g["ids"]).logits, g["logits"], "hub-cache model logits")
    config = glm4rt.Glm4Config.from_pretrained("org/tiny-glm", cache_dir=str(cache), local_files_only=True)
    assert config.vocab_size == 211 and config.hidden_size == 48


def test_hub_id_env_only_in_fresh_process(tmp_path):
    # The environment variables alone, read by a fresh interpreter at import time.
    cache = fake_hub_cache(tmp_path)
    code = ("import sys, numpy as np, glm4rt\n"
            "m = glm4rt.Glm4ForCausalLM.from_pretrained('org/tiny-glm')\n"
            "g = np.load(sys.argv[1])\n"
            f"np.testing.assert_allclose(m(g['ids']).logits, g['logits'], atol={LOGITS_ATOL}, rtol=0)\n"
            "print('OK', m.config.vocab_size)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    env.pop("HF_HOME", None)
    res = subprocess.run([sys.executable, "-c", code, os.path.join(fixture_dir(CAUSAL), "golden.npz")],
                         env=env, cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK 211"


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path)
    with pytest.raises(FileNotFoundError, match="org/not-there"):
        Glm4ForCausalLM.from_pretrained("org/not-there", cache_dir=str(cache), local_files_only=True)
    _offline_env(monkeypatch, cache)
    with pytest.raises(FileNotFoundError, match="org/not-there"):
        Glm4ForCausalLM.from_pretrained("org/not-there")


# ---- config overrides and new heads -----------------------------------------------------------

def test_problem_type_override():
    model = Glm4ForSequenceClassification.from_pretrained(fixture_dir("seqcls"),
                                                          problem_type="multi_label_classification")
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.num_labels == 3
    g = golden("seqcls")
    close(model(g["ids"]).logits, g["logits"], "seqcls logits")
    close(model(g["ids"], labels=g["labels_multi"]).loss, g["loss_multi_label_classification"], "loss")
    # Without the override the file's (absent) problem_type stays None.
    assert Glm4ForSequenceClassification.from_pretrained(fixture_dir("seqcls")).config.problem_type is None


def test_new_sequence_classification_head():
    with pytest.warns(UserWarning, match="score.weight"):
        model = Glm4ForSequenceClassification.from_pretrained(fixture_dir(CAUSAL), num_labels=4, seed=0)
    config = model.config
    assert config.num_labels == 4
    assert len(config.id2label) == 4 and sorted(config.id2label) == [0, 1, 2, 3]
    w = model.score.weight
    assert w.shape == (4, config.hidden_size) == (4, 48)
    assert w.dtype == np.float32
    # 192 draws from normal(0, 0.02): the sample std is within ~5% of 0.02 (1 sigma).
    assert 0.015 < w.std() < 0.025, w.std()
    assert abs(w.mean()) < 0.008, w.mean()
    assert config.initializer_range == 0.02
    # The body is the checkpoint's: the pooled logits are the new head on its last hidden state.
    ids = golden(CAUSAL)["ids"]
    hidden = golden(CAUSAL)["hidden_states.2"]
    logits = model(ids).logits
    assert logits.shape == (2, 4)
    close(logits, hidden[:, -1] @ w.T, "score head on golden hidden states")


def test_new_token_classification_head():
    with pytest.warns(UserWarning, match="score.weight") as record:
        model = Glm4ForTokenClassification.from_pretrained(fixture_dir(CAUSAL), num_labels=5, seed=1)
    assert any("score.bias" in str(r.message) for r in record)
    assert model.config.num_labels == 5 and len(model.config.id2label) == 5
    assert model.score.weight.shape == (5, 48)
    assert 0.013 < model.score.weight.std() < 0.027
    np.testing.assert_array_equal(model.score.bias, np.zeros(5, dtype=np.float32))
    g = golden(CAUSAL)
    close(model(g["ids"]).logits, g["hidden_states.2"] @ model.score.weight.T, "token logits")


def test_loaded_head_does_not_warn(recwarn):
    model = Glm4ForTokenClassification.from_pretrained(fixture_dir("tokcls"))
    assert not [w for w in recwarn if "newly initialized" in str(w.message)]
    stored = load_file(os.path.join(fixture_dir("tokcls"), "model.safetensors"))
    np.testing.assert_array_equal(model.score.bias, stored["score.bias"])
    assert np.abs(model.score.bias).max() > 0  # a trained-looking bias, not the zero init


def test_unknown_kwarg_is_type_error():
    with pytest.raises(TypeError, match="num_lables"):
        Glm4ForSequenceClassification.from_pretrained(fixture_dir("seqcls"), num_lables=3)


def test_base_model_from_causal_checkpoint():
    model = Glm4Model.from_pretrained(fixture_dir(CAUSAL))
    assert not hasattr(model, "lm_head")
    g = golden(CAUSAL)
    L = model.config.num_hidden_layers
    out = model(g["ids"])
    assert out.last_hidden_state.shape == (2, 9, 48)
    close(out.last_hidden_state, g[f"hidden_states.{L}"], "last_hidden_state")


# ---- bad paths and corrupt files --------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Glm4ForCausalLM.from_pretrained(missing)


def test_directory_without_weights(tmp_path):
    d = tmp_path / "no-weights"
    d.mkdir()
    shutil.copy(os.path.join(fixture_dir(CAUSAL), "config.json"), d)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Glm4ForCausalLM.from_pretrained(d)


def test_path_to_a_file():
    path = os.path.join(fixture_dir(CAUSAL), "model.safetensors")
    with pytest.raises(FileNotFoundError, match="is a file"):
        Glm4ForCausalLM.from_pretrained(path)


def test_truncated_safetensors(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        Glm4ForCausalLM.from_pretrained(d)


def test_garbage_header(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(8)  # keep the length, destroy the JSON
        fh.write(b"\x00\xff garbage \xfe" * 4)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Glm4ForCausalLM.from_pretrained(d)


def test_garbage_first_bytes(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    with open(d / "model.safetensors", "r+b") as fh:
        fh.write(b"GARBAGE!GARBAGE!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Glm4ForCausalLM.from_pretrained(d)


def test_header_length_past_end_of_file(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", size + 100))
    with pytest.raises(CheckpointError, match=f"header length {size + 100} exceeds the file size {size}"):
        Glm4ForCausalLM.from_pretrained(d)


def _rewrite(d, edit):
    f = str(d / "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensors: 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        Glm4ForCausalLM.from_pretrained(d)


def test_missing_lm_head_is_an_error_for_untied_model(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    _rewrite(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        Glm4ForCausalLM.from_pretrained(d)


def test_unexpected_tensor(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.7.foo.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.foo\.weight"):
        Glm4ForCausalLM.from_pretrained(d)


def test_wrongly_shaped_tensor(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(d, lambda t: t.update({name: np.zeros((48, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*\[48, 32\].*\[48, 64\]"):
        Glm4ForCausalLM.from_pretrained(d)


def test_config_invalid_json(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    (d / "config.json").write_text('{"model_type": "glm4", "hidden_size": 48,')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        Glm4ForCausalLM.from_pretrained(d)


def test_missing_shard(tmp_path):
    d = copy_fixture(BF16, tmp_path)
    (d / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00006.safetensors"):
        Glm4ForCausalLM.from_pretrained(d)


# ---- unsupported settings ---------------------------------------------------------------------

def _edit_config(tmp_path, **changes):
    d = copy_fixture(CAUSAL, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_unsupported_activation(tmp_path):
    d = _edit_config(tmp_path, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        Glm4ForCausalLM.from_pretrained(d)


def test_unsupported_rope_scaling(tmp_path):
    d = _edit_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        Glm4ForCausalLM.from_pretrained(d)


def test_wrong_model_type(tmp_path):
    d = _edit_config(tmp_path, model_type="chatglm")
    with pytest.raises(ConfigError, match="model_type 'chatglm'"):
        Glm4ForCausalLM.from_pretrained(d)


def test_float16_dtype_argument():
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        Glm4ForCausalLM.from_pretrained(fixture_dir(CAUSAL), dtype="float16")
    with pytest.raises(ValueError, match="float16"):
        Glm4ForCausalLM.from_pretrained(fixture_dir(CAUSAL), dtype=np.float16)


def test_supported_config_still_loads(tmp_path):
    # The edit helper itself does not break a checkpoint: an unchanged copy loads and matches.
    d = _edit_config(tmp_path, hidden_act="silu")
    g = golden(CAUSAL)
    close(Glm4ForCausalLM.from_pretrained(d)(g["ids"]).logits, g["logits"], "copied checkpoint")


# ---- safetensors rules, as strict as the safetensors library (issue 18) -----------------------
# Each damaged file below is one that safetensors.safe_open rejects: glm4rt must reject it too,
# with a CheckpointError that names the file and, where there is one, the tensor.

def read_header(path):
    """(header dict, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        return header, f.read()


def write_header(path, header, data, extra_spaces=0):
    """Write ``header`` (JSON padded with spaces to a multiple of 8, then ``extra_spaces`` more)
    and ``data``."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8 + extra_spaces)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def safetensors_rejects(path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy"):
            return False
    except SafetensorError:
        return True


def _shift(k, delta):
    """An edit that moves the k-th tensor (in data order) by ``delta`` bytes."""
    def edit(header, data):
        name = by_offset(header)[k]
        header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
    return edit


def _same_offsets(header, data):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    assert header[a]["shape"] == header[b]["shape"]
    header[b]["data_offsets"] = header[a]["data_offsets"]


def _first_at_four(header, data):
    _shift(0, 4)(header, data)
    return b"\0" * 4 + data  # the data section grows by the gap: only the gap is wrong


def _edit_header(edit):
    """A case that rewrites the header of the single-file fixture with ``edit(header, data)``,
    which may return new data bytes."""
    def apply(f):
        header, data = read_header(f)
        new_data = edit(header, data)
        write_header(f, header, data if new_data is None else new_data)
    return apply


def _length_one_short(f):
    header, data = read_header(f)
    blob = json.dumps(header).encode() + b"  "  # ends in padding, so one byte less still parses
    blob += b" " * (-len(blob) % 8)
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob) - 1) + blob + data)


def _deep_extra_field(header, data):
    # Python's json reads 200 levels; the library's reader stops at 128.
    header[by_offset(header)[0]]["extra"] = json.loads("[" * 200 + "]" * 200)


HEADER_CASES = {
    # The header-length field one short on a header that ends in padding: the JSON still parses,
    # the data would start one byte early, every weight misread (every logit NaN).
    "length_one_short": (_length_one_short, r"'model\.norm\.weight', ends at byte \d+ of the data section but "
                                            r"the file holds \d+ bytes after its header"),
    "overlaps_neighbour": (_edit_header(_shift(5, -4)),
                           r"tensor 'model\.layers\.0\.post_attention_layernorm\.weight' \(bytes \[\d+, \d+\) of the "
                           r"data section\) overlaps tensor 'model\.layers\.0\.mlp\.gate_up_proj\.weight'"),
    "shifted_into_neighbour": (_edit_header(_shift(5, +4)),
                               r"tensor 'model\.layers\.0\.post_attention_layernorm\.weight' starts at byte \d+ of "
                               r"the data section but tensor 'model\.layers\.0\.mlp\.gate_up_proj\.weight' ends at"),
    "same_offsets_as_neighbour": (_edit_header(_same_offsets),
                                  r"'model\.layers\.0\.(input|post_attention)_layernorm\.weight' \(bytes .*\) "
                                  r"overlaps tensor 'model\.layers\.0\.(input|post_attention)_layernorm\.weight'"),
    "past_the_data": (_edit_header(_shift(-1, 1 << 20)),
                      r"'model\.norm\.weight' starts at byte \d+ of the data section but tensor .* ends at"),
    "first_not_at_zero": (_edit_header(_first_at_four),
                          r"starts at byte 4 of the data section but the data section starts at 0"),
    "size_not_dtype_times_shape": (_edit_header(lambda h, d: h["lm_head.weight"].update(shape=[211, 47])),
                                   r"tensor 'lm_head\.weight' of shape \[211, 47\] F32 needs 39668 bytes but its "
                                   r"offsets \[\d+, \d+\) span 40512"),
    "bytes_appended": (_edit_header(lambda h, d: d + b"\0" * 8), r"bytes appended"),
    "truncated": (_edit_header(lambda h, d: d[:-4]), r"'model\.norm\.weight' needs bytes .* the file is truncated"),
    "float_in_shape": (_edit_header(lambda h, d: h["lm_head.weight"].update(shape=[211.0, 48])),
                       r"tensor 'lm_head\.weight' has shape \[211\.0, 48\]: not a list of integers"),
    "string_offsets": (_edit_header(lambda h, d: h["lm_head.weight"].update(
                           data_offsets=[str(o) for o in h["lm_head.weight"]["data_offsets"]])),
                       r"tensor 'lm_head\.weight' has data_offsets \['\d+', '\d+'\]"),
    "unknown_dtype": (_edit_header(lambda h, d: h["lm_head.weight"].update(dtype="f32")),
                      r"tensor 'lm_head\.weight' has dtype 'f32', which glm4rt does not read"),
    "metadata_not_strings": (_edit_header(lambda h, d: h.update(__metadata__={"format": 1})),
                             r"__metadata__ must map strings to strings"),
    "nan_in_header": (_edit_header(lambda h, d: h["lm_head.weight"].update(extra=float("nan"))),
                      r"corrupt safetensors header \(NaN is not valid JSON\)"),
    "nested_past_the_library_limit": (_edit_header(_deep_extra_field),
                                      r"the safetensors library rejects the file .*recursion limit"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_rules_match_safetensors(tmp_path, case):
    damage, message = HEADER_CASES[case]
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    damage(f)
    assert safetensors_rejects(f), "the oracle accepts this file: not a damaged-file case"
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ": ") as e:
        Glm4ForCausalLM.from_pretrained(d)
    assert re.search(message, str(e.value)), str(e.value)


def test_header_length_beyond_the_library_limit(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
    assert safetensors_rejects(f)
    with pytest.raises(CheckpointError, match="header length 100000001 exceeds the safetensors limit"):
        Glm4ForCausalLM.from_pretrained(d)


def test_deeply_nested_header(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    header, data = read_header(f)
    blob = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"  # RecursionError in json
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob.encode() + data)
    with pytest.raises(CheckpointError,
                       match=re.escape(str(f)) + r": corrupt safetensors header \(nested too deeply\)"):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("extra_spaces", [0, 1, 2, 3])
def test_tensors_at_any_offset_load(tmp_path, extra_spaces):
    """The format does not align the data section: a header of any length is valid. Tensors that
    land at an offset that is not a multiple of their element size are copied (the kernels read
    typed pointers); the others stay views of the memory map."""
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    header, data = read_header(f)
    write_header(f, header, data, extra_spaces)
    with open(f, "rb") as fh:
        data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
    assert data_start % 4 == extra_spaces  # every tensor's size is a multiple of 4 bytes
    assert not safetensors_rejects(f)
    model = Glm4ForCausalLM.from_pretrained(d)
    for name, w in matrices(model) + small_vectors(model):
        assert w.flags.aligned and not w.flags.writeable, name
        odd = (data_start + header[name]["data_offsets"][0]) % 4 != 0
        assert (memmap_base(w) is None) == odd, name
    g = golden(CAUSAL)
    close(model(g["ids"]).logits, g["logits"], f"data section at {data_start}")


def test_metadata_and_key_order_do_not_matter(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    header, data = read_header(f)
    reordered = {"__metadata__": {"format": "pt", "note": "x"}}
    reordered.update({k: {"shape": v["shape"], "data_offsets": v["data_offsets"], "dtype": v["dtype"]}
                      for k, v in sorted(header.items(), reverse=True) if k != "__metadata__"})
    write_header(f, reordered, data)
    assert not safetensors_rejects(f)
    g = golden(CAUSAL)
    close(Glm4ForCausalLM.from_pretrained(d)(g["ids"]).logits, g["logits"], "reordered header")


# ---- the index: shards confined to the checkpoint directory ------------------------------------

def _edit_index(d, edit):
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))
    return path


FIRST = "lm_head.weight"  # the index's first entry: the tensor named when its shard is refused


def test_index_absolute_shard_path(tmp_path):
    # The absolute path is that of the real shard: a loader that followed it would load fine.
    d = copy_fixture(BF16, tmp_path)
    index = _edit_index(d, lambda wm: wm.update({FIRST: str(d / wm[FIRST])}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: weight_map places tensor '{FIRST}' in "
                                                        f"'{d}/model-00006-of-00006.safetensors', outside the "
                                                        "checkpoint directory")):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("shard", ["../ckpt/{}", "sub/../../ckpt/{}", "..\\ckpt\\{}", "sub/../{}"])
@pytest.mark.parametrize("name", [FIRST, "model.layers.0.input_layernorm.weight"])  # alone / 1 of 7 in its shard
def test_index_dotdot_shard_path(tmp_path, shard, name):
    d = copy_fixture(BF16, tmp_path)
    index = _edit_index(d, lambda wm: wm.update({name: shard.format(wm[name])}))
    shard = json.loads(index.read_text())["weight_map"][name]
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: weight_map places tensor '{name}' in "
                                                        f"{shard!r}, outside the checkpoint directory")):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("value", [7, None, ["model-00006-of-00006.safetensors"], "", "a\0b"])
def test_index_shard_not_a_file_name(tmp_path, value):
    d = copy_fixture(BF16, tmp_path)
    index = _edit_index(d, lambda wm: wm.update({FIRST: value}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: weight_map places tensor '{FIRST}' in ")
                       + ".*which is not a file name"):
        Glm4ForCausalLM.from_pretrained(d)


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    d = copy_fixture(BF16, tmp_path)
    index = _edit_index(d, lambda wm: wm.update({"model.layers.0.extra.weight": wm[FIRST]}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index} places tensor 'model.layers.0.extra.weight' in "
                                                        "model-00006-of-00006.safetensors, which lacks it")):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("text, message", [
    ('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", r"corrupt index \(nested too deeply\)"),
    ('{"weight_map": ["model.safetensors"]}', r"corrupt index \(ValueError: weight_map is a list, not an object\)"),
    ('{"metadata": {}}', r"corrupt index \(KeyError: 'weight_map'\)"),
    ('{"weight_map": {"lm_head.weight": NaN}}', r"corrupt index \(ValueError: NaN is not valid JSON\)"),
    ('["weight_map"]', r"corrupt index \(TypeError"),
])
def test_corrupt_index(tmp_path, text, message):
    d = copy_fixture(BF16, tmp_path)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(d / "model.safetensors.index.json")) + ": " + message):
        Glm4ForCausalLM.from_pretrained(d)


def test_symlinked_shards_still_load(tmp_path):
    # A hub cache snapshot: every file a link into a blob store outside the directory.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(fixture_dir(BF16), blobs)
    snapshot.mkdir()
    for name in os.listdir(blobs):
        os.symlink(os.path.join("..", "blobs", name), snapshot / name)
    g = golden(BF16)
    close(Glm4ForCausalLM.from_pretrained(snapshot, dtype="float32")(g["ids"]).logits, g["logits"], "linked shards")


# ---- config against checkpoint, quantized tensors ----------------------------------------------

def test_num_hidden_layers_beyond_the_checkpoint(tmp_path):
    # 10**9 is a valid integer setting: it must fail against the 2 stored layers, not build
    # 10**9 layers' tensor specs first (10**12, past the kernels' 32-bit sizes, is a plain range error).
    d = _edit_config(tmp_path, num_hidden_layers=10**9)
    with pytest.raises(ConfigError, match=re.escape(f"{d / 'config.json'}: num_hidden_layers=1000000000, but the "
                                                    f"checkpoint in '{d}' holds 2")):
        Glm4ForCausalLM.from_pretrained(d)
    d = _edit_config(tmp_path / "b", num_hidden_layers=10**12)
    with pytest.raises(ConfigError, match=re.escape(f"{d / 'config.json'}: num_hidden_layers must be an integer "
                                                    "in [1, 2147483647], got 1000000000000")):
        Glm4ForCausalLM.from_pretrained(d)


def test_float_tensor_stored_as_integers(tmp_path):
    d = copy_fixture(CAUSAL, tmp_path)
    f = d / "model.safetensors"
    header, data = read_header(f)
    header["model.norm.weight"]["dtype"] = "I32"  # same size: the library accepts it
    write_header(f, header, data)
    assert not safetensors_rejects(f)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor 'model.norm.weight' is stored as I32 in {f}, but "
                                                        "a norm must be one of F32, F16, BF16, F64")):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("int4")
    Glm4ForCausalLM.from_pretrained(fixture_dir(CAUSAL), quantization="int4").save_pretrained(d)
    return d


def test_qweight_stored_with_the_wrong_dtype(tmp_path, quantized_dir):
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    f = d / "model.safetensors"
    header, data = read_header(f)
    name = "model.layers.1.mlp.down_proj.qweight"
    header[name]["dtype"] = "I8"  # same bytes, valid for the library, not a packed weight
    write_header(f, header, data)
    assert not safetensors_rejects(f)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' is stored as I8 in {f}, but a quantized "
                                                        "weight must be one of U8")):
        Glm4ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "glm4rt", "format": "int3"}, r"quantization_config\.format 'int3' is not one of"),
    ({"quant_method": "gptq", "bits": 4}, r"quantization_config\.quant_method 'gptq' is not supported"),
    ({"quant_method": "glm4rt", "format": "int4", "block_size": 64}, r"quantization_config\.block_size must be 32"),
    ("int4", r"quantization_config must be an object"),
])
def test_bad_quantization_config(tmp_path, quantized_dir, quantization_config, message):
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(str(d / "config.json")) + ": " + message):
        Glm4ForCausalLM.from_pretrained(d)


def test_quantized_format_swapped(tmp_path, quantized_dir):
    # An int4 checkpoint whose config says int8: every packed size disagrees with the config.
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["format"] = "int8"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor '.*\.qweight' has shape \[\d+\] in .*model\.safetensors, "
                                              r"but the config expects \[\d+\]"):
        Glm4ForCausalLM.from_pretrained(d)


def test_index_spellings_of_one_shard(tmp_path):
    # "./shard" and "shard" are one file: its tensors are not read twice (nor "stored twice").
    d = copy_fixture(BF16, tmp_path)
    name = "model.layers.0.input_layernorm.weight"  # one of 7 tensors in its shard
    _edit_index(d, lambda wm: wm.update({name: "./" + wm[name]}))
    g = golden(BF16)
    close(Glm4ForCausalLM.from_pretrained(d, dtype="float32")(g["ids"]).logits, g["logits"], "./shard")


def test_quantized_matrix_sizes_hidden_by_padding(tmp_path, quantized_dir):
    # int4 packs rows 16 and weights 32 at a time: an intermediate_size of 63 instead of 64 takes
    # the same bytes in every packed matrix. The file's record of each matrix tells them apart.
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 63
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.gate_up_proj\.qweight' in .*model\."
                                              r"safetensors holds a quantized \[128, 48\] matrix \(glm4rt\.qweight_"
                                              r"shapes\), but the config expects \[126, 48\]"):
        Glm4ForCausalLM.from_pretrained(d)


def test_quantized_checkpoint_without_its_shapes_record(tmp_path, quantized_dir):
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    f = d / "model.safetensors"
    header, data = read_header(f)
    assert json.loads(header["__metadata__"]["glm4rt.qweight_shapes"])["lm_head.qweight"] == [211, 48]
    header["__metadata__"] = {"format": "pt"}
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: a quantized checkpoint without the "
                                                        "glm4rt.qweight_shapes record")):
        Glm4ForCausalLM.from_pretrained(d)
