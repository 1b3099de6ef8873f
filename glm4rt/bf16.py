"""bfloat16 in pure NumPy (which has no bf16 dtype): bf16 tensors are uint16 bit patterns, the
upper half of a float32. Used by the checkpoint reader and the tests' float64 reference, which
need no compiled extension."""
from __future__ import annotations

import numpy as np


def to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def from_f32(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bit patterns (uint16), round-to-nearest-even as PyTorch does; a NaN
    stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)
