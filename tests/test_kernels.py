"""The C++ kernels (glm4rt.ops) against float64 NumPy references, on every ISA this CPU runs.

Each reference below is written from the documented semantics (ops.py / csrc/ops.h) and never
calls glm4rt. Every kernel is also compared with the "generic" ISA, checked for bitwise
independence from the thread count where it is parallel, and fed bad arguments that must raise
ValueError naming the argument.
"""
import threading
import time

import numpy as np
import pytest

import glm4rt
from glm4rt import ops
from helpers import round_bf16, widen_bf16
from kernel_reference import BF16_DOT_ISAS, ref_linear

ISAS = glm4rt.supported_isas()


# ---------------------------------------------------------------------------------------------
# Independent references (float64)
# ---------------------------------------------------------------------------------------------

def ref_rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    return w.astype(np.float64) * x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)


def rope_inv_freq(rot_dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)).astype(np.float32)


def rope_angles(positions, inv_freq):
    # The documented angle is float(pos) * inv_freq rounded once to fp32 (as transformers computes
    # it); cos/sin and the rotation itself are then evaluated in float64.
    ang32 = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    assert ang32.dtype == np.float32
    return ang32.astype(np.float64)


def ref_rotary_interleaved(x, positions, inv_freq, rot_dim):
    y = x.astype(np.float64).copy()
    ang = rope_angles(positions, inv_freq)[:, None, :]  # [T, 1, R/2]
    c, s = np.cos(ang), np.sin(ang)
    x0 = y[..., 0:rot_dim:2].copy()
    x1 = y[..., 1:rot_dim:2].copy()
    y[..., 0:rot_dim:2] = x0 * c - x1 * s
    y[..., 1:rot_dim:2] = x1 * c + x0 * s
    return y


def ref_rotary_neox(x, positions, inv_freq, rot_dim):
    """The *wrong* layout for GLM (halves instead of adjacent pairs), used as a negative control."""
    y = x.astype(np.float64).copy()
    ang = rope_angles(positions, inv_freq)[:, None, :]
    c, s = np.cos(ang), np.sin(ang)
    h = rot_dim // 2
    x0 = y[..., :h].copy()
    x1 = y[..., h:rot_dim].copy()
    y[..., :h] = x0 * c - x1 * s
    y[..., h:rot_dim] = x1 * c + x0 * s
    return y


def ref_silu_mul(gate_up):
    g64 = gate_up.astype(np.float64)
    n = g64.shape[1] // 2
    gate, up = g64[:, :n], g64[:, n:]
    # numerically stable silu: g * sigmoid(g)
    e = np.exp(-np.abs(gate))
    sig = np.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return up * gate * sig


