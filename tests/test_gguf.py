"""GGUF in (glm4rt.gguf_io): files written by llama.cpp's own converter (convert_hf_to_gguf.py from
the llama.cpp sources that the llama-cpp-python sdist carries, benchmarks/llama_tools.py) of a tiny
random GLM-4 and of the demo model load with transformers' logits (float types) and with the
weights that the gguf package's reference dequantizers read (quantized types); the tokenizer from
GGUF metadata encodes as the Hugging Face tokenizer; bad files are clear errors."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import glm4rt
from glm4rt import ops
from glm4rt.errors import CheckpointError
from helpers import glm4rt_command

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package (the test extra has it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import llama_tools  # noqa: E402

TEXTS = ["In the beginning God created the heaven and the earth.", "床前明月光，疑是地上霜。",
         "Hello <|user|> x\n\n  y's 123456 ☃ — done", ""]


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """A tiny GLM-4 built by transformers with every parameter random (biases, all four norms),
    the demo model's tokenizer; saved in fp32."""
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    d = str(tmp_path_factory.mktemp("gguf") / "tiny")
    cfg = Glm4Config(vocab_size=6144, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                     attention_bias=True, tie_word_embeddings=False, max_position_embeddings=256,
                     rms_norm_eps=1e-5, pad_token_id=6128, eos_token_id=[6128, 6135, 6137])
    torch.manual_seed(0)
    model = Glm4ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(glm4rt.DEMO_MODEL, f), d)
    return d


def _convert(ckpt, tmp_path_factory, outtype):
    out = str(tmp_path_factory.mktemp("gguf") / f"{os.path.basename(ckpt)}-{outtype}.gguf")
    return llama_tools.convert(ckpt, out, outtype)


@pytest.fixture(scope="module")
def tiny_f32(tiny_random, tmp_path_factory):
    return _convert(tiny_random, tmp_path_factory, "f32")


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory):
    return _convert(glm4rt.DEMO_MODEL, tmp_path_factory, "q8_0")


def _ids(tok, text="In the beginning God created the heaven and the earth. And the earth was without form"):
    return np.array([tok.encode(text)])


def test_float_gguf_is_the_checkpoint(tiny_random, tiny_f32):
    import torch
    from transformers import Glm4ForCausalLM

    tok = glm4rt.Glm4Tokenizer.from_pretrained(tiny_f32)
    ids = _ids(tok)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(tiny_f32)
    assert model.config.quantization_config is None and model.config.attention_bias
    assert model.config.partial_rotary_factor == 0.5 and model.config.head_dim == 16
    from_dir = glm4rt.Glm4ForCausalLM.from_pretrained(tiny_random, dtype="float32")
    np.testing.assert_array_equal(model(ids).logits, from_dir(ids).logits)  # the same fp32 weights
    with torch.no_grad():
        ref = Glm4ForCausalLM.from_pretrained(tiny_random, dtype=torch.float32)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model(ids).logits, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(out, from_dir.generate(ids, max_new_tokens=6, do_sample=False))


def test_gguf_tokenizer_encodes_as_the_hf_tokenizer(tiny_f32, demo_q8):
    hf = glm4rt.Glm4Tokenizer.from_pretrained(glm4rt.DEMO_MODEL)
    for path in (tiny_f32, demo_q8):
        tok = glm4rt.Glm4Tokenizer.from_pretrained(path)
        for text in TEXTS:
            assert tok.encode(text) == hf.encode(text), text
            assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
            assert tok.decode(hf.encode(text)) == hf.decode(hf.encode(text))
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was Adam?"}]
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)
        np.testing.assert_array_equal(tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"],
                                      hf.apply_chat_template(chat, add_generation_prompt=True)["input_ids"])
        assert tok.eos_token == "<|endoftext|>" and len(tok) == len(hf)


