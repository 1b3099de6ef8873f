"""Quantized weights: the int8/int4 block formats against independent NumPy readings of their
specification, every ISA's kernels against the scalar reference, streaming quantize-on-load,
quantized checkpoints (save, memory-mapped load, CLI), and fixed quality thresholds."""
import os
import subprocess

import numpy as np
import pytest

import glm4rt
import glm4rt.loading as loading
from conftest import fixture_dir, golden
from helpers import glm4rt_command
from glm4rt import ops
from glm4rt.quant import QuantLinear, packed_bytes, quantize_weight
from kernel_reference import ref_qmatmul, takes_amx_tiles

FORMATS = ["int8", "int4", "q4k"]


def _fp16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def _unpack(packed, fmt, n, k):
    """The documented layout (csrc/quant.h) read with NumPy: quants [n, k] and scales [n, k/32]."""
    nb, ng = -(-k // 32), -(-n // 16)
    block = 544 if fmt == "int8" else 288
    blocks = packed.reshape(ng, nb, block)
    scales = blocks[:, :, block - 32:].copy().view(np.float16).astype(np.float32)  # [ng, nb, 16]
    if fmt == "int8":
        q = blocks[:, :, :512].reshape(ng, nb, 8, 16, 4).astype(np.int32) - 128  # [g, b, chunk, row, j]
        q = q.transpose(0, 3, 1, 2, 4).reshape(ng * 16, nb * 32)
    else:
        raw = blocks[:, :, :256].reshape(ng, nb, 4, 16, 4)
        lo, hi = raw & 0x0F, raw >> 4
        q = np.concatenate([lo, hi], axis=2).astype(np.int32)  # chunks 0-3 low nibbles, 4-7 high
        q = q.transpose(0, 3, 1, 2, 4).reshape(ng * 16, nb * 32) - 8
    d = scales.transpose(0, 2, 1).reshape(ng * 16, nb)
    return q[:n, :k], d[:n]


def _blocks(w):
    n, k = w.shape
    pad = -k % 32
    return np.pad(w, ((0, 0), (0, pad))).reshape(n, -1, 32)


@pytest.mark.parametrize("shape", [(16, 32), (37, 100), (64, 4096)])
def test_int8_matches_its_specification(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    packed = quantize_weight(w, "int8")
    q, d = _unpack(packed, "int8", *shape)
    b = _blocks(w)
    amax = np.abs(b).max(-1)
    expected_q = np.rint(b * (127 / amax)[..., None]).reshape(shape[0], -1)[:, :shape[1]]
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_array_equal(d, _fp16(amax / 127))
    np.testing.assert_array_equal(ops.dequantize(packed, 0, *shape), (np.repeat(d, 32, 1)[:, :shape[1]] * q))


@pytest.mark.parametrize("shape", [(16, 32), (37, 100), (64, 4096)])
def test_int4_layout_scale_search_and_error(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    packed = quantize_weight(w, "int4")
    q, d = _unpack(packed, "int4", *shape)
    assert q.min() >= -8 and q.max() <= 7
    deq = np.repeat(d, 32, 1)[:, :shape[1]] * q
    np.testing.assert_array_equal(ops.dequantize(packed, 1, *shape), deq)
    # llama.cpp's Q4_0 rule (d = max / -8, q = trunc(w / d + 8.5)) is one of the candidates, so the
    # searched scale is never worse per block, and clearly better overall.
    b = _blocks(w)
    m = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    d0 = _fp16(m / -8)
    q0 = np.clip(np.floor(b / np.where(d0 == 0, 1, d0)[..., None] + 8.5), 0, 15) - 8
    err_q40 = ((b - d0[..., None] * q0) ** 2).sum(-1)
    err_ours = ((b - _blocks(deq)) ** 2).sum(-1)
    assert np.all(err_ours <= err_q40 * (1 + 1e-5) + 1e-12)
    assert err_ours.sum() < 0.9 * err_q40.sum()
    assert np.sqrt(err_ours.sum() / (b ** 2).sum()) < 0.09  # Gaussian weights: ~0.08 relative RMS


def _int4_search_numpy(w):
    """The int4 scale search of csrc/quant.cpp (quantize_block_int4_ref) in NumPy float32, all
    blocks at once, every sum in k order: returns levels q - 8 [n, k] and fp16 scales [n, k/32]."""
    b = _blocks(w).astype(np.float32)  # [n, nb, 32]
    m = np.zeros(b.shape[:2], np.float32)
    sum_ww = np.zeros(b.shape[:2], np.float32)
    for k in range(32):
        x = b[..., k]
        m = np.where(np.abs(x) > np.abs(m), x, m)
        sum_ww = sum_ww + x * x
    best_err = np.full(m.shape, np.inf, np.float32)
    best_d = np.zeros(m.shape, np.float16)
    best_l = np.zeros(b.shape, np.float32)
    magic = np.float32(12582912.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(-9, 10):
            iscale = -(np.float32(8.0) + np.float32(0.1) * np.float32(step)) / m
            l = np.minimum(np.maximum((iscale[..., None] * b + magic) - magic, np.float32(-8)), np.float32(7))
            sum_lw = np.zeros(m.shape, np.float32)
            sum_ll = np.zeros(m.shape, np.float32)
            for k in range(32):
                sum_lw = sum_lw + l[..., k] * b[..., k]
                sum_ll = sum_ll + l[..., k] * l[..., k]
            dh = (sum_lw / sum_ll).astype(np.float16)
            dq = dh.astype(np.float32)
            err = (sum_ww - np.float32(2.0) * dq * sum_lw) + dq * dq * sum_ll
            take = (m != 0) & (sum_ll != 0) & (err < best_err)
            best_err = np.where(take, err, best_err)
            best_d = np.where(take, dh, best_d)
            best_l = np.where(take[..., None], l, best_l)
    n, k = w.shape
    return best_l.reshape(n, -1)[:, :k].astype(np.int32), best_d.astype(np.float32)


def _int4_hard_cases():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((53, 200)).astype(np.float32)  # 53 rows: a partial last group; K tail 8
    w[0] = rng.integers(-3, 4, 200)  # exact ties between candidate scales and between |max| values
    w[1, :32] = 0.0  # an all-zero block
    w[2] *= 1e-7  # scales below fp16's smallest normal (subnormal halves)
    w[3] *= 1e4
    w[4, :32] = np.tile([2.5, -2.5], 16)  # equal magnitudes, opposite signs: the first one wins
    w[5, 40:72] = np.linspace(-1, 1, 32)
    w[6, 64:96] = 1.0  # a constant block
    return w


def test_int4_reference_is_the_numpy_search():
    w = _int4_hard_cases()
    glm4rt.set_isa("generic")
    try:
        q, d = _unpack(quantize_weight(w, "int4"), "int4", *w.shape)
    finally:
        glm4rt.set_isa("auto")
    q_np, d_np = _int4_search_numpy(w)
    np.testing.assert_array_equal(d, d_np)
    np.testing.assert_array_equal(q, q_np)


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
def test_int4_quantizer_is_bitwise_the_reference_on_every_isa(isa):
    w = _int4_hard_cases()
    big = np.random.default_rng(12).standard_normal((64, 4096)).astype(np.float32)
    sources = [w, big, ops.f32_to_bf16(w)]
    glm4rt.set_isa("generic")
    try:
        expected = [quantize_weight(x, "int4") for x in sources]
        glm4rt.set_isa(isa)
        for x, e in zip(sources, expected):
            np.testing.assert_array_equal(quantize_weight(x, "int4"), e)
    finally:
        glm4rt.set_isa("auto")


def test_zero_and_padded_blocks():
    w = np.zeros((20, 40), np.float32)
    w[3, 5] = 1.5
    for fmt, fid in (("int8", 0), ("int4", 1)):
        deq = ops.dequantize(quantize_weight(w, fmt), fid, 20, 40)
        assert deq[3, 5] == pytest.approx(1.5, rel=1e-3) and np.count_nonzero(deq) == 1


def test_bf16_source_quantizes_like_its_fp32_widening():
    w = np.random.default_rng(2).standard_normal((48, 96)).astype(np.float32)
    bits = ops.f32_to_bf16(w)
    for fmt in FORMATS:
        np.testing.assert_array_equal(quantize_weight(bits, fmt), quantize_weight(ops.bf16_to_f32(bits), fmt))


def test_activation_quantization_spec():
    x = np.random.default_rng(3).standard_normal((3, 70)).astype(np.float32)
    q, s, sums = ops.quantize_acts(x)
    b = _blocks(x)
    amax = np.abs(b).max(-1)
    np.testing.assert_allclose(s, amax / 127, rtol=1e-7)
    np.testing.assert_array_equal(q.reshape(3, -1, 32), np.rint(b * (127 / amax)[..., None]))
    np.testing.assert_array_equal(sums, q.reshape(3, -1, 32).astype(np.int32).sum(-1))


# AMX shapes: a last block of 32 tokens with 16 (half tiles) or 17; 3 blocks of 32 + 6 across
# chunks of k (8 blocks each) with a k tail; over 512 tokens (2 token blocks); odd groups (N % 32 =
# 16, 1).
@pytest.mark.parametrize("isa", glm4rt.supported_isas())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m, k, n", [(1, 64, 16), (1, 100, 37), (2, 4096, 80), (7, 96, 40), (13, 320, 33),
                                     (70, 544, 48), (48, 64, 32), (49, 96, 33), (102, 600, 80),
                                     (530, 96, 16)])
def test_kernels_match_reference(isa, fmt, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    lin = QuantLinear(quantize_weight(w, fmt), fmt, n, k, bias)
    glm4rt.set_isa("generic")
    generic = lin(x)
    glm4rt.set_isa(isa)
    out = lin(x)
    amx = takes_amx_tiles(isa, m)
    ref = ref_qmatmul(x, lin.packed, fmt, n, amx) + bias
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=5e-7 * scale, rtol=0)  # measured <= 1.3e-7 of the scale
    if amx:  # the int8 activations of the other ISAs differ by their quantization error
        assert np.abs(out - generic).max() > 1e-4 * scale
    else:
        np.testing.assert_allclose(out, generic, atol=5e-7 * scale, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_thread_count_does_not_change_results(fmt):
    rng = np.random.default_rng(9)
    lin = QuantLinear(quantize_weight(rng.standard_normal((96, 256)).astype(np.float32), fmt), fmt, 96, 256)
    before = glm4rt.get_num_threads()
    try:
        xs = [rng.standard_normal((mm, 256)).astype(np.float32) for mm in (1, 9, 40)]
        outs = []
        for t in (1, 2):
            glm4rt.set_num_threads(t)
            outs.append([lin(x) for x in xs])
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
    finally:
        glm4rt.set_num_threads(before)


def test_bad_quantized_arguments():
    with pytest.raises(ValueError, match="unknown quantization"):
        packed_bytes("int3", 16, 32)
    with pytest.raises(ValueError, match="packed"):
        QuantLinear(np.zeros(10, np.uint8), "int4", 16, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.quantize_pack(np.zeros((16, 32), np.float32), 1, 64, 8, np.zeros(packed_bytes("int4", 64, 32), np.uint8))
    with pytest.raises(ValueError, match="quantization"):
        glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"), quantization="int2")


# ---- models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa1_official", "gqa2_nobias_tied_v5", "gqa8_bf16_sharded"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_save_and_mmap_load(tmp_path, name, fmt):
    g = golden(name)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), quantization=fmt)
    assert model.config.quantization_config["format"] == fmt
    logits = model(g["ids"]).logits
    model.save_pretrained(tmp_path)
    loaded = glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded(g["ids"]).logits, logits)
    packed = loaded.lm_head.packed
    base = packed
    while not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    assert isinstance(base, np.memmap) and not packed.flags.writeable  # used in place, not copied
    with pytest.raises(ValueError, match="already quantized"):
        glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path, quantization="int8" if fmt != "int8" else "int4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_saved_back_into_its_own_directory(tmp_path, fmt):
    """The loaded model reads its weights from the file's memory map while it writes the new file:
    written in place, the file was truncated under the map (OSError 'Bad address' halfway, and the
    checkpoint lost). The new file replaces the old one by a rename instead."""
    g = golden("gqa1_official")
    glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"), quantization=fmt).save_pretrained(tmp_path)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path)
    logits = model(g["ids"]).logits
    model.save_pretrained(tmp_path)
    np.testing.assert_array_equal(model(g["ids"]).logits, logits)
    np.testing.assert_array_equal(glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path)(g["ids"]).logits, logits)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary file left


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_a_file_that_cannot_be_memory_mapped_is_read(tmp_path, monkeypatch, caplog, fmt):
    """Where mmap fails (a file system without it, a 32-bit address space), the tensors are read
    into memory instead, with a warning: the same logits."""
    g = golden("gqa8_bf16_sharded")
    expected = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa8_bf16_sharded"), quantization=fmt)
    expected.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on a file system that cannot map

    monkeypatch.setattr(np, "memmap", refuse)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(model(g["ids"]).logits, expected(g["ids"]).logits)
    assert "cannot memory-map" in caplog.text
    assert not model.named_parameters()["lm_head.weight" if fmt is None else "lm_head.qweight"].flags.writeable


