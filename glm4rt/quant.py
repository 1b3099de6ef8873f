"""Quantized linear layers: int8, int4 and q4k weights in the packed block layout of csrc/quant.h.

Formats (blocks of 32 weights of one row; 16 rows interleaved per group):
  int8  q in [-127, 127], w = d * q                        8.5 bits per weight (as llama.cpp Q8_0)
  int4  q in [0, 15],     w = d * (q - 8), scale searched  4.5 bits per weight (as llama.cpp Q4_0)
  q4k   q in [0, 15],     w = (D * sc) * q - (M * mn)      4.625 bits per weight (Q4_K's structure)
        per block an 8-bit scale sc and minimum mn, per row and 256 weights fp16 D and M; the
        scale and minimum are fitted by weighted least squares, optionally weighted by calibration
        activations (``importance``), and ``glm4rt.calibrate`` rounds with GPTQ's error feedback.
The scalar quantizers in csrc/quant.cpp are the specification; the SIMD kernels are tested
against them. Activations are quantized to int8 per block of 32 on the fly (integer dot
products with AVX-512 VNNI / AVX2), and every sum across blocks is fp32.

What is quantized: every projection of every layer and the lm_head. Norms and biases stay fp32
(tiny, and precision-critical); the embedding table stays in the checkpoint's format (a lookup
reads one row per token, so its size costs memory, not time).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import ops

QUANT_FORMATS = {"int8": 0, "int4": 1, "q4k": 2}
Q4K_SUPER = 8  # q4k blocks per super-block (one fp16 D and M per row)
BLOCK_SIZE = 32  # weights of one row per block, under one scale (csrc/quant.h kQBlock)
GROUP_ROWS = 16  # rows per packed group: quantized chunks and fused parts start at multiples


def format_id(fmt: str) -> int:
    """Kernel id of a format name.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {sorted(QUANT_FORMATS)}")
    return QUANT_FORMATS[fmt]


def packed_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Size of a packed ``[out_features, in_features]`` matrix in bytes."""
    return ops.packed_bytes(format_id(fmt), out_features, in_features)


def quantize_rows(rows: np.ndarray, fmt: str, out_features: int, row0: int, packed: np.ndarray,
                  importance: Optional[np.ndarray] = None) -> None:
    """Quantize ``rows`` (float32 or bf16-as-uint16 ``[n, in_features]``), which are rows
    ``row0 .. row0 + n`` of an ``[out_features, in_features]`` matrix, into ``packed``.
    ``row0`` is a multiple of 16 and ``n`` too unless the chunk ends the matrix. ``importance``
    (q4k only): float32 ``[in_features]`` weights of each input feature's squared error, e.g. the
    mean square of the calibration activations that feed it."""
    ops.quantize_pack(rows, format_id(fmt), out_features, row0, packed, importance)


def quantize_weight(weight: np.ndarray, fmt: str, importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Quantize a whole ``[out, in]`` matrix (float32 or bf16 bits); returns the packed bytes."""
    n, k = weight.shape
    packed = np.empty(packed_bytes(fmt, n, k), dtype=np.uint8)
    quantize_rows(weight, fmt, n, 0, packed, importance)
    return packed


# The codes of pack_codes, and the byte each stores as: int8 q + 128 (unsigned, for VNNI); int4 the
# nibble itself, w = d * (q - 8) (csrc/quant.h QBlock). A zero weight (padding) is q = 0 / q = 8.
CODE_RANGE = {"int8": (-127, 127), "int4": (0, 15)}
_STORE_SHIFT = {"int8": 128, "int4": 0}
_ZERO_CODE = {"int8": 0, "int4": 8}