def _module_weights(path):
    """{gguf tensor name: float32 [rows, cols]} by the gguf package's own dequantizers."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        if len(t.shape) == 2:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            out[t.name] = (t.tensor_type.name, np.asarray(w, np.float32).reshape(int(t.shape[1]), int(t.shape[0])))
    return out


def _glm4rt_matrices(model):
    """{gguf name: (format, float32 matrix)} of a loaded model's projections."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        parts = dict(getattr(layer.self_attn.qkv_proj, "parts", {}))
        for proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            out[f"blk.{i}.{g}.weight"] = parts[proj]
        out[f"blk.{i}.attn_output.weight"] = layer.self_attn.o_proj
        out[f"blk.{i}.ffn_up.weight"] = layer.mlp.gate_up_proj
        out[f"blk.{i}.ffn_down.weight"] = layer.mlp.down_proj
    out["output.weight"] = model.lm_head
    res = {}
    for name, lin in out.items():
        if hasattr(lin, "packed"):
            res[name] = (lin.fmt, lin.dequantize())
        else:
            res[name] = ("float", ops.bf16_to_f32(lin.weight) if lin.weight.dtype == np.uint16 else lin.weight)
    return res


def test_q8_0_gguf_converts_without_rounding(demo_q8):
    """Every Q8_0 matrix becomes int8 with the very values the gguf package dequantizes; the
    logits are those of the float model of the same values up to the int8 activations."""
    model = glm4rt.Glm4ForCausalLM.from_pretrained(demo_q8)
    ref = _module_weights(demo_q8)
    got = _glm4rt_matrices(model)
    types = {t for t, _ in ref.values()}
    assert "Q8_0" in types
    for name, (fmt, w) in got.items():
        gtype, gw = ref[name]
        assert fmt == {"Q8_0": "int8"}.get(gtype, "float"), (name, gtype, fmt)
        np.testing.assert_array_equal(w, gw, err_msg=name)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(demo_q8)
    ids = _ids(tok)
    logits = model(ids).logits[0]
    float_model = glm4rt.Glm4ForCausalLM.from_pretrained(glm4rt.DEMO_MODEL, dtype="float32")
    assert (logits.argmax(-1) == float_model(ids).logits[0].argmax(-1)).mean() > 0.9
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(os.path.join(os.path.dirname(demo_q8), "saved"))


# ---- every quantized type, written by the test (the converter writes F32 / F16 / BF16 / Q8_0 only) --