def test_streamed_quantization_equals_whole_matrix(monkeypatch):
    name = "gqa8_bf16_sharded"
    whole = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), quantization="int4")
    monkeypatch.setattr(loading, "QUANT_CHUNK_BYTES", 1)  # 16 rows at a time
    chunked = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), quantization="int4")
    a, b = whole.named_parameters(), chunked.named_parameters()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", ["gqa1_official", "gqa8_bf16_sharded", "generation"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_qkv_is_the_stacked_projections(name, fmt):
    """q, k, v quantized as one stacked matrix, streamed by 16-row groups (gqa1: 64 + 64 + 64 rows)
    or stacked in memory first where a part ends inside a group (gqa8: 64 + 8 + 8, generation:
    72 + 24 + 24)."""
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), quantization=fmt)
    plain = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name))
    for layer, plain_layer in zip(model.model.layers, plain.model.layers):
        assert isinstance(layer.self_attn.qkv_proj, QuantLinear)
        stacked = np.concatenate([part.weight for part in plain_layer.self_attn.qkv_proj.parts.values()])
        np.testing.assert_array_equal(layer.self_attn.qkv_proj.packed, quantize_weight(stacked, fmt))


def _scaled_random_model(seed=0):
    """A random model big enough for block statistics to be realistic (hidden 512), with weights
    scaled so activations are O(1) and logits spread over several units. The post-attention and
    post-MLP norms are small (0.15), so each layer adds a modest update to the residual stream as in
    a trained network; with unit post-norms a random network is chaotic and amplifies any error."""
    cfg = glm4rt.Glm4Config(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                            max_position_embeddings=512)
    model = glm4rt.Glm4ForCausalLM(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for name, arr in model.named_parameters().items():
        if name == "model.embed_tokens.weight":
            arr[:] = rng.standard_normal(arr.shape)
        elif arr.ndim == 2:
            arr[:] = rng.standard_normal(arr.shape) / np.sqrt(arr.shape[1]) * (4.0 if name == "lm_head.weight" else 1.0)
        elif name.endswith(("post_self_attn_layernorm.weight", "post_mlp_layernorm.weight")):
            arr[:] = 0.15 * (1.0 + 0.2 * rng.standard_normal(arr.shape))
        elif name.endswith("norm.weight"):
            arr[:] = 1.0 + 0.2 * rng.standard_normal(arr.shape)
        else:
            arr[:] = 0.1 * rng.standard_normal(arr.shape)
    return model


def _quality(ref_logits, logits):
    rel = np.sqrt(((logits - ref_logits) ** 2).mean() / (ref_logits ** 2).mean())
    p = np.exp(ref_logits - ref_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lq = logits - logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    lp = np.log(p)
    kl = (p * (lp - lq)).sum(-1).mean()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).mean()
    return rel, kl, top1


@pytest.mark.parametrize("fmt, max_rel, max_kl, min_top1", [("int8", 0.015, 0.001, 0.98), ("int4", 0.12, 0.08, 0.82)])
def test_quality_thresholds(tmp_path, fmt, max_rel, max_kl, min_top1):
    model = _scaled_random_model()
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 2048, size=(1, 300))
    ref = model(ids).logits[0]
    q = glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path, quantization=fmt)
    rel, kl, top1 = _quality(ref, q(ids).logits[0])
    assert rel < max_rel and kl < max_kl and top1 >= min_top1, (rel, kl, top1)


