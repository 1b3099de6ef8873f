"""Batch-invariant mode (``glm4rt.batch_invariant``): a token's result has the same bits whatever
the number of tokens beside it, on every path, ISA and thread count.

The serving engine batches the decode steps of several requests and the prompt chunks of others
into one forward; greedy output must still equal ``generate`` of each request alone, so each row's
matmul and attention results must not depend on the batch. Without the mode the paths differ
(fp32 / bf16 panels from 16 tokens, the AVX512-BF16 GEMV's 4 chains, the quantized AMX path, the
multi-query attention kernel); the first test shows that, so the others cannot pass by accident.
"""
import threading

import numpy as np
import pytest

import glm4rt
from glm4rt import ops
from glm4rt.quant import QuantLinear, quantize_weight
from kernel_reference import ref_linear, ref_qmatmul

ISAS = glm4rt.supported_isas()
FORMATS = ["f32", "bf16", "int8", "int4", "q4k"]
# Every M to past twice the 64-token block, both sides of every path threshold (panels 16, AMX
# 16 / 40), the fp32 panel block (192) and a long prompt.
SWEEP_M = list(range(1, 131)) + [191, 192, 193, 255, 256, 257, 513]
# (K, N): tails everywhere / full groups / rows past 8192, which one token streams 4 at a time
# (the AVX512-BF16 dot tiles, as its GEMV does).
GEOMETRIES = [(1031, 37), (64, 48), (8205, 6)]


def _layer(fmt, w, bias):
    """x -> x @ w.T + bias with w stored in fmt, and its float64 reference (without AMX: the
    mode never takes it)."""
    n, k = w.shape
    if fmt in ("int8", "int4", "q4k"):
        lin = QuantLinear(quantize_weight(w, fmt), fmt, n, k, bias)
        return lin, lambda x: ref_qmatmul(x, lin.packed, fmt, n) + bias
    wt = ops.f32_to_bf16(w) if fmt == "bf16" else w
    return (lambda x: ops.linear(x, wt, bias)), (lambda x: ref_linear(x, wt, bias))


@pytest.fixture
def invariant():
    with glm4rt.batch_invariant():
        yield
    assert not ops.batch_invariant()


