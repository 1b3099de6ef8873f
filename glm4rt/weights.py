"""Checkpoint reading: safetensors files (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``), memory-mapped, with every header checked against the file.

Tensors come back as NumPy views of the memory map whenever the stored dtype is the one asked for,
so a bf16 checkpoint kept in bf16 is never read into RAM twice. NumPy has no bfloat16: bf16 tensors
are uint16 arrays holding the bit patterns, which the kernels read directly.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError
from .ops import bf16_to_f32, f32_to_bf16

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype -> (numpy dtype of the raw bytes, bytes per element)
_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype, shape and byte range in the file."""
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One safetensors file: header parsed and validated, data memory-mapped on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(
                        f"{path}: header length {header_len} exceeds the file size {size}: "
                        "not a safetensors file, or truncated")
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        data_size = size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{path}: tensor {name!r} of shape {list(shape)} {dtype} needs {expected} bytes "
                    f"but its offsets [{begin}, {end}) span {end - begin}: corrupt header")
            if end > data_size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} needs bytes [{begin}, {end}) of the data section but "
                    f"the file holds only {data_size}: the file is truncated")
            self.tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        self._map: np.memmap | None = None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` as a read-only array view of the memory map."""
        info = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[info.start:info.end].view(_DTYPES[info.dtype]).reshape(info.shape)


class Checkpoint:
    """All tensors of a checkpoint directory, by name.

    Args:
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
    Raises:
        FileNotFoundError: no weights file in the directory, or a shard named by the index is missing.
        CheckpointError: a corrupt index or safetensors file, a tensor listed twice or not where
            the index says.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(directory, SAFE_WEIGHTS_NAME)
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: corrupt index ({type(e).__name__}: {e})") from None
            shards = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.isfile(shard_path):
                    raise FileNotFoundError(f"{index_path} lists shard {shard!r}, which is missing")
                shards[shard] = SafetensorsFile(shard_path)
            self.files = list(shards.values())
            for name, shard in weight_map.items():
                if name not in shards[shard].tensors:
                    raise CheckpointError(f"{index_path} places tensor {name!r} in {shard}, which lacks it")
            for sf in self.files:
                for name, info in sf.tensors.items():
                    self._add(name, sf, info)
        elif os.path.isfile(single):
            sf = SafetensorsFile(single)
            self.files = [sf]
            for name, info in sf.tensors.items():
                self._add(name, sf, info)
        else:
            raise FileNotFoundError(
                f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory!r} "
                "(glm4rt reads safetensors checkpoints)")

    def _add(self, name: str, sf: SafetensorsFile, info: TensorInfo) -> None:
        if name in self.tensors:
            raise CheckpointError(f"tensor {name!r} is stored twice ({self.tensors[name][0].path} and {sf.path})")
        self.tensors[name] = (sf, info)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of ``name``."""
        return self.tensors[name][1]

    def load_raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` exactly as stored, as a read-only view of the memory map."""
        sf, _ = self.tensors[name]
        return sf.raw(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a 2-D float tensor read from the file (not through the memory map,
        so a streamed pass over a large checkpoint keeps only the rows in hand in memory).
        float32 and bf16 (uint16 bits) come back as stored, float16 as float32."""
        sf, info = self.tensors[name]
        if len(info.shape) != 2 or info.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"tensor {name!r} ({info.dtype} {list(info.shape)}) is not a float matrix")
        dtype = _DTYPES[info.dtype]
        row_bytes = info.shape[1] * dtype.itemsize
        with open(sf.path, "rb") as f:
            f.seek(info.start + start * row_bytes)
            raw = f.read((stop - start) * row_bytes)
        if len(raw) != (stop - start) * row_bytes:
            raise CheckpointError(f"{sf.path}: tensor {name!r} is truncated")
        rows = np.frombuffer(raw, dtype=dtype).reshape(stop - start, info.shape[1])
        return rows.astype(np.float32) if info.dtype == "F16" else rows

    def load(self, name: str, dtype: str) -> np.ndarray:
        """Tensor ``name`` as ``dtype``: ``"float32"``, or ``"bfloat16"`` (uint16 bit patterns).

        A view of the memory map when the stored dtype already matches (no copy); else converted.
        """
        sf, info = self.tensors[name]
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}; expected a float tensor")
        raw = sf.raw(name)
        if dtype == "bfloat16":
            return raw if info.dtype == "BF16" else f32_to_bf16(raw.astype(np.float32))
        if info.dtype == "F32":
            return raw
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)


def save_safetensors(path: str, tensors: dict[str, np.ndarray], bf16: frozenset[str] = frozenset(),
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file (names sorted, 8-byte aligned header).

    Args:
        path: the file to write.
        tensors: name -> array (float32, float16 or int); uint16 arrays named in ``bf16`` are
            written as BF16 bit patterns.
        bf16: names of the uint16 arrays that hold bf16.
        metadata: optional ``__metadata__`` strings.
    """
    kinds = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64", np.dtype("<i4"): "I32",
             np.dtype("u1"): "U8"}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if name in bf16:
            if a.dtype != np.uint16:
                raise ValueError(f"{name}: bf16 tensors must be uint16 bit patterns, got {a.dtype}")
            kind = "BF16"
        elif a.dtype.newbyteorder("<") in kinds:
            kind = kinds[a.dtype.newbyteorder("<")]
        else:
            raise ValueError(f"{name}: cannot write dtype {a.dtype} to safetensors")
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a).cast("B"))  # no copy: a 1 GB embedding must not be duplicated
