"""A seeded, time-bounded mutation fuzzer of checkpoints: safetensors headers and data, the shard
index, config.json and quantized checkpoints' metadata, each damaged copy loaded by
``Glm4ForCausalLM.from_pretrained`` and run on 3 tokens in a worker process.

    python tests/fuzz_checkpoints.py --cases 5000 --seconds 600       # the long local run
    python tests/fuzz_checkpoints.py --seed 0 --case 137 --keep /tmp/c  # replay one case, keep its files

Case ``i`` of seed ``s`` is a copy of one base checkpoint (fp32, bf16 sharded with an index, tied
with a 5.x config, int4, int8 tied) with one to three mutations, all drawn from
``random.Random(f"{s}:{i}")``: the same seed and case number make the same files on any machine.
Each mutation says what a correct loader must do with it: reject it (``invalid``: an escaping
shard path, NaN rope_theta ...), load it to the very logits of the base (``neutral``: a header
re-encoded, a metadata string added), or either (a size changed to another valid-looking value).
The safetensors library is the oracle for the files themselves: a file that ``safe_open``
rejects must not load.

Outcomes, of which only the first is a pass:
  ok         rejected with CheckpointError / ConfigError / FileNotFoundError whose message names
             the damaged file, tensor or field; or loaded, with finite logits unless the mutation
             changed what the stored numbers mean, and with the base's exact logits when neutral.
  crash      the worker died (a signal, an abort) without reporting.
  hang       no report within the case timeout.
  silent     loaded although the oracle rejects a file or the mutation is invalid; or loaded to
             NaN/inf logits, or other logits than the base's after a neutral mutation.
  unclear    any other exception (TypeError, RecursionError, MemoryError ...), or a message that
             names none of what was damaged.
  refused    a neutral mutation (a valid file, the same weights) rejected.

Workers load many cases each (importing glm4rt once); a worker that crashes or hangs loses only
the case it was running, and a fresh one takes the next.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import fuzz_worker
from helpers import by_offset

TESTS = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(TESTS, "fixtures")
INDEX = "model.safetensors.index.json"
CLEAR_ERRORS = ("CheckpointError", "ConfigError", "FileNotFoundError")
OUTCOMES = ("ok", "crash", "hang", "silent", "unclear", "refused")


# ---- bases ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Base:
    """One valid checkpoint that cases start from, with its reference logits."""
    name: str
    dir: str
    files: list[str]          # its safetensors files
    config: dict
    quantized: bool
    sha: str = ""             # of the logits its unmutated copy loads to


def make_bases(workdir: str) -> list[Base]:
    """Copy the fixtures the cases start from into ``workdir``, and save two quantized ones."""
    import glm4rt

    bases = []
    for name, fixture, fmt in (("fp32", "gqa1_official", None), ("bf16_sharded", "gqa8_bf16_sharded", None),
                               ("tied_v5", "gqa2_nobias_tied_v5", None), ("int4", "gqa1_official", "int4"),
                               ("int8_tied", "gqa2_nobias_tied_v5", "int8")):
        target = os.path.join(workdir, "bases", name)
        if fmt is None:
            shutil.copytree(os.path.join(FIXTURES, fixture), target,
                            ignore=shutil.ignore_patterns("golden.npz", "generation_config.json"))
        else:
            glm4rt.Glm4ForCausalLM.from_pretrained(os.path.join(FIXTURES, fixture), quantization=fmt,
                                                   progress=False).save_pretrained(target)
        with open(os.path.join(target, "config.json")) as f:
            config = json.load(f)
        files = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
        bases.append(Base(name, target, files, config, fmt is not None))
    return bases


# ---- safetensors files, read and written independently of glm4rt --------------------------------

def read_st(path: str) -> tuple[dict, bytes]:
    """(header, data section) of a valid safetensors file.

    Raises:
        ValueError: a header length past the end of the file, or a header that does not parse.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: header length {n} past the end of the file")
        return json.loads(f.read(n)), f.read()


def write_st(path: str, header: dict, data: bytes, spaces: int = 0, blob: Optional[bytes] = None,
             length_delta: int = 0) -> None:
    """Write a header (``blob`` if given, else ``header`` as JSON padded to 8 bytes plus
    ``spaces``), a length field off by ``length_delta``, and ``data``."""
    if blob is None:
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8 + spaces)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + data)