def test_default_paths_are_not_invariant():
    """The fp32 panels (from 16 tokens) sum in another order than one token's GEMV."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 1031)).astype(np.float32)
    x = rng.standard_normal((20, 1031)).astype(np.float32)
    layer, _ = _layer("f32", w, None)
    assert not ops.batch_invariant()
    differ = any(not np.array_equal(layer(x[r:r + 1])[0], layer(x)[r]) for r in range(20))
    if glm4rt.cpu_isa() not in ("generic", "neon", "dotprod", "i8mm", "bf16"):  # the sets with fp32 panels (x86)
        assert differ, "the panel path happened to give the GEMV's bits: this test shows nothing"
    with glm4rt.batch_invariant():
        assert all(np.array_equal(layer(x[r:r + 1])[0], layer(x)[r]) for r in range(20))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n", GEOMETRIES, ids=str)
def test_matmul_rows_do_not_depend_on_the_batch(invariant, threads, isa, fmt, k, n):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x_all = rng.standard_normal((max(SWEEP_M), k)).astype(np.float32)
    layer, reference = _layer(fmt, w, bias)
    before = ops.get_num_threads()
    ops.set_isa(isa)
    ops.set_num_threads(threads)
    try:
        full = layer(x_all)
        # Invariant and right: the kernel sweep's bound (fp32 sums of K products of ~1).
        ref = reference(x_all)
        assert np.abs(full - ref).max() <= 2e-6 * np.sqrt(k) * max(1.0, np.abs(ref).max() / 8)
        for m in SWEEP_M:
            # The first m rows alone, and the last row alone (a GEMV), give the long batch's bits.
            assert np.array_equal(layer(x_all[:m]), full[:m]), m
            assert np.array_equal(layer(x_all[m - 1:m])[0], full[m - 1]), m
    finally:
        ops.set_isa("auto")
        ops.set_num_threads(before)


def _attention_case(rng, n_seqs, cap, n_heads=8, n_kv=2, d=64):
    k = rng.standard_normal((n_seqs, n_kv, cap, d)).astype(np.float32)
    v = rng.standard_normal((n_seqs, n_kv, cap, d)).astype(np.float32)
    return k, v, n_heads, d


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_attention_of_a_prompt_in_any_chunks(invariant, threads, isa):
    """A prompt attended whole, in chunks of every size, or one query at a time: the same bits
    (1100 keys: two of the decode kernel's 1024-key ranges)."""
    rng = np.random.default_rng(1)
    before = ops.get_num_threads()
    ops.set_isa(isa)
    ops.set_num_threads(threads)
    try:
        for S in (1, 2, 5, 17, 70, 1100):
            k, v, n_heads, d = _attention_case(rng, 1, S + 3)
            q = rng.standard_normal((1, S, n_heads, d)).astype(np.float32)
            whole = ops.attention(q, k, v, S, np.arange(S), None, d ** -0.5)
            for chunk in sorted({1, 2, 3, 7, 16, 64, S}):
                if S > 100 and chunk < 64:
                    continue
                out = np.empty_like(whole)
                for s0 in range(0, S, chunk):
                    s1 = min(S, s0 + chunk)
                    out[:, s0:s1] = ops.attention(np.ascontiguousarray(q[:, s0:s1]), k, v, s1,
                                                  np.arange(s0, s1), None, d ** -0.5)
                assert np.array_equal(out, whole), (S, chunk)
    finally:
        ops.set_isa("auto")
        ops.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_rows_of_several_sequences(isa):
    """Rows of 4 cache sequences with their own lengths, in one call: each equals the decode step
    of that sequence alone (outside the mode too: attention_rows always computes rows alone), and
    a float64 softmax reference to 1e-5."""
    rng = np.random.default_rng(2)
    k, v, n_heads, d = _attention_case(rng, 4, 1200)
    group = n_heads // k.shape[1]
    rows = [(2, 0), (0, 4), (0, 5), (3, 1099), (1, 63), (2, 1), (3, 64)]  # (sequence, position)
    slots = np.array([s for s, _ in rows], dtype=np.int64)
    pos = np.array([p for _, p in rows], dtype=np.int64)
    q = rng.standard_normal((len(rows), n_heads, d)).astype(np.float32)
    ops.set_isa(isa)
    try:
        got = ops.attention_rows(q, k, v, slots, pos, d ** -0.5)
        for r, (s, p) in enumerate(rows):
            alone = ops.attention(q[None, r:r + 1], k[s:s + 1], v[s:s + 1], p + 1, np.array([p]), None, d ** -0.5)
            assert np.array_equal(got[r], alone[0, 0]), (s, p)
            for h in range(n_heads):
                kk = k[s, h // group, :p + 1].astype(np.float64)
                vv = v[s, h // group, :p + 1].astype(np.float64)
                sc = kk @ q[r, h].astype(np.float64) * d ** -0.5
                pr = np.exp(sc - sc.max())
                np.testing.assert_allclose(got[r, h], pr @ vv / pr.sum(), rtol=0, atol=1e-5)
    finally:
        ops.set_isa("auto")


def test_attention_rows_rejects_bad_rows():
    rng = np.random.default_rng(3)
    k, v, n_heads, d = _attention_case(rng, 2, 16)
    q = np.zeros((1, n_heads, d), dtype=np.float32)
    with pytest.raises(ValueError, match="q_slot"):
        ops.attention_rows(q, k, v, np.array([2]), np.array([0]), 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        ops.attention_rows(q, k, v, np.array([0]), np.array([16]), 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        ops.attention_rows(q, k, v, np.array([0]), np.array([-1]), 1.0)


def test_the_mode_belongs_to_the_calling_thread():
    seen = []
    with glm4rt.batch_invariant():
        t = threading.Thread(target=lambda: seen.append(ops.batch_invariant()))
        t.start()
        t.join()
        assert ops.batch_invariant()
        with glm4rt.batch_invariant(False):
            assert not ops.batch_invariant()
        assert ops.batch_invariant()
    assert seen == [False] and not ops.batch_invariant()
