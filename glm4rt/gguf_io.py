"""GGUF files in: a GLM-4 (architecture ``glm4``) as llama.cpp's converter writes it, read with the
``gguf`` package, becomes the same ``{Hugging Face name: array}`` dict and config that a checkpoint
directory gives (``Glm4ForCausalLM.from_pretrained("model.gguf")``), and its tokenizer a
``Glm4Tokenizer`` (``Glm4Tokenizer.from_pretrained("model.gguf")``).

Names: the ``gguf`` package's own GLM-4 tensor map (``token_embd``, ``blk.N.attn_q`` ... the fused
``ffn_up`` is transformers' ``gate_up_proj``, gate rows first in both). The converter does not
permute q and k for text GLM-4 (only GLM-4V's M-RoPE, which is refused).

Weights, per tensor type:
  F32, F16          float32 (exact); BF16 stays bf16 (exact) unless dtype="float32"
  Q8_0              glm4rt int8, the same codes and scales (exact: a Q8_0 block is an int8 block)
  Q4_0              glm4rt int4 (exact, likewise)
  Q4_K              glm4rt q4k (exact: Q4_K's 6-bit sub-scales and minimums fit q4k's 8-bit
                    ones, and its super-blocks are q4k's)
  any other type    (Q5_0, Q5_K, Q6_K, ...: no glm4rt format holds them) dequantized by the gguf
                    package and quantized again to int8: a second rounding, about 1/250 of each
                    block's largest weight, far below the source type's own error
With ``quantization=``, every matrix of another type is dequantized and quantized to that format.
Norms, biases and the embedding table are float32 (the embedding dequantized, exact).
A quantized GGUF mixes types per tensor (Q4_K_M: Q6_K for the output and some attn_v / ffn_down),
so its modules may have different formats (``config.quantization_config["module_formats"]``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Optional

import numpy as np

from .config import Glm4Config
from .errors import CheckpointError, ConfigError
from .weights import replacing
from .quant import GROUP_ROWS, pack_codes, pack_q4k, quantize_weight

ARCH = "glm4"
_NATIVE = {"Q8_0": "int8", "Q4_0": "int4", "Q4_K": "q4k"}  # GGUF type -> the glm4rt format that holds it


def is_gguf_file(path: Any) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf "
                          "(or glm4rt's extra: pip install 'glm4rt[gguf]')") from e
    return gguf


class GgufFile:
    """An opened GGUF file: its metadata and tensor table (memory-mapped by the gguf package).

    Raises:
        CheckpointError: a file the gguf package cannot read (corrupt, truncated, not GGUF).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        gguf = _gguf()
        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = KeyError) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001 - a malformed field
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} cannot be read ({e})") from None

    def rows_cols(self, name: str) -> tuple[int, int]:
        t = self.tensors[name]
        cols = int(t.shape[0])  # GGUF lists dimensions innermost first
        return int(t.n_elements) // max(cols, 1), cols

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def raw_blocks(self, name: str, block_bytes: int) -> np.ndarray:
        """The tensor's bytes as ``[rows, blocks per row, block_bytes]``."""
        rows, _ = self.rows_cols(name)
        data = np.asarray(self.tensors[name].data).view(np.uint8).reshape(-1)
        if data.size % (rows * block_bytes):
            raise CheckpointError(f"{self.path}: tensor {name!r} has {data.size} bytes, not whole "
                                  f"blocks of {block_bytes} for {rows} rows")
        return data.reshape(rows, -1, block_bytes)

    def dequantized(self, name: str) -> np.ndarray:
        """float32 ``[rows, cols]`` by the gguf package's reference dequantizers."""
        gguf = _gguf()
        t = self.tensors[name]
        rows, cols = self.rows_cols(name)
        try:
            out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize ({e})") from None
        return np.ascontiguousarray(out, dtype=np.float32).reshape(rows, cols)