def pack_codes(codes: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """Pack weights that are quantized already, without rounding them again: ``w[n, k] =
    scales[n, k // 32] * codes[n, k]`` (int8) or ``scales[n, k // 32] * (codes[n, k] - 8)``
    (int4), in the layout of csrc/quant.h. This is how llama.cpp's Q8_0 and Q4_0 blocks become
    glm4rt's int8 and int4 exactly (the same values, another byte order).

    Args:
        codes: ``[out, in]`` integers: int8 in [-127, 127], int4 in [0, 15].
        scales: ``[out, ceil(in / 32)]`` fp16 scales, as float16 or their uint16 bits.
        fmt: ``"int8"`` or ``"int4"``.
    Raises:
        ValueError: shapes that do not match, or codes out of range (int8's -128, which Q8_0 can
            hold but llama.cpp's quantizer never writes, has no glm4rt code).
    """
    format_id(fmt)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [out, in], got shape {codes.shape}")
    n, k = codes.shape
    nb = -(-k // BLOCK_SIZE)
    bits = np.asarray(scales)
    bits = bits.view(np.uint16) if bits.dtype == np.float16 else bits
    if bits.dtype != np.uint16 or bits.shape != (n, nb):
        raise ValueError(f"scales must be float16 [{n}, {nb}], got {np.asarray(scales).dtype} {np.asarray(scales).shape}")
    lo, hi = CODE_RANGE[fmt]
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{fmt} codes must be in [{lo}, {hi}], got [{codes.min()}, {codes.max()}]")
    g = -(-n // GROUP_ROWS)
    shift = _STORE_SHIFT[fmt]
    chunks = _code_chunks(codes + shift, _ZERO_CODE[fmt] + shift, fmt == "int4")
    scale_bytes = _per_block_rows(bits, g, nb).astype("<u2").view(np.uint8)
    packed = np.concatenate([chunks, scale_bytes], axis=2).reshape(-1)
    assert packed.size == packed_bytes(fmt, n, k)
    return packed


def _code_chunks(stored: np.ndarray, pad: int, nibbles: bool) -> np.ndarray:
    """The code bytes of every block, ``[groups, blocks, 512 or 256]``, from the stored codes
    ``[out, in]`` (rows past ``out`` and columns past ``in`` get ``pad``)."""
    n, k = stored.shape
    g, nb = -(-n // GROUP_ROWS), -(-k // BLOCK_SIZE)
    full = np.full((g * GROUP_ROWS, nb * BLOCK_SIZE), pad, np.int32)
    full[:n, :k] = stored
    # [group, block, k, row]: chunk c holds 4 bytes of each row (row r at bytes 4r .. 4r + 3).
    q = full.reshape(g, GROUP_ROWS, nb, BLOCK_SIZE).transpose(0, 2, 3, 1)
    if nibbles:  # byte j of chunk c: k = 4c + j in the low nibble, k = 16 + 4c + j in the high one
        q = q[:, :, :16] | (q[:, :, 16:] << 4)
    return q.reshape(g, nb, -1, 4, GROUP_ROWS).transpose(0, 1, 2, 4, 3).reshape(g, nb, -1).astype(np.uint8)


def _per_block_rows(values: np.ndarray, g: int, nb: int) -> np.ndarray:
    """``values [out, nb]`` (one per row and block) as ``[groups, nb, 16]``, zeros past ``out``."""
    full = np.zeros((g * GROUP_ROWS, nb), values.dtype)
    full[:values.shape[0]] = values
    return np.ascontiguousarray(full.reshape(g, GROUP_ROWS, nb).transpose(0, 2, 1))


def pack_q4k(codes: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack q4k weights that are quantized already: ``w[n, k] = (d[n, s] * sc[n, b]) * codes[n, k]
    - m[n, s] * mn[n, b]`` with ``b = k // 32`` and ``s = b // 8``, in the layout of csrc/quant.h.

    Args:
        codes: ``[out, in]`` integers in [0, 15].
        sc, mn: ``[out, ceil(in / 32)]`` integers in [0, 255].
        d, m: ``[out, ceil(in / 256)]`` fp16 (float16 or their uint16 bits).
    Raises:
        ValueError: shapes that do not match, or values out of range.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [out, in], got shape {codes.shape}")
    n, k = codes.shape
    nb = -(-k // BLOCK_SIZE)
    ns = -(-nb // Q4K_SUPER)
    g = -(-n // GROUP_ROWS)
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"q4k codes must be in [0, 15], got [{codes.min()}, {codes.max()}]")
    subs = []
    for name, a in (("sc", sc), ("mn", mn)):
        a = np.asarray(a)
        if a.shape != (n, nb) or (a.size and (a.min() < 0 or a.max() > 255)):
            raise ValueError(f"{name} must be [{n}, {nb}] integers in [0, 255], got {a.dtype} {a.shape}")
        subs.append(_per_block_rows(a.astype(np.uint8), g, nb))
    heads = []
    for name, a in (("d", d), ("m", m)):
        a = np.asarray(a)
        a = a.view(np.uint16) if a.dtype == np.float16 else a
        if a.dtype != np.uint16 or a.shape != (n, ns):
            raise ValueError(f"{name} must be float16 [{n}, {ns}], got {np.asarray(d).dtype} {a.shape}")
        heads.append(_per_block_rows(a, g, ns).astype("<u2").view(np.uint8))  # [g, ns, 32]
    blocks = np.concatenate([_code_chunks(codes, 0, True)] + subs, axis=2).reshape(g, -1)
    headers = np.concatenate(heads, axis=2).reshape(g, -1)
    packed = np.concatenate([blocks, headers], axis=1).reshape(-1)
    assert packed.size == packed_bytes("q4k", n, k)
    return packed


class QuantLinear:
    """``y = x @ W.T (+ bias)`` with W packed int8/int4 (the twin of ``model.Linear``).

    Args:
        packed: uint8 ``[packed_bytes]`` (may be a read-only memory map of a saved checkpoint).
        fmt: ``"int8"`` or ``"int4"``.
        out_features, in_features: the shape of W.
        bias: optional float32 ``[out_features]``.
    """

    def __init__(self, packed: np.ndarray, fmt: str, out_features: int, in_features: int,
                 bias: Optional[np.ndarray] = None) -> None:
        expected = packed_bytes(fmt, out_features, in_features)
        if packed.dtype != np.uint8 or packed.shape != (expected,):
            raise ValueError(f"packed {fmt} weight [{out_features}, {in_features}] must be {expected} "
                             f"uint8 bytes, got {packed.dtype} {packed.shape}")
        self.packed, self.fmt, self.bias = packed, fmt, bias
        self.out_features, self.in_features = int(out_features), int(in_features)
        self._fmt_id = format_id(fmt)

    def __call__(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``x [n_tokens, in_features]`` float32 -> ``[n_tokens, out_features]``."""
        n_tokens, k = ops.check_dims("x", x, 2)
        if k != self.in_features:  # the packed size only tells K to the next block of 32
            raise ValueError(f"x: dimension 1 must be {self.in_features} (in_features), got shape {x.shape}")
        if out is None:
            out = np.empty((n_tokens, self.out_features), dtype=np.float32)
        return ops.qmatmul(x, self.packed, self._fmt_id, self.out_features, self.bias, out)

    def parameters(self, name: str) -> dict[str, np.ndarray]:
        """Checkpoint tensors of this layer under module name ``name``."""
        out = {name + ".qweight": self.packed}
        if self.bias is not None:
            out[name + ".bias"] = self.bias
        return out

    def dequantize(self) -> np.ndarray:
        """The float32 ``[out, in]`` matrix the packed bytes represent."""
        return ops.dequantize(self.packed, self._fmt_id, self.out_features, self.in_features)
