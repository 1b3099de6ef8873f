"""Small helpers shared by the tests: bf16 values as float64, the console-script command line and
safetensors header order. Pure NumPy over glm4rt.bf16 (no kernels)."""
from __future__ import annotations

import shutil
import sys

import numpy as np

from glm4rt import bf16


def widen_bf16(bits) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float64, exactly: bf16 is the top half of an fp32."""
    return bf16.to_f32(np.asarray(bits, dtype=np.uint16)).astype(np.float64)


def round_bf16(x) -> np.ndarray:
    """x rounded to float32, then to the nearest bf16 value (ties to even), as float64."""
    return widen_bf16(bf16.from_f32(np.asarray(x, dtype=np.float32)))


def glm4rt_command(*args: str) -> list[str]:
    """The ``glm4rt`` console script (``python -m glm4rt`` where it is not installed) with args."""
    exe = shutil.which("glm4rt")
    return [exe, *args] if exe else [sys.executable, "-m", "glm4rt", *args]


def by_offset(header: dict) -> list[str]:
    """The tensor names of a safetensors header in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: tuple(header[k]["data_offsets"]))
