"""Thin wrappers over the C++ kernels; the only module that imports ``glm4rt._C``.

Every kernel takes C-contiguous NumPy arrays of the exact dtype (float32 activations, float32 or
bf16-as-uint16 weights) and writes into a caller-provided ``out`` array, so the forward pass can
reuse its buffers. The kernels release the GIL and run on ``get_num_threads()`` OpenMP threads.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import numpy as np

from .bf16 import from_f32 as f32_to_bf16, to_f32 as bf16_to_f32  # noqa: F401 (public names)
from .checks import is_int


def _import_extension():
    """Import ``_C`` (and with it libgomp, which reads its wait policy once, as it loads).

    libgomp's default lets a thread with nothing to do spin for ~300,000 rounds (milliseconds)
    before it sleeps. On a machine where another program keeps a core busy (a desktop with a
    browser and an IDE), a spinning thread holds its core while the thread that has the rest of
    the work waits for a time slice behind the other program, and two threads ran several times
    slower than one (benchmarks/contended.md). Unless the user chose a policy, a short spin is set
    for the load and the environment put back, so that child processes and other libraries see
    the user's. (Only effective when glm4rt loads libgomp first; another library that loaded it
    earlier keeps the policy it got.)
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        from . import _C
        return _C
    os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
    try:
        from . import _C
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    return _C


_GOMP_SPINCOUNT = "1000"
_C = _import_extension()

# Fewest tokens for which the amx kernel set runs quantized matmuls on AMX tiles (the VNNI kernels
# below it); the kernel tests check both sides.
AMX_MIN_TOKENS_QUANT = _C.AMX_MIN_TOKENS_QUANT

__all__ = [
    "linear", "rms_norm", "rotary_", "silu_mul", "attention", "attention_rows",
    "bf16_to_f32", "f32_to_bf16",
    "memory_read_bandwidth", "cpu_isa", "supported_isas", "set_isa", "set_num_threads", "get_num_threads",
    "max_num_threads",
]


def check_dims(name: str, a: np.ndarray, ndim: int) -> tuple[int, ...]:
    """Shape of ``a`` after checking its rank (the kernels check everything else)."""
    if np.ndim(a) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {np.shape(a)}")
    return np.shape(a)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias`` with fp32 accumulation; with bf16 weights the activations are
    rounded to bf16 first (bf16 x bf16 products, exact in fp32; AVX512-BF16 where available).

    Args:
        x: float32 ``[n_tokens, in_features]``.
        weight: float32 or bf16 bits (uint16) ``[out_features, in_features]`` (PyTorch layout).
        bias: optional float32 ``[out_features]``.
        out: optional float32 ``[n_tokens, out_features]`` to write into.
    Returns:
        ``out``.
    """
    if out is None:
        out = np.empty((check_dims("x", x, 2)[0], check_dims("weight", weight, 2)[0]), dtype=np.float32)
    _C.matmul(x, weight, bias, out)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis of ``x [n_tokens, hidden]``.

    ``out`` may be ``x`` itself. Returns ``out``.
    """
    if out is None:
        out = np.empty_like(x)
    _C.rms_norm(x, weight, float(eps), out)
    return out


def rotary_(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, rot_dim: int) -> np.ndarray:
    """Apply GLM's interleaved partial rotary embedding in place.

    Args:
        x: float32 ``[n_tokens, n_heads, head_dim]``, modified in place.
        positions: int64 ``[n_tokens]`` position of each token.
        inv_freq: float32 ``[rot_dim // 2]``.
        rot_dim: number of leading dims of each head that rotate (pairs ``(2i, 2i+1)``).
    Returns:
        ``x``.
    """
    _C.rotary(x, positions, inv_freq, int(rot_dim))
    return x