def read_config(f: GgufFile) -> Glm4Config:
    """The ``Glm4Config`` of a GLM-4 GGUF, from its ``glm4.*`` and tokenizer metadata."""
    arch = f.value("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r}; glm4rt runs GLM-4 ({ARCH!r})")
    if f.value(f"{ARCH}.rope.dimension_sections", None) is not None:
        raise CheckpointError(f"{f.path}: M-RoPE (GLM-4V) GGUF; glm4rt runs the text model Glm4ForCausalLM")
    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: no token_embd.weight tensor")
    H = int(f.value(f"{ARCH}.embedding_length"))
    n_h = int(f.value(f"{ARCH}.attention.head_count"))
    head_dim = int(f.value(f"{ARCH}.attention.key_length", H // max(n_h, 1)))
    rot = int(f.value(f"{ARCH}.rope.dimension_count", head_dim // 2))
    tokens = f.value("tokenizer.ggml.tokens", [])
    eos = [f.value(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    if "<|observation|>" in tokens:
        eos.append(tokens.index("<|observation|>"))
    eos = sorted({int(i) for i in eos if i is not None})
    pad = f.value("tokenizer.ggml.padding_token_id", eos[0] if eos else None)
    try:
        return Glm4Config(
            vocab_size=f.rows_cols("token_embd.weight")[0], hidden_size=H,
            intermediate_size=int(f.value(f"{ARCH}.feed_forward_length")),
            num_hidden_layers=int(f.value(f"{ARCH}.block_count")), num_attention_heads=n_h,
            num_key_value_heads=int(f.value(f"{ARCH}.attention.head_count_kv", n_h)), head_dim=head_dim,
            partial_rotary_factor=rot / head_dim, rope_theta=float(f.value(f"{ARCH}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(f.value(f"{ARCH}.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(f.value(f"{ARCH}.context_length")),
            attention_bias="blk.0.attn_q.bias" in f.tensors, tie_word_embeddings="output.weight" not in f.tensors,
            eos_token_id=eos[0] if len(eos) == 1 else (eos or None), pad_token_id=None if pad is None else int(pad),
            architectures=["Glm4ForCausalLM"])
    except ConfigError as e:
        raise ConfigError(f"{f.path}: {e}") from None


# ---- weights ------------------------------------------------------------------------------------

def _q8_0(f: GgufFile, name: str) -> np.ndarray:
    blocks = f.raw_blocks(name, 34)  # fp16 d, 32 int8 codes
    d = blocks[:, :, :2].copy().view(np.float16)[..., 0]
    codes = blocks[:, :, 2:].view(np.int8).reshape(blocks.shape[0], -1).astype(np.int32)
    if codes.size and codes.min() < -127:  # Q8_0 can hold -128, which llama.cpp never writes
        return quantize_weight(f.dequantized(name), "int8")
    return pack_codes(codes[:, :f.rows_cols(name)[1]], d, "int8")


def _q4_0(f: GgufFile, name: str) -> np.ndarray:
    blocks = f.raw_blocks(name, 18)  # fp16 d, 16 bytes: weight j in the low nibble, j + 16 in the high
    d = blocks[:, :, :2].copy().view(np.float16)[..., 0]
    qs = blocks[:, :, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(blocks.shape[0], -1)
    return pack_codes(codes[:, :f.rows_cols(name)[1]], d, "int4")


def _q4_k(f: GgufFile, name: str) -> np.ndarray:
    """Q4_K (ggml-quants.c, block_q4_K): per 256 weights fp16 d and dmin, 12 bytes of 6-bit
    scales and minimums of the 8 sub-blocks, 128 bytes of codes; w = d sc q - dmin m."""
    blocks = f.raw_blocks(name, 144)
    rows, n_super = blocks.shape[:2]
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    dmin = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    s = blocks[:, :, 4:16].astype(np.uint8)
    sc = np.empty((rows, n_super, 8), np.uint8)
    mn = np.empty((rows, n_super, 8), np.uint8)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63  # get_scale_min_k4, j < 4
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blocks[:, :, 16:].reshape(rows, n_super, 4, 32)  # 4 chunks of 64 weights
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)  # chunk c: 64c + l low, 64c + 32 + l high
    return pack_q4k(codes[:, :f.rows_cols(name)[1]], sc.reshape(rows, -1), mn.reshape(rows, -1), d, dmin)


_CONVERTERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k}


def read_tensors(f: GgufFile, specs: dict, config: Glm4Config, dtype: str,
                 quantization: Optional[str]) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """The tensors of ``specs`` (HF names) from ``f``: ``(tensors, module formats, missing names)``.
    Quantized matrices come as ``<module>.qweight`` packed bytes, their format in module formats."""
    from . import bf16

    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4, config.num_hidden_layers)
    to_hf = {}
    for hf in specs:
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is not None:
            to_hf[g] = hf
    ignored = {"output.weight"} if "lm_head.weight" not in specs else set()  # a base model skips the head
    unexpected = [n for n in f.tensors if n not in to_hf and n not in ignored]
    if unexpected:
        raise CheckpointError(f"{f.path}: GGUF tensors that a GLM-4 with this config does not use: "
                              f"{sorted(unexpected)[:8]}")
    tensors: dict[str, np.ndarray] = {}
    formats: dict[str, str] = {}
    missing = [hf for hf in specs if tmap.get_name(hf, try_suffixes=(".weight", ".bias")) not in f.tensors]
    for g, hf in to_hf.items():
        if g not in f.tensors:
            continue
        spec = specs[hf]
        rows, cols = f.rows_cols(g)
        if (rows, cols) != tuple(spec.shape) and (cols,) != tuple(spec.shape):
            raise CheckpointError(f"{f.path}: tensor {g!r} ({hf}) has shape [{rows}, {cols}], expected "
                                  f"{list(spec.shape)}")
        kind = f.type_name(g)
        is_projection = spec.kind == "matrix" and hf != "model.embed_tokens.weight"
        if not is_projection:
            if kind == "BF16" and spec.kind == "matrix" and dtype != "float32":
                tensors[hf] = np.asarray(f.tensors[g].data).view(np.uint16).reshape(rows, cols).copy()
            else:
                tensors[hf] = f.dequantized(g).reshape(spec.shape)
            continue
        module = hf[:-len(".weight")]
        target = quantization or _NATIVE.get(kind)
        if target is None and kind not in ("F32", "F16", "BF16"):
            target = "int8"  # a type no glm4rt format holds: quantized again (see the module docstring)
        if target is None:  # a float matrix
            if kind == "BF16" and dtype != "float32":
                tensors[hf] = np.asarray(f.tensors[g].data).view(np.uint16).reshape(rows, cols).copy()
            else:
                w = f.dequantized(g)
                tensors[hf] = bf16.from_f32(w) if dtype == "bfloat16" else w
        elif _NATIVE.get(kind) == target:
            tensors[module + ".qweight"] = _CONVERTERS[kind](f, g)
            formats[module] = target
        else:
            tensors[module + ".qweight"] = quantize_weight(f.dequantized(g), target)
            formats[module] = target
    return tensors, formats, missing


def quantization_config(formats: dict[str, str]) -> Optional[dict]:
    """The config entry of a model whose modules have these formats (None: all float)."""
    if not formats:
        return None
    main = Counter(formats.values()).most_common(1)[0][0]
    return {"quant_method": "gguf", "format": main, "block_size": 32, "group_rows": GROUP_ROWS,
            "module_formats": dict(formats)}


# ---- tokenizer ----------------------------------------------------------------------------------

def read_tokenizer(path: str | os.PathLike, **overrides: Any):
    """The ``Glm4Tokenizer`` of a GLM-4 GGUF: its byte-level BPE (``tokenizer.ggml.*``) behind
    GLM-4's split regex (the converter's pre-tokenizer ``glm4``), the control tokens as special
    tokens, ``[gMASK]<sop>`` before encoded text as GLM-4's tokenizer.json does, and the chat
    template of ``tokenizer.chat_template``."""
    from tokenizers import Tokenizer

    from .tokenizer import Glm4Tokenizer, TokenizerError
    from .tokenizer_build import glm4_bpe, glm4_tokenizer_config, glm4_tokenizer_spec

    f = GgufFile(path)
    model = f.value("tokenizer.ggml.model", None)
    pre = f.value("tokenizer.ggml.pre", None)
    if model != "gpt2" or pre != "glm4":
        raise TokenizerError(f"{f.path}: tokenizer {model!r} with pre-tokenizer {pre!r}; glm4rt reads GLM-4's "
                             "byte-level BPE ('gpt2' with the 'glm4' pre-tokenizer)")
    tokens = list(f.value("tokenizer.ggml.tokens"))
    types = list(f.value("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in f.value("tokenizer.ggml.merges", [])]
    # llama.cpp's token types: 3 CONTROL (the special tokens), 5 UNUSED (the converter's "[PAD<id>]"
    # entries that fill the vocabulary up to the embedding's rows; not tokens of the HF tokenizer)
    control, unused = 3, 5
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == control}
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if t not in special and ty != unused}
    try:
        spec = glm4_tokenizer_spec(glm4_bpe(vocab, merges), special)
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises a bare Exception for a bad vocabulary
        raise TokenizerError(f"{f.path}: the GGUF vocabulary cannot be read by the tokenizers library ({e})") from e
    eos_id = f.value("tokenizer.ggml.eos_token_id", None)
    pad_id = f.value("tokenizer.ggml.padding_token_id", eos_id)
    config = glm4_tokenizer_config(special, f.value("tokenizer.chat_template", None),
                                   int(f.value(f"{ARCH}.context_length", 131072)),
                                   eos_token=tokens[eos_id] if eos_id is not None else None,
                                   pad_token=tokens[pad_id] if pad_id is not None else None)
    config.update(overrides)
    return Glm4Tokenizer(tok, config, name_or_path=f.path)


# ---- GGUF out -----------------------------------------------------------------------------------

def _unpacked(lin) -> tuple[np.ndarray, np.ndarray]:
    """codes ``[out, in]`` (int8: -127..127; int4: 0..15) and fp16 scales ``[out, nb]`` of an
    int8 / int4 QuantLinear, read from the packed layout (quant.h)."""
    n, k = lin.out_features, lin.in_features
    nb, ng = -(-k // 32), -(-n // GROUP_ROWS)
    block = 544 if lin.fmt == "int8" else 288
    blocks = np.asarray(lin.packed).reshape(ng, nb, block)
    scales = blocks[:, :, block - 32:].copy().view(np.float16)  # [g, b, 16 rows]
    if lin.fmt == "int8":
        q = blocks[:, :, :512].reshape(ng, nb, 8, 16, 4).astype(np.int16) - 128  # [g, b, chunk, row, byte]
    else:
        raw = blocks[:, :, :256].reshape(ng, nb, 4, 16, 4)
        q = np.concatenate([raw & 0x0F, raw >> 4], axis=2).astype(np.int16)
    codes = q.transpose(0, 3, 1, 2, 4).reshape(ng * GROUP_ROWS, nb * 32)[:n, :k]
    return codes, scales.transpose(0, 2, 1).reshape(ng * GROUP_ROWS, nb)[:n]


def _q8_0_bytes(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    blocks = codes.reshape(codes.shape[0], -1, 32).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(*d.shape, 2), blocks], axis=2).reshape(codes.shape[0], -1)


def _q4_0_bytes(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    b = codes.reshape(codes.shape[0], -1, 32).astype(np.uint8)
    qs = b[:, :, :16] | (b[:, :, 16:] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(*d.shape, 2), qs], axis=2).reshape(codes.shape[0], -1)


def _q4_k_bytes(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks of float32 ``w [rows, cols]`` (cols a multiple of 256): per sub-block of 32 the
    least-squares scale and offset of the q4k fit (glm4rt's quantizer on the values), rounded to
    Q4_K's 6-bit sub-scales under fp16 d / dmin per 256, then each weight's nearest code."""
    from .calibrate import unpack_q4k_grid

    rows, cols = w.shape
    # the grid of glm4rt's q4k fit, its 8-bit sub-scales read back as floats
    packed = quantize_weight(w, "q4k")
    sc8, mn8, d8, m8 = unpack_q4k_grid(packed, rows, cols)
    s = (np.repeat(d8.astype(np.float32), 8, 1) * sc8).reshape(rows, -1, 8)  # [rows, supers, 8]
    o = (np.repeat(m8.astype(np.float32), 8, 1) * mn8).reshape(rows, -1, 8)
    d = (s.max(-1) / 63).astype(np.float16)
    dmin = (o.max(-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s / d.astype(np.float32)[..., None]), 0, 63), 0).astype(np.uint8)
        mn = np.where(dmin[..., None] > 0, np.clip(np.rint(o / dmin.astype(np.float32)[..., None]), 0, 63), 0).astype(np.uint8)
        scale = d.astype(np.float32)[..., None] * sc  # [rows, supers, 8]
        offset = dmin.astype(np.float32)[..., None] * mn
        x = w.reshape(rows, -1, 8, 32)
        q = np.where(scale[..., None] > 0, np.clip(np.rint((x + offset[..., None]) / scale[..., None]), 0, 15), 0)
    q = q.astype(np.uint8).reshape(rows, -1, 4, 2, 32)  # chunk c of 64: sub-blocks 2c (low nibble), 2c + 1 (high)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, -1, 128)
    packed_scales = np.empty((rows, sc.shape[1], 12), np.uint8)  # get_scale_min_k4's layout
    packed_scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    packed_scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    packed_scales[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    head = np.concatenate([d.view(np.uint8).reshape(rows, -1, 2), dmin.view(np.uint8).reshape(rows, -1, 2)], axis=2)
    return np.concatenate([head, packed_scales, qs], axis=2).reshape(rows, -1)


def _matrix_data(lin, rows: slice | None = None):
    """``(data, GGML type name)`` of a projection (rows of it for a stacked q/k/v)."""
    if hasattr(lin, "packed"):
        fmt = lin.fmt
        if fmt in ("int8", "int4"):
            codes, d = _unpacked(lin)
            if rows is not None:
                codes, d = codes[rows], d[rows]
            if codes.shape[1] % 32:
                raise ValueError(f"rows of {codes.shape[1]} weights are not whole GGUF blocks of 32")
            return (_q8_0_bytes(codes, d), "Q8_0") if fmt == "int8" else (_q4_0_bytes(codes + 0, d), "Q4_0")
        w = lin.dequantize()[rows if rows is not None else slice(None)]
        if w.shape[1] % 256 == 0:
            return _q4_k_bytes(w), "Q4_K"
        codes_fmt = quantize_weight(w, "int8")  # as llama.cpp falls back where rows are not whole super-blocks
        from .quant import QuantLinear
        codes, d = _unpacked(QuantLinear(codes_fmt, "int8", *w.shape))
        return _q8_0_bytes(codes, d), "Q8_0"
    w = lin.weight[rows if rows is not None else slice(None)]
    if w.dtype == np.uint16:
        return np.ascontiguousarray(w), "BF16"
    return np.ascontiguousarray(w, dtype=np.float32), "F32"


def export_gguf(model, tokenizer, path: str | os.PathLike, name: str = "glm4rt export") -> str:
    """Write ``model`` (a ``Glm4ForCausalLM``) and its ``tokenizer`` as a GGUF file that llama.cpp
    runs (architecture ``glm4``, the names and metadata of llama.cpp's converter).

    Weights: float matrices as F32 / BF16 (as stored); int8 as Q8_0 and int4 as Q4_0, the same
    codes and scales (no rounding); q4k as Q4_K where rows are whole 256-weight super-blocks, its
    8-bit sub-scales rounded to Q4_K's 6 bits and the codes chosen again on that grid (a second
    rounding), else as Q8_0 (llama.cpp's own fallback for such rows). The embedding, norms and
    biases as F32 (BF16 where stored so).
    """
    gguf = _gguf()
    path = os.fspath(path)
    with replacing(path) as tmp:
        _write_gguf(gguf, model, tokenizer, tmp, name)
    return path


def _write_gguf(gguf, model, tokenizer, tmp: str, name: str) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(name)
    add_glm4_metadata(w, cfg)
    _add_tokenizer(w, tokenizer, cfg.vocab_size)

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4, cfg.num_hidden_layers)
    types = Counter()

    def add(hf_name: str, data: np.ndarray, kind: str) -> None:
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        types[kind] += 1
        if kind == "F32":
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            raw = np.ascontiguousarray(data).view(np.uint8)
            w.add_tensor(gname, raw.reshape(data.shape[0], -1), raw_shape=raw.reshape(data.shape[0], -1).shape,
                         raw_dtype=qtype)

    def vector(x):
        return np.asarray(x, dtype=np.float32)

    emb = model.model.embed_tokens
    add("model.embed_tokens.weight", *((emb, "BF16") if emb.dtype == np.uint16 else (emb, "F32")))
    d = cfg.head_dim
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            add(p + norm + ".weight", vector(getattr(layer, norm)), "F32")
        qkv = layer.self_attn.qkv_proj
        spans = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + kv_rows),
                 "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}
        for proj, span in spans.items():
            part = qkv.parts[proj] if hasattr(qkv, "parts") else None
            add(p + f"self_attn.{proj}.weight", *(_matrix_data(part) if part is not None else _matrix_data(qkv, span)))
            bias = part.bias if part is not None else (qkv.bias[span] if qkv.bias is not None else None)
            if bias is not None:
                add(p + f"self_attn.{proj}.bias", vector(bias), "F32")
        add(p + "self_attn.o_proj.weight", *_matrix_data(layer.self_attn.o_proj))
        add(p + "mlp.gate_up_proj.weight", *_matrix_data(layer.mlp.gate_up_proj))
        add(p + "mlp.down_proj.weight", *_matrix_data(layer.mlp.down_proj))
    add("model.norm.weight", vector(model.model.norm), "F32")
    if not cfg.tie_word_embeddings or hasattr(model.lm_head, "packed"):
        add("lm_head.weight", *_matrix_data(model.lm_head))
    main = max((t for t in types if t != "F32"), key=lambda t: types[t], default="F32")
    w.add_file_type(int({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                         "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                         "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S}[main]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_glm4_metadata(w, cfg) -> None:
    """The ``glm4.*`` hyperparameters of llama.cpp's converter, from a config (a ``Glm4Config`` or
    anything with its field names and ``rotary_dim``), into a ``gguf.GGUFWriter``."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def _add_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* of a GLM-4-style tokenizer, as llama.cpp's converter writes them."""
    spec = json.loads(tokenizer._tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer is {model.get('type')}, not GLM-4's byte-level BPE")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t for t, i in special.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(f"token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # the converter fills unused ids with [PAD<id>], type UNUSED
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(3 if t in special else 1 if t is not None else 5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = special.get("<|endoftext|>")
    if eos is not None:
        for add in (w.add_eos_token_id, w.add_bos_token_id, w.add_unk_token_id, w.add_pad_token_id):
            add(eos)
    if "<|user|>" in special:
        w.add_eot_token_id(special["<|user|>"])
    w.add_add_bos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