def ref_attention(q, k, v, n_keys, q_pos, key_mask, scale):
    B, T, H, d = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    out = np.zeros((B, T, H, d))
    probs = np.zeros((B, H, T, n_keys))
    q64, k64, v64 = q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)
    for b in range(B):
        for t in range(T):
            vis = np.arange(n_keys) <= q_pos[t]
            if key_mask is not None:
                vis &= key_mask[b] != 0
            if not vis.any():
                continue  # no visible key: zeros
            idx = np.nonzero(vis)[0]
            for h in range(H):
                g = h // group
                sc = k64[b, g, idx] @ q64[b, t, h] * scale
                p = np.exp(sc - sc.max())
                p /= p.sum()
                probs[b, h, t, idx] = p
                out[b, t, h] = p @ v64[b, g, idx]
    return out, probs


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class num_threads:
    """Context manager: run with n kernel threads, then restore the previous setting."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = ops.get_num_threads()
        ops.set_num_threads(self.n)

    def __exit__(self, *exc):
        ops.set_num_threads(self.prev)


def on_isa(isa, fn):
    ops.set_isa(isa)
    assert ops.cpu_isa() == isa
    return fn()


# ---------------------------------------------------------------------------------------------
# ISA selection and bf16 helpers
# ---------------------------------------------------------------------------------------------

def test_supported_isas_and_set_isa():
    assert ISAS[0] == "generic"
    assert set(ISAS) <= {"generic", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx"} or \
        set(ISAS) <= {"generic", "neon", "dotprod", "i8mm", "bf16"}  # x86-64 or ARM64
    for isa in ISAS:
        ops.set_isa(isa)
        assert ops.cpu_isa() == isa
    ops.set_isa("auto")
    assert ops.cpu_isa() == ISAS[-1]


def test_bf16_helpers_round_to_nearest_even():
    one = 1.0
    vals = np.array([one, one + 2.0 ** -8, one + 3 * 2.0 ** -8, one + 2.0 ** -8 + 2.0 ** -20,
                     -2.5, 0.0, np.inf, -np.inf], dtype=np.float32)
    # 1+2^-8 is a tie between 1 and 1+2^-7 -> even (1); 1+3*2^-8 ties -> 1+2^-6 (even mantissa);
    # just above the tie rounds up.
    expect = np.array([1.0, 1.0, 1.0 + 2.0 ** -6, 1.0 + 2.0 ** -7, -2.5, 0.0, np.inf, -np.inf])
    bits = ops.f32_to_bf16(vals)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(widen_bf16(bits), expect)
    np.testing.assert_array_equal(ops.bf16_to_f32(bits).astype(np.float64), expect)
    nan_bits = ops.f32_to_bf16(np.array([np.nan], dtype=np.float32))
    assert np.isnan(widen_bf16(nan_bits)).all()
    x = f32(np.random.default_rng(0), 1000)
    r = widen_bf16(ops.f32_to_bf16(x))
    assert np.all(np.abs(r - x) <= np.abs(x) * 2.0 ** -8)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

# (M, K, N): GEMV and GEMM across the 64-token block, K tails (not multiples of 8/16), K over
# one and two 512-wide k blocks, N not a multiple of the 4-row tile; the bf16 panel GEMM
# (AVX512-BF16, 12 tokens x 32 rows, 1024 pairs of k per block) and the fp32 panel GEMM (AVX2,
# 6 tokens x 16 rows, 384 k per block, 192-token blocks; from 16 tokens on) with their tails.
LINEAR_SHAPES = [
    (1, 1003, 37),   # GEMV, 2 k-blocks, K % 16 = 11
    (1, 7, 5),       # K shorter than any SIMD width
    (3, 16, 4),      # exact tiles
    (65, 520, 9),    # one row over a token block, k tail of 8
    (130, 1027, 67), # 3 token blocks (64, 64, 2), 3 k-blocks, N % 4 = 3
    (1, 9000, 6),    # GEMV over long rows (bf16: 4 rows at a time), K % 128 = 40
    (40, 2100, 70),  # bf16 panels: 4 token chunks (12, 12, 12, 4), 2 pair blocks (1024, 26),
                     # 2 full 32-row panels + 6 rows
    (1050, 71, 40),  # bf16 panels: 88 chunks in 3 token blocks (43, 43, 2), odd K, 32 + 8 rows
    (200, 430, 33),  # fp32 panels: token blocks (192, 8), tiles of 6 with a tail of 2,
                     # k blocks (384, 46) with a pack tail of 6, 2 full 16-row panels + 1 row
    (16, 8, 16),     # fp32 panels: the fewest tokens, one k block of 8, one full panel
]


def _linear_case(rng, M, K, N, wdtype, with_bias):
    x = f32(rng, M, K)
    w32 = f32(rng, N, K)
    w = ops.f32_to_bf16(w32) if wdtype == "bf16" else w32
    bias = f32(rng, N) if with_bias else None
    return x, w, bias


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
def test_linear_matches_reference(isa, wdtype, with_bias, M, K, N):
    rng = np.random.default_rng(M * 100003 + K * 7 + N)
    x, w, bias = _linear_case(rng, M, K, N, wdtype, with_bias)
    assert w.dtype == (np.uint16 if wdtype == "bf16" else np.float32)
    ref = ref_linear(x, w, bias)
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(K))

    out = np.full((M, N), np.nan, dtype=np.float32)
    ret = on_isa(isa, lambda: ops.linear(x, w, bias, out=out))
    assert ret is out
    assert out.dtype == np.float32 and out.shape == (M, N)
    np.testing.assert_allclose(out, ref, **tol)

    y_alloc = ops.linear(x, w, bias)  # out=None path, same ISA: same bits
    np.testing.assert_array_equal(y_alloc, out)

    y_generic = on_isa("generic", lambda: ops.linear(x, w, bias))
    np.testing.assert_allclose(out, y_generic, **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 5, 70])  # gemv, dot-form tiles, panels (bf16 or fp32)
def test_linear_bf16_is_fp32_on_rounded_inputs(isa, M):
    # bf16 weights take bf16-rounded activations: the same products as the fp32 path on the
    # rounded x and the widened weights. Without bf16 dot products it is that very computation
    # (bitwise); vdpbf16ps and BFDOT sum in another order (BFDOT: rounded to odd).
    rng = np.random.default_rng(5)
    x = f32(rng, M, 600)
    bits = ops.f32_to_bf16(f32(rng, 70, 600))
    ops.set_isa(isa)
    y_bf16 = ops.linear(x, bits)
    y_f32 = ops.linear(round_bf16(x).astype(np.float32), widen_bf16(bits).astype(np.float32))
    if isa in BF16_DOT_ISAS:
        np.testing.assert_allclose(y_bf16, y_f32, rtol=1e-5, atol=1e-5 * np.sqrt(600))
    else:
        np.testing.assert_array_equal(y_bf16, y_f32)
    assert np.abs(y_bf16 - ref_linear(x, widen_bf16(bits).astype(np.float32))).max() > 1e-3  # rounding shows


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,N", [(16, 64, 96), (40, 64, 160), (64, 288, 256), (48, 2080, 256),
                                   (288, 288, 256)])
def test_amx_sees_freshly_packed_tiles(threads, M, K, N):
    # AMX: panels of 32 weight rows are packed into two alternating buffers while the tile unit
    # works on the other, so a slip in that bookkeeping hands a panel another panel's rows (3 or
    # more panels per thread here; 1 or 2 spans of k: spans of 64 k blocks up to 256 tokens, of 8
    # beyond). Runs on every ISA.
    rng = np.random.default_rng(M + K + N)
    x, w, _ = _linear_case(rng, M, K, N, "bf16", False)
    with num_threads(threads):
        for isa in ISAS:
            ops.set_isa(isa)
            np.testing.assert_allclose(ops.linear(x, w), ref_linear(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(K),
                                       err_msg=isa)


def test_bf16_rounding_of_activations_is_nearest_even_everywhere():
    # Halfway cases, a value near the fp32 maximum and a denormal in x; the weights are the
    # identity, so y shows each rounded activation.
    # 1 row (dot forms) and 40 (panel forms, AMX tiles).
    row = np.array([[1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.0e38, 1e-40, 2.5]], np.float32)
    K = row.shape[1]
    w = ops.f32_to_bf16(np.eye(K, dtype=np.float32))
    for x in (row, np.repeat(row, 40, axis=0)):
        expected = round_bf16(x)
        for isa in ISAS:
            ops.set_isa(isa)
            y = ops.linear(x, w)
            if isa in BF16_DOT_ISAS:  # vdpbf16ps, the tile unit and BFDOT flush denormal inputs to zero
                expected_isa = expected.copy()
                expected_isa[:, 4] = 0.0
                np.testing.assert_array_equal(y, expected_isa, err_msg=isa)
            else:
                np.testing.assert_array_equal(y, expected, err_msg=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
def test_linear_thread_count_is_bitwise_irrelevant(isa, wdtype):
    rng = np.random.default_rng(11)
    x, w, bias = _linear_case(rng, 130, 1027, 67, wdtype, True)
    ops.set_isa(isa)
    results = []
    for n in (1, 2):
        with num_threads(n):
            assert ops.get_num_threads() == n
            results.append(ops.linear(x, w, bias))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], ref_linear(x, w, bias), rtol=1e-5, atol=1e-5 * np.sqrt(1027))


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,H", [(1, 37), (7, 1000), (40, 1027)])
def test_rms_norm_matches_reference(isa, M, H):
    rng = np.random.default_rng(M + H)
    x = f32(rng, M, H, scale=3.0)
    w = f32(rng, H)
    eps = 1e-5
    ref = ref_rms_norm(x, w, eps)
    out = np.full_like(x, np.nan)
    ret = on_isa(isa, lambda: ops.rms_norm(x, w, eps, out=out))
    assert ret is out
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, on_isa("generic", lambda: ops.rms_norm(x, w, eps)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_rms_norm_in_place_and_eps(isa):
    rng = np.random.default_rng(3)
    x = f32(rng, 9, 129)
    w = f32(rng, 129)
    ref = ref_rms_norm(x, w, 1e-6)
    ops.set_isa(isa)
    y = x.copy()
    ret = ops.rms_norm(y, w, 1e-6, out=y)  # out aliases x
    assert ret is y
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # eps matters for tiny inputs: x = 1e-3 everywhere, eps = 1e-6 -> 1e-3 / sqrt(2e-6)
    small = np.full((2, 16), 1e-3, dtype=np.float32)
    ones = np.ones(16, dtype=np.float32)
    np.testing.assert_allclose(ops.rms_norm(small, ones, 1e-6), ref_rms_norm(small, ones, 1e-6), rtol=1e-5)
    np.testing.assert_allclose(ops.rms_norm(small, ones, 1e-6), 1e-3 / np.sqrt(2e-6), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# rotary_
# ---------------------------------------------------------------------------------------------

ROPE_POSITIONS = np.array([0, 1, 2, 17, 511, 4095, 65535, 99999, 100000], dtype=np.int64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_heads,head_dim,rot_dim", [(3, 128, 64), (2, 64, 64), (4, 10, 6), (2, 8, 0)])
def test_rotary_interleaved_matches_reference(isa, n_heads, head_dim, rot_dim):
    rng = np.random.default_rng(head_dim + rot_dim)
    pos = ROPE_POSITIONS
    x = f32(rng, len(pos), n_heads, head_dim)
    inv_freq = rope_inv_freq(rot_dim)
    assert inv_freq.shape == (rot_dim // 2,)
    ref = ref_rotary_interleaved(x, pos, inv_freq, rot_dim)

    y = x.copy()
    ret = on_isa(isa, lambda: ops.rotary_(y, pos, inv_freq, rot_dim))
    assert ret is y  # in place
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., rot_dim:], x[..., rot_dim:])  # pass-through dims untouched
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity (cos 1, sin 0)
    # rotations preserve the norm of every pair
    pairs = y[..., :rot_dim].astype(np.float64).reshape(len(pos), n_heads, -1, 2)
    pairs0 = x[..., :rot_dim].astype(np.float64).reshape(len(pos), n_heads, -1, 2)
    np.testing.assert_allclose(np.hypot(pairs[..., 0], pairs[..., 1]),
                               np.hypot(pairs0[..., 0], pairs0[..., 1]), rtol=1e-5, atol=1e-6)

    y_generic = x.copy()
    on_isa("generic", lambda: ops.rotary_(y_generic, pos, inv_freq, rot_dim))
    np.testing.assert_allclose(y, y_generic, rtol=1e-5, atol=1e-5)

    if rot_dim >= 4:
        # negative control: the NeoX half-split layout must NOT match
        neox = ref_rotary_neox(x, pos, inv_freq, rot_dim)
        assert not np.allclose(y, neox, rtol=1e-3, atol=1e-3)
        assert not np.allclose(ref, neox, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("isa", ISAS)
def test_rotary_many_tokens_threads(isa):
    rng = np.random.default_rng(21)
    pos = rng.integers(0, 100001, size=300).astype(np.int64)
    x = f32(rng, 300, 4, 64)  # above the parallel threshold
    inv_freq = rope_inv_freq(32, theta=500000.0)
    ref = ref_rotary_interleaved(x, pos, inv_freq, 32)
    ops.set_isa(isa)
    ys = []
    for n in (1, 2):
        with num_threads(n):
            y = x.copy()
            ops.rotary_(y, pos, inv_freq, 32)
            ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_allclose(ys[0], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# silu_mul
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,I", [(1, 13), (5, 64), (70, 600)])
def test_silu_mul_matches_reference(isa, M, I):
    rng = np.random.default_rng(M * 31 + I)
    gate_up = f32(rng, M, 2 * I, scale=3.0)
    gate_up[0, :4] = [-100.0, -1000.0, 40.0, 0.0]  # saturation both ways, and silu(0) = 0
    ref = ref_silu_mul(gate_up)
    out = np.full((M, I), np.nan, dtype=np.float32)
    ret = on_isa(isa, lambda: ops.silu_mul(gate_up, out=out))
    assert ret is out
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # first half is the gate, second half "up": swapping them must change the result
    swapped = np.concatenate([gate_up[:, I:], gate_up[:, :I]], axis=1)
    assert not np.allclose(ref_silu_mul(swapped), out, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out, on_isa("generic", lambda: ops.silu_mul(gate_up)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _attention_case(rng, B, T, n_h, n_kv, d, cap, n_keys, q_pos, mask_zeros=None):
    q = f32(rng, B, T, n_h, d)
    k = f32(rng, B, n_kv, cap, d)
    v = f32(rng, B, n_kv, cap, d)
    k[:, :, n_keys:] = np.nan  # rows past n_keys are unused cache capacity: never read
    v[:, :, n_keys:] = np.nan
    q_pos = np.asarray(q_pos, dtype=np.int64)
    key_mask = None
    if mask_zeros is not None:
        key_mask = np.ones((B, n_keys), dtype=np.uint8)
        for b, cols in mask_zeros.items():
            key_mask[b, cols] = 0
    return q, k, v, q_pos, key_mask


def _run_attention(q, k, v, n_keys, q_pos, key_mask, scale):
    B, T, H, d = q.shape
    out = np.full((B, T, H, d), np.nan, dtype=np.float32)
    probs = np.full((B, H, T, n_keys), np.nan, dtype=np.float32)
    ret = ops.attention(q, k, v, n_keys, q_pos, key_mask, scale, out=out, probs=probs)
    assert ret is out
    return out, probs


ATTN_CASES = {
    # name: (B, T, n_heads, n_kv_heads, head_dim, capacity, n_keys, q_pos, mask zeros per batch)
    "mha_prefill_padding": (2, 5, 4, 4, 64, 20, 12, [7, 8, 9, 10, 11],
                            {0: [2, 3], 1: slice(0, 9)}),  # batch 1: q_pos 7, 8 see no key
    "gqa2_tail_dim": (2, 6, 8, 4, 40, 16, 11, [5, 6, 7, 8, 9, 10], {1: [0, 6, 10]}),
    "gqa16_odd_dim": (1, 4, 16, 1, 20, 33, 30, [0, 10, 29, 3], {0: [1, 2, 29]}),
    "gqa16_no_mask": (2, 3, 16, 1, 64, 40, 37, [36, 12, 0], None),
    "decode_gqa2": (3, 1, 4, 2, 64, 50, 41, [40], {0: [0, 1, 2], 2: [40]}),
    "decode_gqa16_no_mask": (1, 1, 32, 2, 128, 70, 64, [63], None),
    "all_padding_batch": (2, 2, 2, 1, 16, 8, 6, [4, 5], {1: slice(None)}),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attention_matches_reference(isa, case):
    B, T, n_h, n_kv, d, cap, n_keys, q_pos, zeros = ATTN_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    q, k, v, q_pos, key_mask = _attention_case(rng, B, T, n_h, n_kv, d, cap, n_keys, q_pos, zeros)
    scale = d ** -0.5
    ref_out, ref_probs = ref_attention(q, k, v, n_keys, q_pos, key_mask, scale)
    out, probs = on_isa(isa, lambda: _run_attention(q, k, v, n_keys, q_pos, key_mask, scale))

    assert np.isfinite(out).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)

    # structural checks independent of the reference
    vis = np.arange(n_keys)[None, None, :] <= q_pos[None, :, None]  # [1, T, S]
    if key_mask is not None:
        vis = vis & (key_mask[:, None, :] != 0)  # [B, T, S]
    vis = np.broadcast_to(vis, (B, T, n_keys))
    pt = probs.transpose(0, 2, 1, 3)  # [B, T, H, S]
    assert np.all(pt[np.broadcast_to(~vis[:, :, None, :], pt.shape)] == 0.0)  # invisible: exactly 0
    any_vis = vis.any(-1)  # [B, T]
    sums = probs.astype(np.float64).sum(-1).transpose(0, 2, 1)  # [B, T, H]
    np.testing.assert_allclose(sums[any_vis], 1.0, rtol=1e-5)
    assert np.all(out[~any_vis] == 0.0)  # queries that see no key: zeros
    assert np.all(sums[~any_vis] == 0.0)
    if case == "mha_prefill_padding":
        assert (~any_vis).sum() == 2  # the case really contains blind queries
    if case == "all_padding_batch":
        assert not any_vis[1].any() and any_vis[0].all()

    out_g, probs_g = on_isa("generic", lambda: _run_attention(q, k, v, n_keys, q_pos, key_mask, scale))
    np.testing.assert_allclose(out, out_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, probs_g, rtol=1e-5, atol=1e-6)

    # Without probs, the same bits (several tokens), or the decode kernel's online softmax (one
    # token: the same values up to rounding).
    ops.set_isa(isa)
    out2 = ops.attention(q, k, v, n_keys, q_pos, key_mask, scale)
    if T > 1:
        np.testing.assert_array_equal(out2, out)
    else:
        np.testing.assert_allclose(out2, ref_out, rtol=1e-5, atol=1e-5)
        assert np.all(out2[~any_vis] == 0.0)


def _attention_on_1_and_2_threads(q, k, v, n_keys, q_pos, key_mask, scale):
    """ops.attention (no probabilities) with 1 and then 2 kernel threads: [out_1, out_2]."""
    outs = []
    for n in (1, 2):
        with num_threads(n):
            outs.append(ops.attention(q, k, v, n_keys, q_pos, key_mask, scale))
    return outs


DECODE_CASES = {
    # name: (B, n_heads, n_kv_heads, head_dim, n_keys, q_pos, mask zeros per batch)
    # 2500 keys: three ranges of 1024 keys (merged across threads), 64-key chunks, a partial last one
    "glm4_9b_long": (1, 32, 2, 128, 2500, 2499, None),
    "glm4_9b_padding": (2, 32, 2, 128, 2500, 2400, {0: slice(1024, 2048), 1: slice(0, 2300)}),
    "group6_dim40": (2, 12, 2, 40, 300, 299, {1: [0, 5, 299]}),  # GLM-4-32B's group of 6
    "group24_dim20": (1, 48, 2, 20, 130, 100, {0: slice(64, 128)}),  # two passes of <= 16 heads
    "mha_dim256": (1, 3, 3, 256, 70, 69, None),
    "blind_query": (2, 4, 1, 16, 40, 39, {0: slice(None), 1: [3]}),
    "one_key": (1, 16, 1, 64, 9, 0, None),  # sees key 0 only
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_attention_matches_reference(isa, case):
    # One query token without probabilities: the attn_decode kernel (key-major scores, online
    # softmax per 64-key chunk, 1024-key ranges merged by their statistics).
    B, n_h, n_kv, d, n_keys, pos, zeros = DECODE_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    q, k, v, q_pos, key_mask = _attention_case(rng, B, 1, n_h, n_kv, d, n_keys + 5, n_keys, [pos], zeros)
    q *= 3.0  # peaked softmaxes: the running maximum changes between chunks
    scale = d ** -0.5
    ref_out, _ = ref_attention(q, k, v, n_keys, q_pos, key_mask, scale)
    ops.set_isa(isa)
    outs = _attention_on_1_and_2_threads(q, k, v, n_keys, q_pos, key_mask, scale)
    np.testing.assert_array_equal(outs[0], outs[1])  # the split into ranges is fixed
    np.testing.assert_allclose(outs[0], ref_out, rtol=2e-5, atol=2e-5)
    vis = (np.arange(n_keys) <= pos)[None, :] & (key_mask != 0 if key_mask is not None else True)
    blind = ~np.broadcast_to(vis, (B, n_keys)).any(-1)
    assert np.all(outs[0][blind] == 0.0)
    if case == "blind_query":
        assert blind[0] and not blind[1]
    out_g = on_isa("generic", lambda: ops.attention(q, k, v, n_keys, q_pos, key_mask, scale))
    np.testing.assert_allclose(outs[0], out_g, rtol=2e-5, atol=2e-5)


PROMPT_ATTN_CASES = {
    # name: (B, T, n_heads, n_kv_heads, head_dim, capacity, n_keys, q_pos, mask zeros per batch)
    # Prompts without probabilities: on AMX CPUs from AMX_MIN_QUERIES_ATTN tokens and
    # AMX_MIN_KEYS_ATTN visible keys on, the split-product tile kernel.
    "glm4_9b_heads": (1, 40, 32, 2, 128, 200, 170, range(130, 170), None),  # 2 tokens per 32 rows
    "padding_blind_rows": (2, 20, 16, 1, 64, 160, 150, range(130, 150),
                           {0: [0, 1, 133, 140], 1: slice(0, 145)}),
    "group6_straddles": (1, 37, 12, 2, 64, 140, 137, range(100, 137), {0: [5, 6]}),  # GLM-4-32B's group of 6
    "mha_dim32": (2, 50, 2, 2, 32, 200, 161, range(111, 161), {1: slice(0, 120)}),
    "dim256": (1, 17, 4, 1, 256, 140, 133, range(116, 133), None),
    "three_items": (1, 300, 16, 1, 128, 330, 320, range(20, 320), None),  # 4800 rows: items of 128
    "odd_dim_fallback": (1, 20, 8, 2, 40, 150, 145, range(125, 145), None),  # head_dim 40: fp32
    "few_keys_fallback": (1, 20, 16, 1, 64, 40, 30, range(10, 30), None),  # 30 keys: fp32
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", sorted(PROMPT_ATTN_CASES))
def test_prompt_attention_matches_reference(isa, case):
    # Peaked softmaxes (q x 3): the running maximum changes between blocks of keys. Every ISA
    # against the float64 reference at fp32's tolerance, 1 and 2 threads bit-identical.
    B, T, n_h, n_kv, d, cap, n_keys, q_pos, zeros = PROMPT_ATTN_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    q, k, v, q_pos, key_mask = _attention_case(rng, B, T, n_h, n_kv, d, cap, n_keys, list(q_pos), zeros)
    q *= 3.0
    scale = d ** -0.5
    ref_out, _ = ref_attention(q, k, v, n_keys, q_pos, key_mask, scale)
    ops.set_isa(isa)
    outs = _attention_on_1_and_2_threads(q, k, v, n_keys, q_pos, key_mask, scale)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], ref_out, rtol=1e-5, atol=1e-5)
    vis = (np.arange(n_keys)[None, :] <= q_pos[:, None])[None] & (
        key_mask[:, None, :] != 0 if key_mask is not None else True)  # [B, T, S]
    blind = ~vis.any(-1)
    assert np.all(outs[0][blind] == 0.0)
    if case == "padding_blind_rows":
        assert blind[1].sum() == 15 and not blind[0].any()
    if isa == "amx":  # the tile kernel ran (the fp32 path's sums give other bits), or was bypassed
        from glm4rt import _C
        tiles = d % 32 == 0 and T >= _C.AMX_MIN_QUERIES_ATTN and q_pos.max() + 1 >= _C.AMX_MIN_KEYS_ATTN
        assert tiles == ("fallback" not in case)
        fp32 = on_isa("avx512_bf16", lambda: ops.attention(q, k, v, n_keys, q_pos, key_mask, scale))
        assert np.array_equal(outs[0], fp32) != tiles


@pytest.mark.parametrize("isa", ISAS)
def test_attention_gqa_shares_kv_heads(isa):
    # With group size 2, query heads 2g and 2g+1 read kv head g: giving both the same query
    # must give both the same output.
    rng = np.random.default_rng(8)
    q, k, v, q_pos, _ = _attention_case(rng, 1, 3, 4, 2, 32, 10, 8, [5, 6, 7])
    q[:, :, 1] = q[:, :, 0]
    q[:, :, 3] = q[:, :, 2]
    ops.set_isa(isa)
    out = ops.attention(q, k, v, 8, q_pos, None, 32 ** -0.5)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    np.testing.assert_array_equal(out[:, :, 2], out[:, :, 3])
    assert not np.allclose(out[:, :, 0], out[:, :, 2])
    ref, _ = ref_attention(q, k, v, 8, q_pos, None, 32 ** -0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_thread_count_is_bitwise_irrelevant(isa):
    rng = np.random.default_rng(12)
    B, T, n_h, n_kv, d, cap, n_keys = 2, 9, 8, 2, 64, 80, 70
    q_pos = np.arange(n_keys - T, n_keys)
    q, k, v, q_pos, key_mask = _attention_case(rng, B, T, n_h, n_kv, d, cap, n_keys, q_pos,
                                               {1: slice(0, 20)})
    ops.set_isa(isa)
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append(_run_attention(q, k, v, n_keys, q_pos, key_mask, d ** -0.5))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    ref_out, ref_probs = ref_attention(q, k, v, n_keys, q_pos, key_mask, d ** -0.5)
    np.testing.assert_allclose(results[0][0], ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0][1], ref_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_bandwidth_probe_reads_every_byte(isa):
    # The probe's checksum is the XOR of all 8-byte words (and of any tail bytes): a probe that
    # skipped data would return another value.
    from glm4rt import _C
    rng = np.random.default_rng(3)
    ops.set_isa(isa)
    for n in (64 * 1001, 64 * 1001 + 5, 256 * 3 + 64):
        buf = rng.integers(0, 256, size=n, dtype=np.uint8)
        words = buf[: n // 64 * 64].view(np.uint64)
        expected = int(np.bitwise_xor.reduce(words))
        for b in buf[n // 64 * 64:]:
            expected ^= int(b)
        for threads in (1, 2):
            with num_threads(threads):
                assert _C.stream_read(buf) == expected, (n, threads)
    assert ops.memory_read_bandwidth(size_mib=8, repeats=2) > 0


# ---------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument, never a crash
# ---------------------------------------------------------------------------------------------

def _f(*shape):
    return np.ones(shape, dtype=np.float32)


def _readonly(a):
    a.flags.writeable = False
    return a


def _misaligned(*shape, dtype=np.float32):
    """A valid C-contiguous array whose data starts one byte past an element boundary, as a
    tensor at an odd offset of a memory-mapped safetensors file would."""
    itemsize = np.dtype(dtype).itemsize
    a = np.frombuffer(bytearray(int(np.prod(shape)) * itemsize + 1), dtype=dtype, offset=1).reshape(shape)
    assert not a.flags.aligned
    return a


def _attn(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 6, 8), n_keys=5, q_pos=(3, 4), key_mask=None,
          out=None, probs=None, v_shape=None, q_pos_dtype=np.int64):
    return ops.attention(_f(*q_shape), _f(*kv_shape), _f(*(v_shape or kv_shape)), n_keys,
                         np.array(q_pos, dtype=q_pos_dtype), key_mask, 0.3, out=out, probs=probs)


BAD_CALLS = {
    # linear
    "linear_x_float64": (lambda: ops.linear(np.ones((2, 8)), _f(3, 8)), r"\bx: expected dtype float32"),
    "linear_x_transposed": (lambda: ops.linear(_f(8, 2).T, _f(3, 8)), r"\bx: array must be C-contiguous"),
    "linear_x_1d": (lambda: ops.linear(_f(8), _f(3, 8)), r"\bx: expected 2 dimensions"),
    "linear_weight_k": (lambda: ops.linear(_f(2, 8), _f(3, 9)), r"weight: dimension 1 must be 8"),
    "linear_weight_bf16_k": (lambda: ops.linear(_f(2, 8), np.ones((3, 9), np.uint16)),
                             r"weight \(bf16 bits\): dimension 1 must be 8"),
    "linear_weight_float64": (lambda: ops.linear(_f(2, 8), np.ones((3, 8))), r"weight: expected dtype float32"),
    "linear_weight_noncontig": (lambda: ops.linear(_f(2, 8), _f(8, 3).T), r"weight: array must be C-contiguous"),
    "linear_bias_shape": (lambda: ops.linear(_f(2, 8), _f(3, 8), _f(4)), r"bias: dimension 0 must be 3"),
    "linear_bias_dtype": (lambda: ops.linear(_f(2, 8), _f(3, 8), np.ones(3)), r"bias: expected dtype float32"),
    "linear_out_shape": (lambda: ops.linear(_f(2, 8), _f(3, 8), out=_f(2, 4)), r"out: dimension 1 must be 3"),
    "linear_out_dtype": (lambda: ops.linear(_f(2, 8), _f(3, 8), out=np.ones((2, 3))), r"out: expected dtype float32"),
    "linear_out_readonly": (lambda: ops.linear(_f(2, 8), _f(3, 8), out=_readonly(_f(2, 3))), r"out: output array must be writable"),
    "linear_weight_misaligned": (lambda: ops.linear(_f(2, 8), _misaligned(3, 8)), r"weight: array data is not aligned to its 4-byte"),
    "linear_weight_bf16_misaligned": (lambda: ops.linear(_f(2, 8), _misaligned(3, 8, dtype=np.uint16)),
                                      r"weight \(bf16 bits\): array data is not aligned to its 2-byte"),
    "linear_bias_misaligned": (lambda: ops.linear(_f(2, 8), _f(3, 8), _misaligned(3)), r"bias: array data is not aligned"),
    "linear_x_misaligned": (lambda: ops.linear(_misaligned(2, 8), _f(3, 8)), r"\bx: array data is not aligned"),
    # rms_norm
    "rms_norm_weight_misaligned": (lambda: ops.rms_norm(_f(2, 8), _misaligned(8), 1e-5), r"weight: array data is not aligned"),
    "rms_norm_x_float64": (lambda: ops.rms_norm(np.ones((2, 8)), _f(8), 1e-5), r"\bx: expected dtype float32"),
    "rms_norm_x_transposed": (lambda: ops.rms_norm(_f(8, 2).T, _f(8), 1e-5), r"\bx: array must be C-contiguous"),
    "rms_norm_weight_shape": (lambda: ops.rms_norm(_f(2, 8), _f(7), 1e-5), r"weight: dimension 0 must be 8"),
    "rms_norm_out_readonly": (lambda: ops.rms_norm(_f(2, 8), _f(8), 1e-5, out=_readonly(_f(2, 8))), r"out: output array must be writable"),
    "rms_norm_out_shape": (lambda: ops.rms_norm(_f(2, 8), _f(8), 1e-5, out=_f(3, 8)), r"out: dimension 0 must be 2"),
    "rms_norm_eps_negative": (lambda: ops.rms_norm(_f(2, 8), _f(8), -1.0), r"eps"),
    # rotary_
    "rotary_x_readonly": (lambda: ops.rotary_(_readonly(_f(2, 1, 8)), np.zeros(2, np.int64), _f(4), 8), r"\bx: output array must be writable"),
    "rotary_x_float64": (lambda: ops.rotary_(np.ones((2, 1, 8)), np.zeros(2, np.int64), _f(4), 8), r"\bx: expected dtype float32"),
    "rotary_positions_int32": (lambda: ops.rotary_(_f(2, 1, 8), np.zeros(2, np.int32), _f(4), 8), r"positions: expected dtype int64"),
    "rotary_positions_len": (lambda: ops.rotary_(_f(2, 1, 8), np.zeros(3, np.int64), _f(4), 8), r"positions: dimension 0 must be 2"),
    "rotary_rot_dim_odd": (lambda: ops.rotary_(_f(2, 1, 8), np.zeros(2, np.int64), _f(3), 7), r"rot_dim"),
    "rotary_rot_dim_too_big": (lambda: ops.rotary_(_f(2, 1, 8), np.zeros(2, np.int64), _f(5), 10), r"rot_dim"),
    "rotary_inv_freq_len": (lambda: ops.rotary_(_f(2, 1, 8), np.zeros(2, np.int64), _f(3), 8), r"inv_freq: dimension 0 must be 4"),
    # silu_mul
    "silu_mul_odd": (lambda: ops.silu_mul(_f(2, 7), out=_f(2, 3)), r"gate_up"),
    "silu_mul_float64": (lambda: ops.silu_mul(np.ones((2, 8))), r"gate_up: expected dtype float32"),
    "silu_mul_out_shape": (lambda: ops.silu_mul(_f(2, 8), out=_f(2, 8)), r"out: dimension 1 must be 4"),
    "silu_mul_out_readonly": (lambda: ops.silu_mul(_f(2, 8), out=_readonly(_f(2, 4))), r"out: output array must be writable"),
    # attention
    "attn_n_keys_over_capacity": (lambda: _attn(n_keys=7), r"n_keys must be in \[1, capacity=6\]"),
    "attn_n_keys_zero": (lambda: _attn(n_keys=0, q_pos=(0, 0)), r"n_keys"),
    "attn_q_pos_past_keys": (lambda: _attn(q_pos=(3, 5)), r"q_pos\[1\] = 5 is outside"),
    "attn_q_pos_negative": (lambda: _attn(q_pos=(-1, 4)), r"q_pos\[0\] = -1 is outside"),
    "attn_q_pos_int32": (lambda: _attn(q_pos_dtype=np.int32), r"q_pos: expected dtype int64"),
    "attn_q_pos_len": (lambda: _attn(q_pos=(1, 2, 3)), r"q_pos: dimension 0 must be 2"),
    "attn_heads_not_multiple": (lambda: _attn(q_shape=(1, 2, 6, 8), kv_shape=(1, 4, 6, 8)), r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"),
    "attn_k_head_dim": (lambda: _attn(kv_shape=(1, 2, 6, 4)), r"\bk: dimension 3 must be 8"),
    # larger than the kernels' stack buffers: an error, not an overflow (decode and prefill paths)
    "attn_head_dim_too_large": (lambda: _attn(q_shape=(1, 1, 4, 512), kv_shape=(1, 2, 6, 512), q_pos=(4,),
                                              out=_f(1, 1, 4, 512), probs=None),
                                r"head_dim must be in \[1, 256\].*got 512"),
    "attn_head_dim_too_large_prefill": (lambda: _attn(q_shape=(1, 2, 4, 264), kv_shape=(1, 2, 6, 264),
                                                      out=_f(1, 2, 4, 264), probs=None),
                                        r"head_dim must be in \[1, 256\].*got 264"),
    "attn_v_shape": (lambda: _attn(v_shape=(1, 2, 5, 8)), r"\bv: dimension 2 must be 6"),
    "attn_q_float64": (lambda: ops.attention(np.ones((1, 2, 4, 8)), _f(1, 2, 6, 8), _f(1, 2, 6, 8), 5,
                                             np.array([3, 4]), None, 0.3, out=_f(1, 2, 4, 8)), r"\bq: expected dtype float32"),
    "attn_key_mask_shape": (lambda: _attn(key_mask=np.ones((1, 6), np.uint8)), r"key_mask: dimension 1 must be 5"),
    "attn_key_mask_bool": (lambda: _attn(key_mask=np.ones((1, 5), bool)), r"key_mask: expected dtype uint8"),
    "attn_out_readonly": (lambda: _attn(out=_readonly(_f(1, 2, 4, 8))), r"out: output array must be writable"),
    "attn_probs_shape": (lambda: _attn(probs=_f(1, 4, 2, 6)), r"probs: dimension 3 must be 5"),
    "attn_probs_readonly": (lambda: _attn(probs=_readonly(_f(1, 4, 2, 5))), r"probs: output array must be writable"),
    # settings
    "set_isa_unknown": (lambda: ops.set_isa("sse9"), r"sse9"),
    "set_num_threads_zero": (lambda: ops.set_num_threads(0), r"threads must be >= 1, got 0"),
    "set_num_threads_negative": (lambda: ops.set_num_threads(-3), r"threads must be >= 1, got -3"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_value_error(name):
    fn, pattern = BAD_CALLS[name]
    isa, threads = ops.cpu_isa(), ops.get_num_threads()
    with pytest.raises(ValueError, match=pattern):
        fn()
    # a rejected call changes no setting and leaves the module usable
    assert ops.cpu_isa() == isa
    assert ops.get_num_threads() == threads
    np.testing.assert_array_equal(ops.linear(_f(2, 3), _f(4, 3)), np.full((2, 4), 3.0, np.float32))


def test_rejected_out_is_not_written():
    out = np.full((2, 3), 7.0, dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.linear(_f(2, 8), _f(3, 9), out=out)
    np.testing.assert_array_equal(out, 7.0)


# ---------------------------------------------------------------------------------------------
# The kernels release the GIL
# ---------------------------------------------------------------------------------------------

def test_linear_releases_gil():
    rng = np.random.default_rng(99)
    K = N = 1024
    w = f32(rng, N, K)
    with num_threads(1):  # leave a core for the main thread
        x = f32(rng, 64, K)
        t0 = time.perf_counter()
        ops.linear(x, w)
        per_row = (time.perf_counter() - t0) / 64
        # one call long enough (~80 ms) that holding the GIL would stall the main thread visibly
        M = int(min(max(0.08 / max(per_row, 1e-9), 64), 8192))
        x = f32(rng, M, K)
        out = np.empty((M, N), dtype=np.float32)
        calls, errors = [], []
        done = threading.Event()

        def worker():
            try:
                end = time.perf_counter() + 0.3
                while True:
                    a = time.perf_counter()
                    ops.linear(x, w, out=out)
                    calls.append(time.perf_counter() - a)
                    if time.perf_counter() >= end or len(calls) >= 8:
                        break
            except BaseException as e:  # pragma: no cover - surfaced below
                errors.append(e)
            finally:
                done.set()

        th = threading.Thread(target=worker)
        count, max_gap = 0, 0.0
        th.start()
        prev = time.perf_counter()
        while not done.is_set():
            count += 1
            now = time.perf_counter()
            max_gap = max(max_gap, now - prev)
            prev = now
        th.join()
    assert not errors, errors
    assert calls
    # the main thread kept running Python while the worker sat inside the kernel: with the GIL
    # held it would have stalled for a whole call at least once
    assert count > 1000, count
    assert max_gap < 0.5 * min(calls), (max_gap, calls)
    np.testing.assert_allclose(out[:3], ref_linear(x[:3], w), rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_equal_dtype_from_another_object_is_accepted():
    # An unpickled array carries an equal but distinct dtype object (e.g. from multiprocessing).
    import pickle

    x = pickle.loads(pickle.dumps(np.ones((2, 3), np.float32)))
    w = pickle.loads(pickle.dumps(ops.f32_to_bf16(np.full((4, 3), 0.5, np.float32))))
    np.testing.assert_array_equal(ops.linear(x, w), np.full((2, 4), 1.5, np.float32))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.silu_mul(np.ones(4, np.float32)), "gate_up"),
    (lambda: ops.linear(np.ones((2, 3), np.float32), np.float32(1.0)), "weight"),
    (lambda: ops.linear(np.ones(3, np.float32), np.ones((4, 3), np.float32)), "x"),
    (lambda: ops.attention(np.ones((2, 2), np.float32), None, None, 1, None, None, 1.0), "q"),
])
def test_wrappers_reject_wrong_rank_before_allocating(call, match):
    with pytest.raises(ValueError, match=match):
        call()