def silu_mul(gate_up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``up * silu(gate)`` where ``gate_up [n_tokens, 2 * I]`` holds gate then up. Returns ``out``."""
    if out is None:
        rows, width = check_dims("gate_up", gate_up, 2)
        out = np.empty((rows, width // 2), dtype=np.float32)
    _C.silu_mul(gate_up, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_keys: int, q_pos: np.ndarray,
              key_mask: np.ndarray | None, scale: float, out: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention over a KV cache.

    Args:
        q: float32 ``[batch, n_queries, n_heads, head_dim]`` (rotary already applied).
        k, v: float32 ``[batch, n_kv_heads, capacity, head_dim]``; the first ``n_keys`` rows are used.
        n_keys: number of valid cache rows.
        q_pos: int64 ``[n_queries]`` cache row of each query; key ``s`` is visible iff ``s <= q_pos``.
        key_mask: optional uint8 ``[batch, n_keys]``, 0 marks padding keys.
        scale: score scale, ``head_dim ** -0.5``.
        out: optional float32 ``[batch, n_queries, n_heads, head_dim]``.
        probs: optional float32 ``[batch, n_heads, n_queries, n_keys]`` receiving the softmax.
    Returns:
        ``out``. Queries that see no key get zeros.
    """
    if out is None:
        out = np.empty(check_dims("q", q, 4), dtype=np.float32)
    _C.attention(q, k, v, int(n_keys), q_pos, key_mask, float(scale), out, probs)
    return out


def attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_slot: np.ndarray, q_pos: np.ndarray,
                   scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention for query rows of several cache sequences (a serving batch).

    Args:
        q: float32 ``[n_rows, n_heads, head_dim]`` (rotary already applied).
        k, v: float32 ``[n_sequences, n_kv_heads, capacity, head_dim]`` (one layer of the cache).
        q_slot: int64 ``[n_rows]`` the cache sequence of each row.
        q_pos: int64 ``[n_rows]`` its cache position: it sees that sequence's keys ``0 .. q_pos``.
        scale: score scale, ``head_dim ** -0.5``.
        out: optional float32 ``[n_rows, n_heads, head_dim]``.
    Returns:
        ``out``. Each row is computed on its own, as the decode step computes its one query, so its
        bits do not depend on the other rows.
    """
    if out is None:
        out = np.empty(check_dims("q", q, 3), dtype=np.float32)
    _C.attention_rows(q, k, v, q_slot, q_pos, float(scale), out)
    return out


@contextlib.contextmanager
def batch_invariant_mode(on: bool = True) -> Iterator[None]:
    """Run the kernels this Python thread calls in batch-invariant mode (``on``) or not, inside
    the ``with`` block; the previous mode is restored after it.

    In the mode, every matmul and attention computes a token's result with the same operations in
    the same order whatever the number of tokens beside it: a row of ``linear(x)`` has the bits of
    ``linear(x[i:i+1])``, a prompt attended in chunks has the bits of the whole prompt attended
    at once. The serving engine runs in it, so that a request's output does not depend on what
    else is batched with it, and ``generate`` run in it gives the engine's tokens. The cost is the
    faster prompt paths it leaves out: fp32 / bf16 panels and AMX tiles for matmuls of many
    tokens, the multi-query attention kernel (each query runs the decode kernel); quantized
    weights off AMX CPUs, and every decode step, run as they do outside it.
    """
    before = batch_invariant()
    set_batch_invariant(on)
    try:
        yield
    finally:
        set_batch_invariant(before)


def set_batch_invariant(on: bool) -> None:
    """Batch-invariant kernels for the calling Python thread (off by default; see
    ``glm4rt.batch_invariant``)."""
    _C.set_batch_invariant(bool(on))


def batch_invariant() -> bool:
    """Whether the calling Python thread runs batch-invariant kernels."""
    return _C.batch_invariant()


def packed_bytes(fmt_id: int, out_features: int, in_features: int) -> int:
    """Bytes of a packed ``[out_features, in_features]`` matrix of quantized format ``fmt_id``."""
    return _C.packed_bytes(int(fmt_id), int(out_features), int(in_features))


def quantize_pack(rows: np.ndarray, fmt_id: int, out_features: int, row0: int, packed: np.ndarray,
                  importance: Optional[np.ndarray] = None) -> None:
    """Quantize ``rows [n, in_features]`` (float32 or bf16 bits), rows ``row0 ..`` of the matrix,
    into ``packed`` (see ``glm4rt.quant.quantize_rows``)."""
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
    _C.quantize_pack(np.ascontiguousarray(rows), int(fmt_id), int(out_features), int(row0), packed, importance)


def qmatmul(x: np.ndarray, packed: np.ndarray, fmt_id: int, out_features: int, bias: Optional[np.ndarray],
            out: np.ndarray) -> np.ndarray:
    """``out [n_tokens, out_features] = x [n_tokens, in] @ W.T (+ bias)``, W packed in ``fmt_id``."""
    _C.qmatmul(x, packed, int(fmt_id), int(out_features), bias, out)
    return out


def dequantize(packed: np.ndarray, fmt_id: int, out_features: int, in_features: int) -> np.ndarray:
    """The float32 ``[out_features, in_features]`` matrix that ``packed`` holds."""
    return _C.dequantize(packed, int(fmt_id), int(out_features), int(in_features))


def quantize_acts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations ``[n, K]`` quantized as the int8/int4 kernels do: (int8 codes, scales, block sums)."""
    return _C.quantize_acts(x)


def memory_read_bandwidth(size_mib: int = 1024, repeats: int = 7) -> float:
    """Measure the memory read bandwidth the kernel threads reach, in GB/s (median of ``repeats``).

    Reads a ``size_mib`` buffer (far larger than the caches) with ``get_num_threads()`` threads.
    """
    import time

    buf = np.ones(size_mib * 2**20, dtype=np.uint8)  # [bytes], pages touched before timing
    _C.stream_read(buf)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _C.stream_read(buf)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / float(np.median(times)) / 1e9


def cpu_isa() -> str:
    """Name of the active kernel set: ``"generic"``, ``"avx2"``, ``"avx_vnni"``, ``"avx512"``,
    ``"avx512_bf16"`` or ``"amx"``."""
    return _C.active_isa()


def supported_isas() -> list[str]:
    """Kernel sets this CPU can run, from ``"generic"`` up to the best one."""
    return list(_C.supported_isas())


def set_isa(name: str) -> None:
    """Force a kernel set (``"generic"``, ``"avx2"``, ``"avx_vnni"``, ``"avx512"``, ``"avx512_bf16"``,
    ``"amx"`` or ``"auto"``).

    Raises:
        ValueError: the name is unknown or the CPU cannot run it.
    """
    _C.set_isa(name)


def max_num_threads() -> int:
    """The most threads ``set_num_threads`` accepts: 4 per logical CPU.

    More threads than CPUs only adds contention to the kernels; a little oversubscription is
    allowed (tests run 3 threads on 2 cores), but not the thousands that make libgomp's thread
    creation fail, which it answers by exiting the process.
    """
    return 4 * (os.cpu_count() or 1)


def set_num_threads(n: Optional[int]) -> None:
    """Set the number of threads every kernel uses (process-wide).

    By default (and after ``set_num_threads(None)``) the kernels use every CPU, and decode steps
    lower that while other programs keep CPUs busy (``glm4rt.autothreads``); a count set here is
    used as given.

    Args:
        n: an integer in ``[1, max_num_threads()]``, or ``None`` for the default.
    Raises:
        TypeError: ``n`` is not an integer (a float or a string is not rounded or parsed).
        ValueError: ``n`` is out of range.
    """
    if n is None:
        _C.set_num_threads(0)
        return
    if not is_int(n):
        raise TypeError(f"number of threads must be an integer, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    if n > max_num_threads():
        raise ValueError(f"number of threads must be <= {max_num_threads()} (4 per logical CPU), got {n}")
    _C.set_num_threads(int(n))


def num_threads_is_default() -> bool:
    """True unless ``set_num_threads`` (or ``GLM4RT_NUM_THREADS``) chose a count."""
    return _C.num_threads_is_default()


def set_thread_cap(n: int) -> None:
    """At most ``n`` threads for the kernels this Python thread calls (0: no cap); for
    ``glm4rt.autothreads``, which sets it around each decode step."""
    _C.set_thread_cap(int(n))


def get_num_threads() -> int:
    """Number of threads the kernels use (outside a decode step, whose count may be lower)."""
    return _C.get_num_threads()


def _threads_from_env() -> None:
    value = os.environ.get("GLM4RT_NUM_THREADS", "").strip()
    if not value:
        return
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"GLM4RT_NUM_THREADS must be an integer, got {value!r}") from None
    try:
        set_num_threads(n)
    except ValueError as e:
        raise ValueError(f"GLM4RT_NUM_THREADS={value}: {e}") from None


_threads_from_env()
