"""Checkpoint reading: safetensors files (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``), memory-mapped, with every header checked against the file.

Tensors come back as NumPy views of the memory map whenever the stored dtype is the one asked for,
so a bf16 checkpoint kept in bf16 is never read into RAM twice. NumPy has no bfloat16: bf16 tensors
are uint16 arrays holding the bit patterns, which the kernels read directly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .bf16 import from_f32 as f32_to_bf16, to_f32 as bf16_to_f32

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype of the raw bytes. The format's other dtypes (F8_*, F4, F6_*, C64)
# have no NumPy twin and no use in a GLM-4 checkpoint: a tensor stored in one is an error.
_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100_000_000  # the safetensors library's MAX_HEADER_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype, shape and byte range in the file."""
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (the safetensors format's usize): not a bool, float or string."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN / Infinity; JSON does not


class SafetensorsFile:
    """One safetensors file: header parsed and validated, data memory-mapped on first use.

    The checks are the safetensors library's (each failure named here: file, tensor, byte range):
    a JSON header of at most 100 MB, ``__metadata__`` mapping strings to strings, every tensor an
    entry of a known dtype, a shape of integers and ``data_offsets`` whose span is exactly
    ``prod(shape) * itemsize``; the tensors, in offset order, tile the data section from byte 0 to
    its last byte with no gap or overlap. The library then reads the header itself, so a file it
    rejects for a rule of its JSON reader (nesting depth, number range) is never loaded either.

    Raises:
        CheckpointError: the file breaks any of these rules or cannot be read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        header, data_start, data_size = self._read_header()
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(v, str) for v in metadata.values())):
            raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
        self.metadata: dict[str, str] = metadata or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype, shape, begin, end = self._parse_entry(name, entry)
            self.tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        self._check_layout(data_start, data_size)
        try:
            with safe_open(path, framework="numpy"):
                pass
        except SafetensorError as e:
            raise CheckpointError(f"{path}: the safetensors library rejects the file ({e})") from None
        self._map: np.memmap | None | bool = None  # False: the file cannot be mapped

    def _read_header(self) -> tuple[dict, int, int]:
        """The header as a dict, where the data section starts, and its size in bytes."""
        path = self.path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > _MAX_HEADER:
                    raise CheckpointError(
                        f"{path}: header length {header_len} exceeds the safetensors limit of {_MAX_HEADER} "
                        "bytes: not a safetensors file, or a corrupt length field")
                if header_len > size - 8:
                    raise CheckpointError(
                        f"{path}: header length {header_len} exceeds the file size {size}: "
                        "not a safetensors file, or truncated")
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        try:
            header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
        return header, 8 + header_len, size - 8 - header_len

    def _parse_entry(self, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
        """dtype, shape and data-section byte range of one header entry, each checked."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: malformed header entry {entry!r:.200} (needs dtype, shape, "
                                  "data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where} has dtype {dtype!r:.40}, which glm4rt does not read "
                                  f"(one of {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r:.200}: not a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data_offsets {offsets!r:.200}: not [begin, end] with "
                                  "0 <= begin <= end")
        begin, end = offsets
        expected = int(np.prod(shape, dtype=object)) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{where} of shape {shape} {dtype} needs {expected} bytes but its offsets "
                f"[{begin}, {end}) span {end - begin}: corrupt header")
        return dtype, tuple(shape), begin, end

    def _check_layout(self, data_start: int, data_size: int) -> None:
        """The tensors, in offset order, must tile the data section exactly: each one starts where
        the one before ends, and the last ends at the end of the file."""
        path, previous, at = self.path, None, 0
        for info in sorted(self.tensors.values(), key=lambda t: (t.start, t.end)):
            begin, end = info.start - data_start, info.end - data_start
            if begin < at:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r} (bytes [{begin}, {end}) of the data section) overlaps "
                    f"tensor {previous.name!r} (bytes [{previous.start - data_start}, {at})): corrupt offsets")
            if begin > at:
                after = f"tensor {previous.name!r} ends at byte {at}" if previous else "the data section starts at 0"
                raise CheckpointError(
                    f"{path}: tensor {info.name!r} starts at byte {begin} of the data section but {after}: "
                    "the offsets leave a gap (corrupt header)")
            previous, at = info, end
        if at > data_size:
            raise CheckpointError(
                f"{path}: tensor {previous.name!r} needs bytes [{previous.start - data_start}, {at}) of the "
                f"data section but the file holds only {data_size}: the file is truncated")
        if at < data_size:
            last = f"the last tensor, {previous.name!r}, ends" if previous else "no tensor is stored, so the data ends"
            raise CheckpointError(
                f"{path}: {last} at byte {at} of the data section but the file holds {data_size} bytes after "
                "its header: a wrong header length, or bytes appended to the file")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` as a read-only array view of the memory map (a read-only
        copy when the tensor starts at an offset that is not a multiple of its element size, which
        the format allows but the kernels, reading typed pointers, do not)."""
        info = self.tensors[name]
        dtype = _DTYPES[info.dtype]
        data = self._bytes(info)
        view = data.view(dtype).reshape(info.shape)
        if data.ctypes.data % dtype.itemsize == 0:
            return view
        copy = view.copy()
        copy.flags.writeable = False
        return copy

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes: a view of the file's memory map, or (where the file cannot be mapped: a
        file system without mmap, an address space too small) a read-only copy read from the file."""
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                log.warning("%s: cannot memory-map the file (%s); reading its tensors into memory", self.path, e)
                self._map = False
        if self._map is not False:
            return self._map[info.start:info.end]
        data = np.empty(info.end - info.start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            if f.readinto(data) != data.size:
                raise CheckpointError(f"{self.path}: the file is shorter than when it was opened ({info.name!r} is cut)")
        data.flags.writeable = False
        return data


class Checkpoint:
    """All tensors of a checkpoint directory, by name.

    Args:
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
    Raises:
        FileNotFoundError: no weights file in the directory, or a shard named by the index is missing.
        CheckpointError: a corrupt index or safetensors file, a shard path that leaves the directory,
            a tensor listed twice or not where the index says.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(directory, SAFE_WEIGHTS_NAME)
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        if os.path.isfile(index_path):
            weight_map = _read_weight_map(index_path)
            # Shard -> the first tensor the index places in it (named in errors). Spellings of one
            # file ("x" and "./x") are one shard: read twice, its tensors would be stored twice.
            first: dict[str, tuple[str, str]] = {}
            for name, shard in weight_map.items():
                first.setdefault(os.path.normpath(shard), (shard, name))
            shards = {key: SafetensorsFile(_shard_path(directory, index_path, shard, name))
                      for key, (shard, name) in sorted(first.items())}
            self.files = list(shards.values())
            for name, shard in weight_map.items():
                if name not in shards[os.path.normpath(shard)].tensors:
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

    def metadata(self, name: str) -> dict[str, str]:
        """The ``__metadata__`` of the file that holds ``name``."""
        return self.tensors[name][0].metadata

    def load_raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` exactly as stored, as a read-only view of the memory map."""
        sf, _ = self.tensors[name]
        return sf.raw(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a 2-D float tensor read from the file (not through the memory map,
        so a streamed pass over a large checkpoint keeps only the rows in hand in memory).
        float32 and bf16 (uint16 bits) come back as stored, float16 and float64 as float32."""
        sf, info = self.tensors[name]
        if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} ({info.dtype} {list(info.shape)}) is not a float matrix")
        dtype = _DTYPES[info.dtype]
        row_bytes = info.shape[1] * dtype.itemsize
        with open(sf.path, "rb") as f:
            f.seek(info.start + start * row_bytes)
            raw = f.read((stop - start) * row_bytes)
        if len(raw) != (stop - start) * row_bytes:
            raise CheckpointError(f"{sf.path}: tensor {name!r} is truncated")
        rows = np.frombuffer(raw, dtype=dtype).reshape(stop - start, info.shape[1])
        return rows if info.dtype in ("F32", "BF16") else rows.astype(np.float32)

    def load(self, name: str, dtype: str) -> np.ndarray:
        """Tensor ``name`` as ``dtype``: ``"float32"``, or ``"bfloat16"`` (uint16 bit patterns).

        A view of the memory map when the stored dtype already matches (no copy); else converted.
        """
        sf, info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}; expected a float tensor")
        raw = sf.raw(name)
        if dtype == "bfloat16":
            return raw if info.dtype == "BF16" else f32_to_bf16(raw.astype(np.float32))
        if info.dtype == "F32":
            return raw
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name, both strings, each
    shard name relative to the checkpoint directory and inside it."""
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"), parse_constant=_reject_constant)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: corrupt index ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{index_path}: corrupt index (nested too deeply)") from None
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise CheckpointError(f"{index_path}: weight_map places tensor {name!r} in {shard!r:.100}, "
                                  "which is not a file name")
        # Inside the directory as written: relative, without "..". Links are not resolved, so a
        # hub cache's snapshot (links into its blob store) still loads.
        if os.path.isabs(shard) or os.path.splitdrive(shard)[0] or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"{index_path}: weight_map places tensor {name!r} in {shard!r}, outside the "
                                  "checkpoint directory (the index may only name files inside it)")
    return weight_map


def _shard_path(directory: str, index_path: str, shard: str, tensor: str) -> str:
    """The path of ``shard`` (where the index places ``tensor``, among others) in ``directory``.

    Raises:
        FileNotFoundError: no such file.
    """
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{index_path} lists shard {shard!r} (for tensor {tensor!r}), which is missing")
    return path


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
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a).cast("B"))  # no copy: a 1 GB embedding must not be duplicated


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temporary path beside ``path``; when the block ends without an error the file
    written there replaces ``path`` in one rename (else it is removed).

    A loaded model memory-maps its weights file: writing the new file over it in place (a model
    saved back into its own directory) would truncate the pages the model is still reading from
    while it is being written. After the rename the old file lives on, unnamed, until its map
    closes (POSIX). Windows refuses to replace a mapped file: that is a clear error there.
    """
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except PermissionError as e:
            raise PermissionError(
                f"cannot replace {path}: it is open, e.g. memory-mapped by a loaded model (Windows does not "
                f"allow that); save to another directory ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
