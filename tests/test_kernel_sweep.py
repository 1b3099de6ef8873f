"""Every token count through every matmul path: fp32, bf16, int8, int4 and q4k weights, on every ISA this
CPU runs, with 1 and 2 threads.

The kernels tile tokens (1 to 12 per tile, 32 on AMX) and switch paths at token thresholds (GEMV,
dot tiles, fp32 / bf16 panels from 16, AMX from 16 / 40, blocks of 64, 192 and 516 tokens, AMX
spans up to 256 and chunks of 512). A remainder that no test runs is a remainder that crashes for
a user (M % 8 == 3 did, in the int4 tiles), so M is swept through every value from 1 to past twice
the largest tile height and token block, then on both sides of every larger threshold.

Odd K and N leave tails everywhere: K = 1031 spans three 384-wide (fp32 panels), three 512-wide
and 33 quantized / AMX blocks of 32 (the last one padded); N = 37 is two full 16-row groups (or
one 32-row panel) and a tail of 5. The second geometry is small enough to stay on one thread below
11 tokens and to go parallel above, and has only full groups (N = 48: 32 + a half AMX panel).
"""
import ctypes
import mmap
import sys

import numpy as np
import pytest

import glm4rt
from glm4rt import ops
from glm4rt.quant import QuantLinear, quantize_weight
from kernel_reference import ref_linear, ref_qmatmul, takes_amx_tiles

ISAS = glm4rt.supported_isas()
FORMATS = ["f32", "bf16", "int8", "int4", "q4k"]
# Every M from 1 to 130 (twice the 64-token block, and four times AMX's 32), then both sides of the
# fp32 panel block (192), the AMX span switch (256), the AMX token chunk (512) and the bf16 panel
# block (43 chunks of 12 = 516), and a long prompt.
SWEEP_M = list(range(1, 131)) + [191, 192, 193, 255, 256, 257, 511, 512, 513, 515, 516, 517, 1030]
GEOMETRIES = [(1031, 37), (64, 48)]  # (K, N)


def _layer(fmt, w, bias):
    """A matmul with weights w [N, K] stored in fmt: (x, out=None) -> x @ w.T + bias, and its reference
    (x, amx) -> float64, amx telling whether the quantized matmul ran on the AMX tiles."""
    n, k = w.shape
    if fmt in ("int8", "int4", "q4k"):
        lin = QuantLinear(quantize_weight(w, fmt), fmt, n, k, bias)
        return lin, lambda x, amx: ref_qmatmul(x, lin.packed, fmt, n, amx) + bias
    wt = ops.f32_to_bf16(w) if fmt == "bf16" else w
    return (lambda x, out=None: ops.linear(x, wt, bias, out)), (lambda x, amx: ref_linear(x, wt, bias))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n", GEOMETRIES, ids=lambda v: str(v))
def test_every_token_count(isa, fmt, k, n):
    rng = np.random.default_rng(k * 31 + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x_all = rng.standard_normal((max(SWEEP_M), k)).astype(np.float32)
    layer, reference = _layer(fmt, w, bias)
    # Rows are independent: the reference of the longest prompt holds every shorter one's, except
    # that AMX switches the activations' format at its threshold.
    refs = {amx: reference(x_all, amx) for amx in {False, takes_amx_tiles(isa, max(SWEEP_M))}}
    before = ops.get_num_threads()
    ops.set_isa(isa)
    try:
        for m in SWEEP_M:
            x = x_all[:m]
            ref = refs[takes_amx_tiles(isa, m)][:m]
            outs = []
            for threads in (1, 2):
                ops.set_num_threads(threads)
                outs.append(layer(x))
            assert outs[0].shape == (m, n)
            # fp32 sums over K of products of ~1: errors ~1e-6 * sqrt(K) per element.
            err = np.abs(outs[0] - ref).max()
            assert err <= 2e-6 * np.sqrt(k) * max(1.0, np.abs(ref).max() / 8), (m, err)
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"M={m}: 1 and 2 threads differ")
    finally:
        ops.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 17, 45])  # GEMV, tiles, panels / AMX bf16, AMX quantized