def oracle_rejects(path: str) -> bool:
    """Whether the safetensors library refuses the file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy"):
            return False
    except SafetensorError:
        return True


def files_read(case_dir: str) -> list[str]:
    """The safetensors files a loader reads: the index's shards (those that are plain names of
    files in the directory), else model.safetensors."""
    index = os.path.join(case_dir, INDEX)
    if not os.path.isfile(index):
        single = os.path.join(case_dir, "model.safetensors")
        return [single] if os.path.isfile(single) else []
    try:
        with open(index) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return []
    return [os.path.join(case_dir, s) for s in sorted(shards, key=str)
            if isinstance(s, str) and s and "/" not in s and "\\" not in s and s not in (".", "..")
            and "\0" not in s and os.path.isfile(os.path.join(case_dir, s))]


# ---- mutations --------------------------------------------------------------------------------

@dataclasses.dataclass
class Mutation:
    """What was done and what a correct loader must make of it."""
    desc: str
    invalid: Optional[bool] = None  # True: must be rejected; False: must load; None: either
    neutral: bool = False           # loads to the base's exact logits
    reinterprets: bool = False      # stored numbers mean something else: logits may be anything
    names: tuple[str, ...] = ()     # an error message must contain one of these
    key: tuple = ()                 # what it set: a later mutation setting it again voids the above


class Case:
    """A base's copy being mutated."""

    def __init__(self, base: Base, directory: str, rng: random.Random) -> None:
        self.base, self.dir, self.rng = base, directory, rng

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def st_file(self) -> str:
        return self.rng.choice(self.base.files)

    def tensor(self, header: dict, prefer_qweight: bool = True) -> str:
        names = by_offset(header)
        packed = [n for n in names if n.endswith(".qweight")]
        return self.rng.choice(packed if packed and prefer_qweight and self.rng.random() < 0.5 else names)

    def original(self, name: str, tensor: str) -> dict:
        """The base's header entry for ``tensor`` of file ``name`` (empty when the base has none):
        what a mutation compares with, whatever earlier ones did."""
        return read_st(os.path.join(self.base.dir, name))[0].get(tensor, {})

    def config(self) -> dict:
        with open(self.path("config.json")) as f:
            return json.load(f)

    def write_config(self, config: dict) -> None:
        with open(self.path("config.json"), "w") as f:
            json.dump(config, f)


