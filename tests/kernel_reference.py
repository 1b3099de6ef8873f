"""float64 readings of the matmul kernels' contracts (csrc/kernels.h, csrc/quant.h), shared by the
kernel, quantization and sweep tests. Written from the documented formats, not from the kernels."""
from __future__ import annotations

import numpy as np

from glm4rt import ops
from glm4rt.quant import format_id
from helpers import round_bf16, widen_bf16


def ref_linear(x, w, bias=None):
    """fp32 weights: x @ w.T; bf16 weights: the activations are rounded to bf16 as well."""
    if w.dtype == np.uint16:
        y = round_bf16(x) @ widen_bf16(w).T
    else:
        y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y


# The kernel sets whose bf16-weight products run on bf16 dot-product instructions (vdpbf16ps, the AMX
# tile unit, ARM's BFDOT): their sums round differently from fp32 FMAs, and denormal inputs are
# flushed to zero.
BF16_DOT_ISAS = ("avx512_bf16", "amx", "bf16")


def takes_amx_tiles(isa: str, m: int) -> bool:
    """Whether a quantized matmul of m tokens runs on the AMX tiles (bf16 activations)."""
    return isa == "amx" and m >= ops.AMX_MIN_TOKENS_QUANT


def ref_qmatmul(x, packed, fmt, n, amx=False):
    """Quantized weights: activations quantized to int8 per block of 32 x the dequantized weights;
    on the AMX tiles, bf16 activations x the dequantized weights rounded to bf16."""
    k = x.shape[1]
    wd = ops.dequantize(packed, format_id(fmt), n, k)
    if amx:
        return round_bf16(x) @ round_bf16(wd).T
    q, s, _ = ops.quantize_acts(x)
    xd = (q.reshape(x.shape[0], -1, 32) * s[..., None]).reshape(x.shape[0], -1)[:, :k]
    return xd.astype(np.float64) @ wd.T.astype(np.float64)
