"""The q4k format (csrc/quant.h): its byte layout read with NumPy, its quantizer against the
documented procedure, pack_q4k, importance weighting and its error next to int4's. The kernels of
every ISA are checked with the other formats (test_quant, test_kernel_sweep, test_batch_invariance)."""
import numpy as np
import pytest

import glm4rt
from glm4rt import ops
from glm4rt.quant import QuantLinear, format_id, pack_q4k, quantize_weight
from kernel_reference import ref_qmatmul

Q4K = format_id("q4k")


def _unpack_q4k(packed, n, k):
    """codes [n, k], sc / mn [n, nb], D / M [n, ns] (float32) from the documented layout: per group
    of 16 rows nb blocks of (256 code bytes, 16 sc, 16 mn), then ns headers of (16 fp16 D, 16 fp16 M)."""
    nb, ng = -(-k // 32), -(-n // 16)
    ns = -(-nb // 8)
    groups = packed.reshape(ng, nb * 288 + ns * 64)
    blocks = groups[:, :nb * 288].reshape(ng, nb, 288)
    raw = blocks[:, :, :256].reshape(ng, nb, 4, 16, 4)  # [g, b, chunk, row, byte]
    q = np.concatenate([raw & 0x0F, raw >> 4], axis=2).astype(np.int32)  # chunks 0-3: k 0-15, then 16-31
    codes = q.transpose(0, 3, 1, 2, 4).reshape(ng * 16, nb * 32)[:n, :k]
    sc = blocks[:, :, 256:272].transpose(0, 2, 1).reshape(ng * 16, nb)[:n].astype(np.int32)
    mn = blocks[:, :, 272:288].transpose(0, 2, 1).reshape(ng * 16, nb)[:n].astype(np.int32)
    heads = groups[:, nb * 288:].reshape(ng, ns, 2, 16, 2).copy().view(np.float16)[..., 0]  # [g, s, D|M, row]
    heads = heads.astype(np.float32).transpose(2, 0, 3, 1).reshape(2, ng * 16, ns)[:, :n]
    return codes, sc, mn, heads[0], heads[1]


def _dequantized(codes, sc, mn, d, m):
    """The format's value of every weight: (D sc) q - M mn in float32 (D sc and M mn are exact)."""
    k = codes.shape[1]
    scale = (np.repeat(d, 8, axis=1)[:, :sc.shape[1]] * sc).astype(np.float32)
    offset = (np.repeat(m, 8, axis=1)[:, :mn.shape[1]] * mn).astype(np.float32)
    return np.repeat(scale, 32, axis=1)[:, :k] * codes.astype(np.float32) - np.repeat(offset, 32, axis=1)[:, :k]


def _hard_cases():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((37, 704)).astype(np.float32)  # 22 blocks: super-blocks of 8, 8 and 6
    w[0] = 0.0                                  # a zero row
    w[1, :32] = -0.25                           # a constant negative block: w = offset exactly
    w[2, 32:64] = 3.0                           # a constant positive block
    w[3] *= 1e-6                                # tiny weights (subnormal fp16 scales)
    w[4, 100] = 40.0                            # an outlier
    w[5] = np.abs(w[5])                         # no negative weight
    return w


@pytest.mark.parametrize("k", [7, 32, 100, 256, 704, 1031])
def test_layout_and_dequantization(k):
    w = np.random.default_rng(k).standard_normal((21, k)).astype(np.float32)
    packed = quantize_weight(w, "q4k")
    assert packed.size * 8 / (32 * 21 * -(-k // 32)) >= 4.5  # 4.625 bits per weight with full super-blocks
    parts = _unpack_q4k(packed, 21, k)
    np.testing.assert_array_equal(ops.dequantize(packed, Q4K, 21, k), _dequantized(*parts))
    repacked = pack_q4k(*parts[:3], parts[3].astype(np.float16), parts[4].astype(np.float16))
    if k % 32 == 0:
        np.testing.assert_array_equal(repacked, packed)
    else:  # the quantizer's codes for the padding past K (which multiply zeros) are not pack_q4k's 0
        np.testing.assert_array_equal(ops.dequantize(repacked, Q4K, 21, k), ops.dequantize(packed, Q4K, 21, k))


def test_quantizer_follows_its_definition():
    """Every code is the nearest of its final grid; D and M are the fp16 of the largest block scale
    and offset over 255, so each row's largest sub-scale is (about) 255."""
    w = _hard_cases()
    codes, sc, mn, d, m = _unpack_q4k(quantize_weight(w, "q4k"), *w.shape)
    scale = np.repeat(np.repeat(d, 8, axis=1)[:, :sc.shape[1]] * sc, 32, axis=1)[:, :w.shape[1]].astype(np.float32)
    offset = np.repeat(np.repeat(m, 8, axis=1)[:, :mn.shape[1]] * mn, 32, axis=1)[:, :w.shape[1]].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest = np.where(scale > 0, np.clip(np.rint((w + offset) / scale), 0, 15), 0)
    np.testing.assert_array_equal(codes, nearest)
    for s in range(d.shape[1]):
        cols = slice(8 * s, 8 * s + 8)
        live = d[:, s] > 0
        assert (sc[live, cols].max(1) >= 254).all()
        assert (mn[m[:, s] > 0, cols].max(1) >= 254).all()
    deq = ops.dequantize(quantize_weight(w, "q4k"), Q4K, *w.shape)
    assert not deq[0].any()
    # within the rounding of the 8-bit sub-scales: half a step of M (offset) and of 15 D (scale)
    np.testing.assert_allclose(deq[1, :32], -0.25, atol=m[1, 0] / 2 * 1.001, rtol=0)
    np.testing.assert_allclose(deq[2, 32:64], 3.0, atol=(15 * d[2, 0] + m[2, 0]) / 2 * 1.001, rtol=0)
    assert abs(deq[4, 100] - 40.0) <= scale[4, 100] / 2 + m[4, 0] / 2  # the outlier: on its block's grid
    assert np.isfinite(deq).all()


def _fit_numpy(w, v):
    """The documented block fit (quant.h, q4k_block_fit_ref) in float64: [rows, 32] -> s, o."""
    lo = np.minimum(w.min(1), 0)
    rng_ = w.max(1) - lo
    best = np.full(len(w), np.inf)
    s_out, o_out = np.zeros(len(w)), lo.copy()
    sw, swx = v.sum(1), (v * w).sum(1)
    for step in range(21):
        with np.errstate(divide="ignore", invalid="ignore"):
            l = np.clip(np.rint((w - lo[:, None]) * ((14 + 0.1 * step) / rng_)[:, None]), 0, 15)
        swl, swll, swlx = (v * l).sum(1), (v * l * l).sum(1), (v * l * w).sum(1)
        det = sw * swll - swl * swl
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sw * swlx - swl * swx) / det
            o = (swll * swx - swl * swlx) / det
            refit = ~(det > 0) | (o > 0)
            s = np.where(refit, swlx / swll, s)
        o = np.where(refit, 0, o)
        s = np.maximum(s, 0)
        err = (v * (s[:, None] * l + o[:, None] - w) ** 2).sum(1)
        better = (swll > 0) & (err < best)
        best, s_out, o_out = np.where(better, err, best), np.where(better, s, s_out), np.where(better, o, o_out)
    return s_out, o_out


def test_block_fit_is_the_documented_least_squares_search():
    """The sub-scales (sc, mn) are the fitted s and -o rounded on the row's D and M; compared with
    an independent float64 reading of the fit (float32 sums may pick a neighbouring grid now and then)."""
    w = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    v = np.random.default_rng(4).uniform(0.1, 3.0, 256).astype(np.float32)
    for importance in (None, v):
        _, sc, mn, d, m = _unpack_q4k(quantize_weight(w, "q4k", importance), *w.shape)
        vv = np.ones(256) if importance is None else importance.astype(np.float64)
        s, o = _fit_numpy(w.reshape(-1, 32).astype(np.float64), np.tile(vv.reshape(8, 32), (64, 1)))
        s, o = s.reshape(64, 8), o.reshape(64, 8)
        agree_sc = np.abs(sc - np.rint(s / d)) <= 0
        agree_mn = np.abs(mn - np.rint(-o / m)) <= 0
        assert agree_sc.mean() > 0.97 and agree_mn.mean() > 0.97, (agree_sc.mean(), agree_mn.mean())


def test_error_below_int4_and_importance_weighting_helps():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((128, 512)) * rng.uniform(0.5, 2.0, (128, 1))).astype(np.float32)
    w += 0.3 * rng.standard_normal((128, 1)).astype(np.float32)  # rows with an offset, as trained weights have
    err = {f: np.mean((ops.dequantize(quantize_weight(w, f), format_id(f), *w.shape) - w) ** 2) for f in ("int4", "q4k")}
    assert err["q4k"] < 0.8 * err["int4"], err
    v = np.exp(rng.standard_normal(512) * 1.5).astype(np.float32)  # a few features matter much more
    weighted = {}
    for name, imp in (("plain", None), ("weighted", v)):
        deq = ops.dequantize(quantize_weight(w, "q4k", imp), Q4K, *w.shape)
        weighted[name] = np.mean(v * (deq - w) ** 2)
    assert weighted["weighted"] < 0.9 * weighted["plain"], weighted


@pytest.mark.parametrize("n, k", [(37, 1031), (16, 32), (5, 7), (48, 704)])
def test_pack_q4k_keeps_values_and_checks_them(n, k):
    rng = np.random.default_rng(n + k)
    nb = -(-k // 32)
    ns = -(-nb // 8)
    codes = rng.integers(0, 16, (n, k))
    sc, mn = rng.integers(0, 256, (n, nb)), rng.integers(0, 256, (n, nb))
    d, m = (rng.uniform(0, 0.01, (n, ns))).astype(np.float16), (rng.uniform(0, 0.01, (n, ns))).astype(np.float16)
    packed = pack_q4k(codes, sc, mn, d, m)
    expected = _dequantized(codes, sc, mn, d.astype(np.float32), m.astype(np.float32))
    np.testing.assert_array_equal(ops.dequantize(packed, Q4K, n, k), expected)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(QuantLinear(packed, "q4k", n, k)(x), ref_qmatmul(x, packed, "q4k", n), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="codes must be in"):
        pack_q4k(codes + 16, sc, mn, d, m)
    with pytest.raises(ValueError, match="sc must be"):
        pack_q4k(codes, sc + 256, mn, d, m)
    with pytest.raises(ValueError, match="m must be"):
        pack_q4k(codes, sc, mn, d, m[:, :0])


def test_bad_importance_is_refused():
    w = np.ones((16, 64), np.float32)
    with pytest.raises(ValueError, match="importance"):
        quantize_weight(w, "q4k", np.ones(63, np.float32))
    with pytest.raises(ValueError, match="importance"):
        quantize_weight(w, "q4k", -np.ones(64, np.float32))
    with pytest.raises(ValueError, match="importance"):
        quantize_weight(w, "q4k", np.full(64, np.nan, np.float32))
    with pytest.raises(ValueError, match="q4k only"):
        quantize_weight(w, "int4", np.ones(64, np.float32))


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
def test_quantizer_is_bitwise_the_reference_on_every_isa(isa):
    """The SIMD twin (AVX-512: one row per lane) writes the specification's bytes, with and
    without importance, for the hard cases, a bf16 source and a long row."""
    w = _hard_cases()
    big = np.random.default_rng(12).standard_normal((64, 4096)).astype(np.float32)
    imp = np.random.default_rng(13).uniform(0.0, 4.0, 704).astype(np.float32)
    imp[::7] = 0.0
    cases = [(w, None), (w, imp), (big, None), (ops.f32_to_bf16(w), imp)]
    glm4rt.set_isa("generic")
    try:
        expected = [quantize_weight(x, "q4k", i) for x, i in cases]
        glm4rt.set_isa(isa)
        for (x, i), e in zip(cases, expected):
            np.testing.assert_array_equal(quantize_weight(x, "q4k", i), e)
    finally:
        glm4rt.set_isa("auto")