def _q4_0_dequantized(w):
    """llama.cpp's Q4_0 rule in NumPy (d = max / -8, q = trunc(w / d + 8.5) clipped to 0..15)."""
    b = _blocks(w)
    m = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    d = _fp16(m / -8)
    q = np.clip(np.floor(b / np.where(d == 0, 1, d)[..., None] + 8.5), 0, 15) - 8
    return (d[..., None] * q).reshape(w.shape[0], -1)[:, :w.shape[1]].astype(np.float32)


def test_int4_beats_q4_0_rule_at_the_same_bits(tmp_path):
    """Weight-only comparison on one model: every matrix replaced by its int4 dequantization vs
    its Q4_0 dequantization (4.5 bits per weight both); int4's logits are closer to fp32."""
    model = _scaled_random_model(seed=3)
    ids = np.random.default_rng(2).integers(0, 2048, size=(1, 200))
    ref = model(ids).logits[0]
    params = model.named_parameters()
    originals = {k: v.copy() for k, v in params.items() if v.ndim == 2 and k != "model.embed_tokens.weight"}
    errors = {}
    for rule in ("q4_0", "int4"):
        for k, w in originals.items():
            params[k][:] = _q4_0_dequantized(w) if rule == "q4_0" else ops.dequantize(quantize_weight(w, "int4"), 1, *w.shape)
        errors[rule] = _quality(ref, model(ids).logits[0])
    assert errors["int4"][0] < 0.95 * errors["q4_0"][0] and errors["int4"][1] < errors["q4_0"][1], errors