def _copy_gguf(src, dst, types):
    """``src`` rewritten with the 2-D tensors in ``types`` ({gguf name: type name}) stored in that
    type: Q4_0 / Q5_0 / Q8_0 by the gguf package's quantizers, Q4_K / Q5_K / Q6_K as random valid
    blocks (the gguf package has no K-quant quantizer; its dequantizer then defines the weights)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        data = np.asarray(t.data)
        qtype = types.get(t.name)
        if qtype is None:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
            continue
        q = gguf.GGMLQuantizationType[qtype]
        rows, cols = int(t.shape[1]), int(t.shape[0])
        block, size = gguf.GGML_QUANT_SIZES[q]
        if qtype in ("Q4_0", "Q5_0", "Q8_0"):
            raw = gguf.quants.quantize(np.asarray(data, np.float32).reshape(rows, cols), q)
        else:
            raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            scale = (np.abs(rng.standard_normal((rows, cols // block))) * 0.002 + 1e-4).astype(np.float16)
            raw[:, :, :2] = scale.view(np.uint8).reshape(rows, -1, 2)   # Q4_K / Q5_K: d first
            if qtype != "Q6_K":
                raw[:, :, 2:4] = scale.view(np.uint8).reshape(rows, -1, 2)  # dmin
            else:
                raw[:, :, -2:] = scale.view(np.uint8).reshape(rows, -1, 2)  # Q6_K: d last
            raw = raw.reshape(rows, -1)
        w.add_tensor(t.name, raw, raw_shape=(rows, raw.shape[1]), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def demo_f32(tmp_path_factory):
    return _convert(glm4rt.DEMO_MODEL, tmp_path_factory, "f32")


def test_every_type_converts_as_documented(demo_f32, tmp_path):
    """Q4_0 -> int4 and Q4_K -> q4k exactly; Q5_0 / Q5_K / Q6_K (no glm4rt format) -> int8 within
    int8's rounding of the dequantized values; a q4k matrix's 256-weight super-blocks are Q4_K's."""
    types = {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K",
             "blk.0.attn_output.weight": "Q5_K", "blk.0.ffn_up.weight": "Q4_K", "blk.1.ffn_up.weight": "Q5_0",
             "blk.1.attn_q.weight": "Q8_0", "output.weight": "Q6_K"}
    path = _copy_gguf(demo_f32, str(tmp_path / "mixed.gguf"), types)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(path)
    ref, got = _module_weights(path), _glm4rt_matrices(model)
    expect = {"Q4_0": "int4", "Q4_K": "q4k", "Q8_0": "int8", "Q6_K": "int8", "Q5_K": "int8", "Q5_0": "int8"}
    for name, (fmt, w) in got.items():
        gtype, gw = ref[name]
        assert fmt == expect.get(gtype, "float"), (name, gtype, fmt)
        if gtype in ("Q4_0", "Q4_K", "Q8_0", "F32"):
            np.testing.assert_array_equal(w, gw, err_msg=name)
        else:  # one int8 rounding: half a step (max |w| / 127 per block), plus the fp16 rounding of
            # the step, which the codes up to 127 multiply (127 * 2^-11 of a step)
            step = np.abs(gw.reshape(gw.shape[0], -1, 32)).max(-1) / 127
            bound = step[..., None] * (0.5 + 127 * 2.0 ** -11) + 1e-12
            assert (np.abs(w - gw).reshape(gw.shape[0], -1, 32) <= bound).all(), name
    assert model.config.quantization_config["module_formats"]["lm_head"] == "int8"
    ids = np.array([[6130, 6132, 100, 200, 300]])
    assert np.isfinite(model(ids).logits).all()
    # quantization= converts everything to one format: exact where the type is that format
    as_q4k = glm4rt.Glm4ForCausalLM.from_pretrained(path, quantization="q4k")
    got = _glm4rt_matrices(as_q4k)
    assert {f for f, _ in got.values()} == {"q4k"}
    np.testing.assert_array_equal(got["blk.0.attn_k.weight"][1], ref["blk.0.attn_k.weight"][1])


def test_bad_gguf_files_are_clear_errors(demo_f32, tmp_path):
    data = open(demo_f32, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        glm4rt.Glm4ForCausalLM.from_pretrained(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        glm4rt.Glm4ForCausalLM.from_pretrained(header_only)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError):
        glm4rt.Glm4ForCausalLM.from_pretrained(garbage)
    with pytest.raises(FileNotFoundError):
        glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path / "missing.gguf")
    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama'"):
        glm4rt.Glm4ForCausalLM.from_pretrained(other)
    with pytest.raises(ValueError, match="config"):
        glm4rt.Glm4ForCausalLM.from_pretrained(demo_f32, config=glm4rt.Glm4Config())


def test_cli_generates_from_a_gguf(demo_f32, tmp_path):
    r = subprocess.run(glm4rt_command("generate", "--model", demo_f32, "--greedy", "--max-new-tokens", "8",
                                      "In the beginning"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tok = glm4rt.Glm4Tokenizer.from_pretrained(glm4rt.DEMO_MODEL)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(glm4rt.DEMO_MODEL, dtype="float32")
    from glm4rt.chat import ChatSession
    assert r.stdout == ChatSession(model, tok, max_new_tokens=8, do_sample=False).ask("In the beginning") + "\n"
    info = subprocess.run(glm4rt_command("info", "--model", demo_f32), capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