def test_nan_and_inf_activations_propagate(isa, fmt, m):
    # As in fp32 (and transformers): a token whose activations hold NaN or inf gets NaN (or inf)
    # outputs, and the other tokens are untouched. The quantized paths must not turn them into
    # finite numbers by converting NaN to an integer.
    rng = np.random.default_rng(m)
    k, n = 100, 37
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = np.zeros(n, np.float32)
    layer, _ = _layer(fmt, w, bias)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bad = {0: np.nan, m - 1: np.inf} if m > 1 else {0: np.nan}
    ops.set_isa(isa)
    clean = layer(x)
    for row, value in bad.items():
        x[row, 70] = value
    out = layer(x)
    for row in range(m):
        if row in bad:
            assert not np.isfinite(out[row]).any(), (row, out[row])
        else:
            np.testing.assert_array_equal(out[row], clean[row])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_activation_quantizer_marks_non_finite_blocks(value):
    # The block holding NaN / inf gets scale NaN and codes 0; its neighbours are quantized as usual.
    x = np.random.default_rng(0).standard_normal((2, 70)).astype(np.float32)
    x[1, 40] = value
    q, s, sums = ops.quantize_acts(x)
    clean_q, clean_s, _ = ops.quantize_acts(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    assert np.isnan(s[1, 1]) and not np.isnan(np.delete(s, 4)).any()
    assert (q.reshape(2, 3, 32)[1, 1] == 0).all() and sums[1, 1] == 0
    np.testing.assert_array_equal(np.delete(s, 4), np.delete(clean_s, 4))
    np.testing.assert_array_equal(q.reshape(2, 3, 32)[0], clean_q.reshape(2, 3, 32)[0])


# Every K tail of the SIMD widths (8, 16) and of the quantized blocks (32), then both sides of the
# bf16 panels' pair block (2048) and of the bf16 GEMV's 4-rows switch (rows over 8192 weights).
SWEEP_K = list(range(1, 70)) + [2047, 2048, 2049, 8191, 8192, 8193]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 17, 45])  # GEMV, tiles, panels / AMX bf16, AMX quantized
def test_every_row_length(isa, fmt, m):
    rng = np.random.default_rng(m)
    n = 21
    ops.set_isa(isa)
    for k in SWEEP_K:
        w = rng.standard_normal((n, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        layer, reference = _layer(fmt, w, bias)
        ref = reference(x, takes_amx_tiles(isa, m))
        err = np.abs(layer(x) - ref).max()
        assert err <= 2e-6 * np.sqrt(k) * max(1.0, np.abs(ref).max() / 8), (k, err)


def _before_guard_page(shape, keep):
    """A float32 array whose last byte is the last one before a PROT_NONE page."""
    nbytes = int(np.prod(shape)) * 4
    pages = -(-nbytes // mmap.PAGESIZE)
    buf = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # (the buffer export pins buf)
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert mprotect(base + pages * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()  # PROT_NONE
    keep.append(buf)
    return np.frombuffer(buf, np.float32, int(np.prod(shape)), pages * mmap.PAGESIZE - nbytes).reshape(shape)


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect through ctypes")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 17, 45])
def test_output_ending_at_a_guard_page(isa, fmt, m):
    # The last row's last column group (N % 16 = 5) ends right before an unmapped page, and K spans
    # several k blocks (the panels add into the output): no load or store may touch a byte past
    # it, masked out or not. Intel CPUs never fault on masked-out lanes, but AMD leaves it
    # implementation dependent and QEMU's TCG faulted (the avx2 fp32 panels' vmaskmovps loads of
    # the output, under .ci/emulate, whenever numpy's output ended within 44 bytes of a page).
    rng = np.random.default_rng(m)
    k, n = 1031, 21
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    layer, reference = _layer(fmt, w, bias)
    keep = []
    out = _before_guard_page((m, n), keep)
    ops.set_isa(isa)
    layer(x, out)
    ref = reference(x, takes_amx_tiles(isa, m))
    assert np.abs(out - ref).max() <= 2e-6 * np.sqrt(k) * max(1.0, np.abs(ref).max() / 8)