_ITEMSIZE = {"F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "U8": 1, "I8": 1,
             "BOOL": 1, "F64": 8, "I64": 8, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOATS = ("F32", "F16", "BF16", "F64")


def m_length_field(c: Case) -> Mutation:
    """The header-length field moved, on a header that may end in padding spaces."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    spaces = c.rng.randrange(0, 9)
    delta = c.rng.choice([-1, -1, -2, -3, -8, 1, 2, 8, -(1 << 12), 1 << 40])
    write_st(c.path(name), header, data, spaces=spaces, length_delta=delta)
    return Mutation(f"{name}: header length {delta:+d} (header padded by {spaces} more)", names=(name,))


def m_header_bytes(c: Case) -> Mutation:
    """A few bytes of the header JSON replaced."""
    name = c.st_file()
    with open(c.path(name), "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.path.getsize(c.path(name)) - 8:  # an earlier mutation's length: no header to write in
            raise ValueError("header length past the end of the file")
        where = []
        for _ in range(c.rng.randint(1, 3)):
            pos = 8 + c.rng.randrange(n)
            byte = c.rng.choice([c.rng.randrange(256), *b'{}[]",:0123456789 -.eE\\'])
            f.seek(pos)
            f.write(bytes([byte]))
            where.append(f"{pos}={byte:#x}")
    return Mutation(f"{name}: header bytes {' '.join(where)}", reinterprets=True, names=(name,))


def m_offsets(c: Case) -> Mutation:
    """A tensor's data_offsets moved, overlapped, swapped, reversed or made no integers."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    t = c.tensor(header)
    begin, end = header[t]["data_offsets"]
    size = end - begin
    kind = c.rng.choice(["shift", "shift", "begin", "end", "neighbour", "past_end", "huge", "reverse",
                         "negative", "float", "string", "swap"])
    delta = c.rng.choice([1, 2, 4, 8, size or 1]) * c.rng.choice([-1, 1])
    reinterprets = False
    new = {"shift": [begin + delta, end + delta], "begin": [begin + delta, end], "end": [begin, end + delta],
           "past_end": [len(data) + 8, len(data) + 8 + size], "huge": [begin, 2**64 - 1],
           "reverse": [end, begin], "negative": [-begin - 1, end], "float": [float(begin), float(end)],
           "string": [str(begin), str(end)]}.get(kind)
    if kind == "neighbour":
        other = c.rng.choice(by_offset(header))
        new = header[other]["data_offsets"]
    elif kind == "swap":  # two tensors of one size trade places: a valid file holding other weights
        same = [o for o in by_offset(header)
                if o != t and header[o]["data_offsets"][1] - header[o]["data_offsets"][0] == size]
        if same:
            other = c.rng.choice(same)
            header[other]["data_offsets"], new = [begin, end], header[other]["data_offsets"]
            reinterprets = True
        else:
            new = [begin, end]
    header[t]["data_offsets"] = new
    write_st(c.path(name), header, data)
    return Mutation(f"{name}: {t} data_offsets {kind} -> {new}", reinterprets=reinterprets, names=(name, t),
                    key=(name, t, "data_offsets"))


def m_dtype(c: Case) -> Mutation:
    """A tensor's dtype changed: to one of the same size (a valid file), another size, or no dtype."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    t = c.tensor(header)
    old = header[t]["dtype"]
    same = [d for d, s in _ITEMSIZE.items() if s == _ITEMSIZE[old] and d != old]
    new = c.rng.choice(same + same + ["F32", "F16", "F64", "F33", old.lower(), "F8_E4M3", "C64", 5, None])
    header[t]["dtype"] = new
    write_st(c.path(name), header, data)
    allowed = ("U8",) if t.endswith(".qweight") else _FLOATS
    original = c.original(name, t).get("dtype")
    return Mutation(f"{name}: {t} dtype {old} -> {new!r}", invalid=True if new not in allowed else None,
                    neutral=new == original, reinterprets=new != original, names=(name, t), key=(name, t, "dtype"))


def m_shape(c: Case) -> Mutation:
    """A tensor's shape changed: a dimension moved, split, dropped, added, or not an integer."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    t = c.tensor(header)
    shape = list(header[t]["shape"])
    kind = c.rng.choice(["plus", "minus", "transpose", "add_one", "split", "zero", "negative", "float",
                         "string", "huge", "null"])
    if kind in ("plus", "minus"):
        i = c.rng.randrange(len(shape))
        shape[i] += 1 if kind == "plus" else -1
    elif kind == "transpose":
        shape = shape[::-1]
    elif kind == "add_one":
        shape.insert(c.rng.randrange(len(shape) + 1), 1)
    elif kind == "split" and shape[0] % 2 == 0:
        shape = [2, shape[0] // 2] + shape[1:]
    elif kind == "zero":
        shape[0] = 0
    elif kind == "negative":
        shape[0] = -shape[0]
    elif kind == "float":
        shape[0] = float(shape[0])
    elif kind == "string":
        shape[0] = str(shape[0])
    elif kind == "huge":
        shape[0] = 2**62
    elif kind == "null":
        shape = None
    unchanged = shape == c.original(name, t).get("shape")
    header[t]["shape"] = shape
    write_st(c.path(name), header, data)
    return Mutation(f"{name}: {t} shape {kind} -> {shape}", invalid=None if unchanged else True,
                    neutral=unchanged, names=(name, t), key=(name, t, "shape"))


def m_data_size(c: Case) -> Mutation:
    """The file cut short or grown at the end."""
    name = c.st_file()
    size = os.path.getsize(c.path(name))
    delta = c.rng.choice([-1, -2, -4, -64, -(size // 2), 1, 4, 8, 4096])
    with open(c.path(name), "r+b") as f:
        if delta < 0:
            f.truncate(size + delta)
        else:
            f.seek(0, 2)
            f.write(bytes(c.rng.randrange(256) for _ in range(delta)))
    # The oracle judges: a cut undone by a later growth leaves a valid file with another last byte.
    return Mutation(f"{name}: file size {delta:+d}", reinterprets=True, names=(name,))


def m_data_bytes(c: Case) -> Mutation:
    """Bytes of the data section changed: a valid file holding other numbers."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    data = bytearray(data)
    for _ in range(c.rng.randint(1, 8)):
        data[c.rng.randrange(len(data))] = c.rng.randrange(256)
    write_st(c.path(name), header, bytes(data))
    return Mutation(f"{name}: data bytes changed", invalid=False, reinterprets=True, names=(name,))


def m_metadata(c: Case) -> Mutation:
    """__metadata__ given another string entry (harmless), replaced, or made no str -> str map."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    old = header.get("__metadata__") or {}
    value = c.rng.choice([dict(old, note="fuzz"), dict(old, format="np"), {}, None, dict(old, format=1),
                          {"a": None}, "pt", ["pt"], {"a": {"b": "c"}}])
    header["__metadata__"] = value
    write_st(c.path(name), header, data)
    ok = value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))
    # A quantized checkpoint's record of its matrices (glm4rt.qweight_shapes) must stay.
    ok = ok and all(k in (value or {}) for k in old if k.startswith("glm4rt."))
    return Mutation(f"{name}: __metadata__ = {value!r:.80}", invalid=not ok, neutral=ok, names=(name,),
                    key=(name, "__metadata__"))


def m_reencode(c: Case) -> Mutation:
    """The header rewritten with the same meaning: entries and keys in another order, other
    padding (which moves every tensor's alignment), spaces around the JSON."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    items = list(header.items())
    c.rng.shuffle(items)
    shuffled = {}
    for k, v in items:
        fields = list(v.items()) if k != "__metadata__" else None
        if fields:
            c.rng.shuffle(fields)
        shuffled[k] = dict(fields) if fields else v
    text = json.dumps(shuffled, indent=c.rng.choice([None, 1]))
    blob = (" " * c.rng.randrange(3) + text).encode()
    blob += b" " * c.rng.randrange(16)
    write_st(c.path(name), header, data, blob=blob)
    return Mutation(f"{name}: header re-encoded ({len(blob)} bytes)", invalid=False, neutral=True, names=(name,))


def m_extra_field(c: Case) -> Mutation:
    """An unknown field in a tensor's entry: plain (ignored by the library), NaN, a number out of
    range, or nested past the library's JSON reader (128 levels) or Python's (1000)."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    t = c.tensor(header)
    kind = c.rng.choice(["plain", "nan", "big", "deep"])
    depth = c.rng.choice([3, 120, 200, 2000])
    value = {"plain": '"hello"', "nan": "NaN", "big": "1e400", "deep": "[" * depth + "]" * depth}[kind]
    text = json.dumps(header)
    entry = text.index(json.dumps(t) + ": {") + len(json.dumps(t)) + 3  # just inside the entry's braces
    write_st(c.path(name), header, data, blob=(text[:entry] + f'"x": {value}, ' + text[entry:]).encode())
    plain = kind == "plain" or (kind == "deep" and depth == 3)
    # The oracle judges the rest: its JSON reader stops at 128 levels, counting the header's own two.
    return Mutation(f"{name}: {t} extra field {kind} ({len(value)} chars)", invalid=False if plain else None,
                    neutral=True, names=(name, t), key=(name, t, "x"))


def m_rename(c: Case) -> Mutation:
    """A tensor renamed, dropped with its bytes, duplicated as a JSON key, or a zero-size tensor added."""
    name = c.st_file()
    header, data = read_st(c.path(name))
    t = c.tensor(header, prefer_qweight=False)
    kind = c.rng.choice(["rename", "drop", "duplicate", "zero_size"])
    if kind == "rename":
        header["model.layers.0.fuzz.weight" if c.rng.random() < 0.5 else t + "_"] = header.pop(t)
        write_st(c.path(name), header, data)
        return Mutation(f"{name}: {t} renamed", invalid=True, names=(name, t, "fuzz"))
    if kind == "drop":  # a valid file without the tensor: offsets of the ones after it move down
        begin, end = header.pop(t)["data_offsets"]
        for other in header:
            if other != "__metadata__" and header[other]["data_offsets"][0] >= end:
                header[other]["data_offsets"] = [o - (end - begin) for o in header[other]["data_offsets"]]
        write_st(c.path(name), header, data[:begin] + data[end:])
        # Dropping what an earlier mutation added may leave the base itself.
        return Mutation(f"{name}: {t} dropped", invalid=True if c.original(name, t) else None, names=(name, t),
                        key=(name, t, "entry"))
    if kind == "duplicate":  # the later entry wins, as in the library: a second copy of the same entry
        text = json.dumps(header)
        blob = text[:-1] + f", {json.dumps(t)}: {json.dumps(header[t])}}}"
        write_st(c.path(name), header, data, blob=blob.encode())
        return Mutation(f"{name}: {t} listed twice", invalid=False, neutral=True, names=(name, t))
    empty = "model.layers.0.empty.weight"
    header[empty] = {"dtype": "F32", "shape": [0], "data_offsets": [len(data), len(data)]}
    write_st(c.path(name), header, data)
    return Mutation(f"{name}: a zero-size tensor added", invalid=True, names=(name, "empty"), key=(name, empty, "entry"))


def m_index(c: Case) -> Mutation:
    """The index's weight_map changed: a shard path that leaves the directory or names no file,
    a tensor that is nowhere, an entry dropped, or the file itself broken."""
    path = c.path(INDEX)
    with open(path) as f:
        index = json.load(f)
    wm = index["weight_map"]
    t = c.rng.choice(sorted(wm))
    shard = wm[t]
    dirname = os.path.basename(c.dir)
    kind = c.rng.choice(["absolute", "dotdot", "dotdot_inside", "dot", "missing", "not_str", "empty",
                         "extra_tensor", "drop", "total_size", "garbage", "deep", "not_dict", "no_map", "nan"])
    names = (INDEX, t, shard)
    value: object = {"absolute": os.path.abspath(c.path(shard)), "dotdot": f"../{dirname}/{shard}",
                     "dotdot_inside": f"sub/../{shard}", "dot": f"./{shard}", "missing": "model-00099.safetensors",
                     "not_str": c.rng.choice([7, None, [shard], {"file": shard}, True]), "empty": ""}.get(kind)
    if kind in ("absolute", "dotdot", "dotdot_inside", "missing", "not_str", "empty"):
        wm[t] = value
        mutation = Mutation(f"index: {t} -> {value!r}", invalid=True, names=names, key=("index", t))
    elif kind == "dot":
        wm[t] = value
        mutation = Mutation(f"index: {t} -> {value!r}", invalid=False, neutral=True, names=names, key=("index", t))
    elif kind == "extra_tensor":
        wm["model.layers.0.ghost.weight"] = shard
        mutation = Mutation("index: a tensor no shard holds", invalid=True, names=names + ("ghost",))
    elif kind == "drop":  # the shard still holds the tensor (and others keep the shard listed, mostly)
        del wm[t]
        mutation = Mutation(f"index: {t} dropped", names=names, key=("index", t),
                            neutral=shard in wm.values(), invalid=None if shard in wm.values() else True)
    elif kind == "total_size":
        index.setdefault("metadata", {})["total_size"] = c.rng.choice([0, -1, "x", None])
        mutation = Mutation("index: metadata.total_size", invalid=False, neutral=True, names=names)
    else:
        text = {"garbage": json.dumps(index)[: c.rng.randrange(1, 40)],
                "deep": '{"weight_map": ' + "[" * 100000 + "]" * 100000 + "}",
                "not_dict": json.dumps({"weight_map": sorted(wm)}), "no_map": json.dumps({"metadata": {}}),
                "nan": json.dumps({"weight_map": dict(wm, **{t: float("nan")})})}[kind]
        with open(path, "w") as f:
            f.write(text)
        return Mutation(f"index: {kind}", invalid=True, names=names)
    with open(path, "w") as f:
        json.dump(index, f)
    return mutation


# Config fields: values that must load and values that must not. The sizes are valid only as the
# base has them (another is a mismatch); of the rest, only these change the logits of 3 tokens.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim")
_CHANGE_LOGITS = ("rope_theta", "rms_norm_eps", "partial_rotary_factor", "tie_word_embeddings")
_BAD_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1, 0, 1e308, 1e-300, "1", None, [], {}, True]
_CONFIG_VALUES: dict[str, tuple[list, list]] = {
    "rope_theta": ([1.0, 2.0, 500.0, 10000, 1e6], _BAD_NUMBERS + [0.5, 1e39]),
    "rms_norm_eps": ([1e-6, 1e-5, 0.1, 0, 1], _BAD_NUMBERS[:3] + [-1e-5, 2.0, 1e308, "1e-5", None, [1e-5], True]),
    "partial_rotary_factor": ([1.0, 0.5], [0, -0.5, 1.5, float("nan"), "0.5", None, True]),
    "hidden_act": (["silu", "swish"], ["gelu", None, 1, ["silu"], ""]),
    "use_cache": ([True, False], ["yes", None, 1]),
    "attention_dropout": ([0.0, 0.5], [-0.1, 2, "0", None, float("nan")]),
    "initializer_range": ([0.0, 0.02, 1.0], [-0.02, "0.02", None, float("inf")]),
    "max_position_embeddings": ([3, 64, 4096, 10**6], [0, -1, 2**31, 64.0, "64", None, True]),
    "pad_token_id": ([0, None, 5, [0, 1]], ["0", -1, 1.5, [1, "2"], {}, True]),
    "eos_token_id": ([2, [1, 2], None, 10**6], ["2", -2, [1.0], 2**31, {"id": 2}]),
    "bos_token_id": ([None, 1], [-1, "1", [None]]),
    "model_type": (["glm4", None], ["chatglm", 5, ["glm4"]]),
    "rope_scaling": ([None, {"rope_type": "default"}], ["yarn", {"type": "linear", "factor": 2.0}, 4, [1]]),
    "rope_parameters": ([], [{"rope_type": "yarn"}, "default", [1], 3, {"rope_theta": float("nan")},
                             {"rope_theta": 0}, {"partial_rotary_factor": 3}]),
    "num_labels": ([1, 3], [0, "3", 10**12, -1, 2.5]),
    "id2label": ([{"0": "a"}, {"0": "a", "1": "b"}], [[1], {"a": "x"}, {"0": 1}, "labels", {"-1": "x"}]),
    "label2id": ([{"a": 0}], [["a"], {"a": "0"}, 3]),
    "problem_type": ([None, "regression"], ["ranking", 1, []]),
    "dtype": (["bfloat16", None], [16, ["bf16"]]),
    "architectures": ([["Glm4ForCausalLM"], None], ["Glm4ForCausalLM", [1]]),
    "quantization_config": ([], ["int4", [1], {"quant_method": "gptq", "bits": 4}, 5]),
    "attention_bias": ([], ["true", 1, None]),  # its flip is a mismatch: see below
    "tie_word_embeddings": ([True, False], ["true", 1, None]),
    "to_dict": ([], [1, None]),  # names of Glm4Config's methods and properties
    "rotary_dim": ([], [64]),
    "__class__": ([], [1]),
    "fuzz_extra_field": ([1, "x", None, [1, [2]], {"a": {"b": 1}}], []),
}


def m_config_value(c: Case) -> Mutation:
    """One config.json field set to a valid or an invalid value, or removed."""
    config, base = c.config(), c.base.config
    field = c.rng.choice(sorted(_CONFIG_VALUES) + list(_SIZES) * 2)
    if field in config and c.rng.random() < 0.1:  # the default takes its place
        del config[field]
        c.write_config(config)
        return Mutation(f"config: {field} removed", reinterprets=True, names=(field, "config"), key=("config", field))
    if field in _SIZES:
        good, bad = [base[field]], [base[field] + 1, base[field] - 1, 10**9, 10**12, 0, -1, "8", 2.0, True, []]
    else:
        good, bad = _CONFIG_VALUES[field]
    if field == "attention_bias":
        bad = bad + [not base[field]]
    valid = bool(good) and (not bad or c.rng.random() < 0.4)
    value = c.rng.choice(good if valid else bad)
    if field in ("rope_theta", "partial_rotary_factor") and isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"][field] = value  # the 5.x dialect: the nested value is the one read
        base = base["rope_parameters"]
    else:
        config[field] = value
    c.write_config(config)
    desc, names, key = f"config: {field} = {value!r:.60}", (field, "config"), ("config", field)
    if field == "tie_word_embeddings" and value != base[field]:
        # Tying an untied checkpoint ignores its lm_head (as transformers does); untying a tied one
        # needs an lm_head, which only the quantized tied base stores (its own copy).
        return Mutation(desc, reinterprets=True, names=names, key=key)
    changes = field in _CHANGE_LOGITS and value != base.get(field, value)
    return Mutation(desc, invalid=not valid, neutral=valid and not changes, reinterprets=changes, names=names,
                    key=key)


def m_config_file(c: Case) -> Mutation:
    """config.json as a whole: truncated, not an object, not UTF-8, deeply nested, a huge number."""
    text = json.dumps(c.config())
    kind = c.rng.choice(["truncated", "list", "latin1", "empty", "deep", "digits", "bom"])
    body = {"truncated": text[: c.rng.randrange(1, len(text))].encode(), "list": b"[1, 2]",
            "latin1": text.replace('"silu"', '"s\xefl\xfc"').encode("latin-1"), "empty": b"",
            "deep": (text[:-1] + ', "deep_field": ' + "[" * 100000 + "]" * 100000 + "}").encode(),
            "digits": (text[:-1] + ', "hidden_size": ' + "9" * 5000 + "}").encode(),
            "bom": b"\xef\xbb\xbf" + text.encode()}[kind]
    with open(c.path("config.json"), "wb") as f:
        f.write(body)
    return Mutation(f"config.json: {kind}", invalid=None if kind == "bom" else True,
                    names=("config.json", "deep_field", "hidden_size", "hidden_act"))


def m_quant_config(c: Case) -> Mutation:
    """A quantized checkpoint's quantization_config changed."""
    config = c.config()
    qc = config["quantization_config"]
    kind = c.rng.choice(["swap_format", "format", "method", "block_size", "group_rows", "remove", "not_dict"])
    if kind == "swap_format":
        qc["format"] = "int8" if qc["format"] == "int4" else "int4"
    elif kind == "format":
        qc["format"] = c.rng.choice(["int3", "INT4", "", None, 4, ["int4"]])
    elif kind == "method":
        qc["quant_method"] = c.rng.choice(["gptq", "awq", None, 1])
    elif kind == "block_size":
        qc["block_size"] = c.rng.choice([16, 64, 0, "32", 32.0])
    elif kind == "group_rows":
        qc["group_rows"] = c.rng.choice([8, 32, None])
    elif kind == "remove":
        del config["quantization_config"]
    else:
        config["quantization_config"] = c.rng.choice(["int4", [qc], 1])
    c.write_config(config)
    return Mutation(f"config: quantization_config {kind} -> {config.get('quantization_config')!r:.80}",
                    invalid=True, names=("quantization_config", "qweight", "config"),
                    key=("config", "quantization_config"))


# (mutation, weight, applies to the base)
MUTATIONS: list[tuple[Callable[[Case], Mutation], int, Callable[[Base], bool]]] = [
    (m_length_field, 3, lambda b: True), (m_header_bytes, 3, lambda b: True), (m_offsets, 4, lambda b: True),
    (m_dtype, 3, lambda b: True), (m_shape, 3, lambda b: True), (m_data_size, 2, lambda b: True),
    (m_data_bytes, 1, lambda b: True), (m_metadata, 1, lambda b: True), (m_reencode, 2, lambda b: True),
    (m_extra_field, 2, lambda b: True), (m_rename, 2, lambda b: True),
    (m_index, 4, lambda b: os.path.isfile(os.path.join(b.dir, INDEX))),
    (m_config_value, 6, lambda b: True), (m_config_file, 1, lambda b: True),
    (m_quant_config, 3, lambda b: b.quantized),
]


def make_case(seed: int, number: int, bases: list[Base], directory: str) -> tuple[Base, list[Mutation]]:
    """Case ``number`` of ``seed``: a copy of a base in ``directory`` (a new directory), and its
    mutations."""
    rng = random.Random(f"{seed}:{number}")
    base = rng.choice(bases)
    shutil.copytree(base.dir, directory)
    case = Case(base, directory, rng)
    usable = [(m, w) for m, w, applies in MUTATIONS if applies(base)]
    mutations = []
    for i in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
        mutate = rng.choices([m for m, _ in usable], weights=[w for _, w in usable])[0]
        try:
            mutation = mutate(case)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, struct.error):
            if i == 0:  # the first one works on an intact copy: a failure is the fuzzer's own bug
                raise
            # A later one cannot read what an earlier one left (a header that no longer parses):
            # it is skipped. Every mutation writes its file last, so nothing is half done.
            continue
        for earlier in mutations:
            if mutation.key and earlier.key == mutation.key:  # set again: only the last value counts
                earlier.invalid, earlier.neutral, earlier.reinterprets = None, False, True
        mutations.append(mutation)
    return base, mutations


# ---- the worker: loads cases, reports on a private pipe ----------------------------------------

def worker_main() -> None:
    """Read case directories from stdin, one per line; write one JSON report per line."""
    import numpy as np

    import glm4rt

    def load(directory: str) -> dict:
        try:
            model = glm4rt.Glm4ForCausalLM.from_pretrained(directory, progress=False)
            n_tokens = min(3, model.config.max_position_embeddings)
            logits = model(np.arange(1, n_tokens + 1)[None] % model.config.vocab_size).logits
            return {"status": "loaded", "finite": bool(np.isfinite(logits).all()),
                    "sha": hashlib.sha256(logits.tobytes()).hexdigest()}
        except Exception as e:  # reported, not raised: the next case runs in this process
            return {"status": "error", "type": type(e).__name__, "message": str(e)[:3000]}

    fuzz_worker.serve(load)


class Worker(fuzz_worker.Worker):
    """The worker process that loads case directories."""

    def __init__(self, log_dir: str) -> None:
        super().__init__([os.path.abspath(__file__), "--worker"], log_dir)

    def run(self, directory: str, timeout: float) -> dict:
        """The worker's report on ``directory``, or a crash / hang report."""
        report = self.request(directory, timeout)
        if report.get("failure") == "hang":
            return {"status": "hang"}
        if report.get("failure") == "crash":
            return {"status": "crash", "message": report["message"]}
        return report


# ---- judging ----------------------------------------------------------------------------------

def judge(report: dict, mutations: list[Mutation], rejected_files: list[str], base: Base) -> tuple[str, str]:
    """(outcome, why) of one case."""
    status = report["status"]
    if status in ("crash", "hang"):
        return status, report.get("message", "")
    invalid = any(m.invalid for m in mutations) or bool(rejected_files)
    neutral = all(m.neutral for m in mutations) and not rejected_files
    if status == "loaded":
        if invalid:
            why = f"safetensors rejects {rejected_files}" if rejected_files else "the input is invalid"
            return "silent", f"loaded although {why}"
        if not report["finite"] and not any(m.reinterprets for m in mutations):
            return "silent", "loaded to NaN/inf logits"
        if neutral and report["sha"] != base.sha:
            return "silent", "a neutral change loaded to other logits than the base's"
        return "ok", "loaded"
    message = report["message"]
    if report["type"] not in CLEAR_ERRORS:
        return "unclear", f"{report['type']}: {message}"
    names = {os.path.basename(f) for f in rejected_files}.union(*(m.names for m in mutations))
    if not any(n and n in message for n in names):
        return "unclear", f"{report['type']} names none of {sorted(names)}: {message}"
    if neutral and not any(m.invalid is None for m in mutations):
        return "refused", f"{report['type']}: {message}"
    return "ok", report["type"]


@dataclasses.dataclass
class Result:
    number: int
    outcome: str
    why: str
    mutations: list[str]


@dataclasses.dataclass
class Report:
    seed: int
    results: list[Result]
    seconds: float

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome != "ok"]

    def line(self) -> str:
        return (f"fuzz: {len(self.results)} cases, {self.count('crash')} crashes, {self.count('hang')} hangs, "
                f"{self.count('silent')} silent wrong loads, {self.count('unclear')} unclear errors, "
                f"{self.count('refused')} valid files refused (seed {self.seed}, {self.seconds:.0f} s)")

    def details(self) -> str:
        kinds = collections.Counter(r.why if r.outcome == "ok" else r.outcome for r in self.results)
        lines = [self.line(), "  outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))]
        for r in self.failures:
            replay = f"python tests/fuzz_checkpoints.py --seed {self.seed} --case {r.number} --keep DIR"
            lines.append(f"  case {r.number} [{r.outcome}] {' + '.join(r.mutations)}\n      {r.why[:600]}\n"
                         f"      replay: {replay}")
        return "\n".join(lines)


def run(seed: int = 0, cases: int = 300, seconds: float = 60.0, jobs: int = 1, timeout: float = 30.0,
        workdir: Optional[str] = None, only: Optional[int] = None, keep: Optional[str] = None) -> Report:
    """Run cases ``0 .. cases - 1`` of ``seed`` (or only case ``only``) until ``seconds`` have
    passed, in ``jobs`` worker processes; ``keep`` is where a replayed case's files are left."""
    start = time.monotonic()
    own = workdir is None
    workdir = tempfile.mkdtemp(prefix="glm4rt-fuzz-") if own else workdir
    try:
        bases = make_bases(workdir)
        workers = [Worker(workdir) for _ in range(jobs)]
        for base in bases:  # the reference logits, by the same code path as the cases
            report = workers[0].run(base.dir, timeout)
            if report["status"] != "loaded" or not report["finite"]:
                raise RuntimeError(f"base {base.name} does not load: {report}")
            base.sha = report["sha"]
        numbers = [only] if only is not None else list(range(cases))
        lock, results, free = threading.Lock(), [], list(workers)

        def one(number: int) -> Optional[Result]:
            if time.monotonic() - start > seconds:
                return None
            with lock:
                worker = free.pop()
            try:
                directory = keep or os.path.join(workdir, f"case-{number}")
                base, mutations = make_case(seed, number, bases, directory)
                rejected = [f for f in files_read(directory) if oracle_rejects(f)]
                outcome, why = judge(worker.run(directory, timeout), mutations, rejected, base)
                if keep is None:
                    shutil.rmtree(directory)
                return Result(number, outcome, why, [m.desc for m in mutations])
            finally:
                with lock:
                    free.append(worker)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for result in pool.map(one, numbers):
                if result is not None:
                    results.append(result)
        for worker in workers:
            worker.close()
        return Report(seed, results, time.monotonic() - start)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = fuzz_worker.arg_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--case", type=int, default=None, help="run only this case number")
    parser.add_argument("--keep", default=None, help="with --case: leave its files in this directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.keep and args.case is None:
        parser.error("--keep needs --case")
    report = run(args.seed, args.cases, args.seconds, args.jobs, args.timeout, only=args.case,
                 keep=os.path.abspath(args.keep) if args.keep else None)
    print(report.details())
    if args.case is not None:
        print(f"case {args.case}: {report.results[0].outcome} ({report.results[0].why[:2000]})")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
