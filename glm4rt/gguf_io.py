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