def test_cli_quantize(tmp_path):
    src = fixture_dir("gqa8_bf16_sharded")
    dst = tmp_path / "q4"
    r = subprocess.run(glm4rt_command("quantize", src, str(dst), "--format", "int4"), capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "int4" in r.stdout and os.path.exists(dst / "generation_config.json")
    g = golden("gqa8_bf16_sharded")
    expected = glm4rt.Glm4ForCausalLM.from_pretrained(src, quantization="int4")(g["ids"]).logits
    np.testing.assert_array_equal(glm4rt.Glm4ForCausalLM.from_pretrained(str(dst))(g["ids"]).logits, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_generation_for_every_prompt_length_on_every_isa(fmt):
    # Prompts of 1 to 40 tokens cross every token remainder of the quantized tiles (1-8 tokens
    # per tile) on the model's path: prefill, then decode through the cache. Each ISA's greedy
    # continuation and prompt logits equal those of the portable scalar kernels ("generic").
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"), quantization=fmt)
    ids = np.random.default_rng(4).integers(3, model.config.vocab_size, size=(1, 40))
    results = {}
    for isa in glm4rt.supported_isas():
        glm4rt.set_isa(isa)
        results[isa] = [(model.generate(ids[:, :n], max_new_tokens=4, do_sample=False, eos_token_id=[]),
                         model(ids[:, :n]).logits[0]) for n in range(1, 41)]
    for isa, runs in results.items():
        for n, ((tokens, logits), (ref_tokens, ref_logits)) in enumerate(zip(runs, results["generic"]), 1):
            assert tokens.shape == (1, n + 4)
            np.testing.assert_array_equal(tokens[:, :n], ids[:, :n])
            amx = takes_amx_tiles(isa, n)  # bf16 activations, not int8: other rounding
            # (measured on a Xeon with AMX at 40 tokens: <= 0.024 of the largest logit, the int8
            # activations' error on the generic side)
            np.testing.assert_allclose(logits, ref_logits, atol=0.03 * np.abs(ref_logits).max() if amx else 1e-5,
                                       rtol=0, err_msg=f"{isa}, {n} tokens")
            if not amx:
                np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{isa}, {n} tokens")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("n, k", [(37, 1031), (16, 32), (5, 7), (48, 64)])
def test_codes_pack_without_rounding_again(fmt, n, k):
    """pack_codes: weights quantized elsewhere (llama.cpp's Q8_0 / Q4_0 blocks) keep their values
    (the format's dequantizer gives d * q back exactly) and the kernels multiply them as such."""
    from glm4rt.quant import CODE_RANGE, format_id, pack_codes

    rng = np.random.default_rng(n * k)
    lo, hi = CODE_RANGE[fmt]
    codes = rng.integers(lo, hi + 1, (n, k))
    d = (rng.standard_normal((n, -(-k // 32))) * 0.01).astype(np.float16)
    packed = pack_codes(codes, d, fmt)
    expected = np.repeat(d.astype(np.float32), 32, axis=1)[:, :k] * (codes - (8 if fmt == "int4" else 0))
    np.testing.assert_array_equal(ops.dequantize(packed, format_id(fmt), n, k), expected)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = QuantLinear(packed, fmt, n, k)(x)
    np.testing.assert_allclose(got, ref_qmatmul(x, packed, fmt, n), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="codes must be in"):
        pack_codes(np.full((n, k), lo - 1), d, fmt)
    with pytest.raises(ValueError, match="scales must be"):
        pack_codes(codes, d[:, :-1] if d.shape[1] > 1 else d[:-1], fmt)
