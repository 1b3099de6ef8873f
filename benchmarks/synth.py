"""Synthetic GLM-4 checkpoints for benchmarking: random weights at a real geometry, written as a
Hugging Face checkpoint (bf16 safetensors, sharded) and as GGUF files for llama.cpp.

Nothing here holds a whole model in memory: the safetensors writer generates each tensor in row
chunks straight into the file, and the GGUF writer reads the safetensors back through a memory map
one tensor at a time, so the GGUF files hold exactly the same (bf16) weight values.

Weight scheme (SCHEME below; the values matter for the quality report, not for speed):
  * every layer matrix and the embedding: normal(0, 0.02) (GLM-4's initializer_range);
  * lm_head: normal(0, LM_HEAD_STD = 4 / sqrt(hidden)). The final RMSNorm leaves each position's
    hidden state with RMS ~1, so logits have a standard deviation of ~4 over the vocabulary: the
    next-token distribution is peaked (top probability ~0.05-0.2, entropy well below log(V)) instead
    of nearly uniform, so KL divergence and top-1 agreement are meaningful;
  * RMSNorm weights: normal(1, 0.1); q/k/v biases: normal(0, 0.1) (present and non-trivial, so a
    runtime that dropped them would show it).
Activations stay finite at any depth: every block output passes through an RMSNorm before it is
added to the residual stream.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
SCHEME = "v1"  # bump when the weight scheme or file layout changes: old cache entries are rebuilt
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
CHUNK_ELEMS = 1 << 24  # rows are generated / converted in chunks of about this many elements

# GLM special tokens at their real ids in the GLM-4-0414 tokenizer.
GLM_SPECIAL_TOKENS = {
    151329: "<|endoftext|>", 151330: "[MASK]", 151331: "[gMASK]", 151332: "[sMASK]",
    151333: "<sop>", 151334: "<eop>", 151335: "<|system|>", 151336: "<|user|>",
    151337: "<|assistant|>", 151338: "<|observation|>", 151339: "<|begin_of_image|>",
    151340: "<|end_of_image|>", 151341: "<|begin_of_video|>", 151342: "<|end_of_video|>",
}
EOS_ID, PAD_ID, USER_ID, OBSERVATION_ID = 151329, 151329, 151336, 151338


# ---- geometry and config ---------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """The model shape. Defaults: GLM-4-9B-0414 (except the layer count, chosen per run)."""
    num_hidden_layers: int = 8
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    vocab_size: int = 151552
    rms_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def tag(self) -> str:
        """A short name for cache directories."""
        if self == Geometry(num_hidden_layers=self.num_hidden_layers):
            return f"glm4-9b-L{self.num_hidden_layers}"
        return (f"glm4-L{self.num_hidden_layers}-H{self.hidden_size}-I{self.intermediate_size}"
                f"-h{self.num_attention_heads}x{self.head_dim}-kv{self.num_key_value_heads}-V{self.vocab_size}")


def official_config(g: Geometry) -> dict:
    """config.json in the dialect Hugging Face publishes for GLM-4-9B-0414 (top-level rope_theta and
    partial_rotary_factor, torch_dtype)."""
    return {
        "architectures": ["Glm4ForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": [EOS_ID, USER_ID, OBSERVATION_ID],
        "head_dim": g.head_dim,
        "hidden_act": "silu",
        "hidden_size": g.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": g.intermediate_size,
        "max_position_embeddings": g.max_position_embeddings,
        "model_type": "glm4",
        "num_attention_heads": g.num_attention_heads,
        "num_hidden_layers": g.num_hidden_layers,
        "num_key_value_heads": g.num_key_value_heads,
        "pad_token_id": PAD_ID,
        "partial_rotary_factor": g.partial_rotary_factor,
        "rms_norm_eps": g.rms_norm_eps,
        "rope_theta": g.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "vocab_size": g.vocab_size,
    }


def lm_head_std(g: Geometry) -> float:
    return 4.0 / math.sqrt(g.hidden_size)


def tensor_plan(g: Geometry) -> list[tuple[str, tuple[int, ...], str, float, float]]:
    """(HF name, shape, kind, mean, std) for every tensor, in checkpoint order.

    kind: "matrix" (bf16 in the checkpoint) or "vector" (norms and biases, also bf16 on disk as
    in the published checkpoint)."""
    H, I, d = g.hidden_size, g.intermediate_size, g.head_dim
    nh, nkv = g.num_attention_heads, g.num_key_value_heads
    plan = [("model.embed_tokens.weight", (g.vocab_size, H), "matrix", 0.0, 0.02)]
    for i in range(g.num_hidden_layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (H,), "vector", 1.0, 0.1),
            (p + "self_attn.q_proj.weight", (nh * d, H), "matrix", 0.0, 0.02),
            (p + "self_attn.q_proj.bias", (nh * d,), "vector", 0.0, 0.1),
            (p + "self_attn.k_proj.weight", (nkv * d, H), "matrix", 0.0, 0.02),
            (p + "self_attn.k_proj.bias", (nkv * d,), "vector", 0.0, 0.1),
            (p + "self_attn.v_proj.weight", (nkv * d, H), "matrix", 0.0, 0.02),
            (p + "self_attn.v_proj.bias", (nkv * d,), "vector", 0.0, 0.1),
            (p + "self_attn.o_proj.weight", (H, nh * d), "matrix", 0.0, 0.02),
            (p + "post_self_attn_layernorm.weight", (H,), "vector", 1.0, 0.1),
            (p + "post_attention_layernorm.weight", (H,), "vector", 1.0, 0.1),
            (p + "mlp.gate_up_proj.weight", (2 * I, H), "matrix", 0.0, 0.02),
            (p + "mlp.down_proj.weight", (H, I), "matrix", 0.0, 0.02),
            (p + "post_mlp_layernorm.weight", (H,), "vector", 1.0, 0.1),
        ]
    plan += [("model.norm.weight", (H,), "vector", 1.0, 0.1),
             ("lm_head.weight", (g.vocab_size, H), "matrix", 0.0, lm_head_std(g))]
    return plan


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even), as glm4rt.ops.f32_to_bf16."""
    try:
        from glm4rt.ops import f32_to_bf16 as conv
    except ImportError:  # pragma: no cover - glm4rt is installed in this project
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return conv(x)


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMS // max(1, cols))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _generate_bf16(shape, mean: float, std: float, seed: int, index: int):
    """Yield bf16 chunks (uint16, row blocks) of one tensor, deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    for r0, r1 in _row_chunks(rows, cols):
        x = rng.standard_normal((r1 - r0) * cols, dtype=np.float32)
        x *= np.float32(std)
        x += np.float32(mean)
        yield f32_to_bf16(x)


# ---- safetensors checkpoint --------------------------------------------------------------------

def checkpoint_dir(g: Geometry, seed: int = 0) -> str:
    return os.path.join(CACHE, f"{g.tag()}-s{seed}-{SCHEME}")


def _is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "synth.json"))


def write_checkpoint(directory: str, g: Geometry, seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES,
                     log=print) -> str:
    """Write config.json, generation_config.json and bf16 safetensors shards (+ index) to
    ``directory``, streaming: one chunk of one tensor in memory at a time. Returns ``directory``."""
    tmp = directory + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    plan = tensor_plan(g)
    # Assign tensors to shards in order, as transformers' shard_checkpoint does.
    shards: list[list[int]] = [[]]
    size = 0
    for idx, (_, shape, _, _, _) in enumerate(plan):
        nbytes = int(np.prod(shape, dtype=np.int64)) * 2
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(idx)
        size += nbytes
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for fname, members in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for idx in members:
            name, shape, *_ = plan[idx]
            nbytes = int(np.prod(shape, dtype=np.int64)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for idx in members:
                name, shape, _, mean, std = plan[idx]
                for chunk in _generate_bf16(shape, mean, std, seed, idx):
                    chunk.tofile(f)
        log(f"  wrote {fname} ({offset / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    if n > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(official_config(g), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "eos_token_id": [EOS_ID, USER_ID, OBSERVATION_ID],
                   "pad_token_id": PAD_ID, "transformers_version": "4.51.3"}, f, indent=2)
    with open(os.path.join(tmp, "synth.json"), "w") as f:
        json.dump({"scheme": SCHEME, "seed": seed, "geometry": g.__dict__, "total_bytes": total,
                   "lm_head_std": lm_head_std(g)}, f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    return directory


def ensure_checkpoint(g: Geometry, seed: int = 0, log=print) -> str:
    """The cached checkpoint for (geometry, seed), built on first use."""
    d = checkpoint_dir(g, seed)
    if not _is_complete(d):
        log(f"building random-weight checkpoint {d}")
        write_checkpoint(d, g, seed, log=log)
    return d


# ---- GGUF --------------------------------------------------------------------------------------

# glm4rt format name -> (GGML tensor type name, llama file type name)
GGUF_FORMATS = {
    "f32": ("F32", "ALL_F32"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "int8": ("Q8_0", "MOSTLY_Q8_0"),
    "int4": ("Q4_0", "MOSTLY_Q4_0"),
}

# HF name (after "model.layers.{i}.") -> GGUF name (after "blk.{i}."): llama.cpp's LLM_ARCH_GLM4
# (src/models/glm4.cpp; gguf-py tensor_mapping "glm-4-0414" entries). gate_up_proj stays fused as
# ffn_up ([2I, H], gate rows first: LLM_FFN_SWIGLU splits it in that order).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_self_attn_layernorm.weight": "post_attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_mlp_layernorm.weight": "post_ffw_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """The llama.cpp (GGUF) name of a Hugging Face GLM-4 tensor."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        idx, rest = hf_name[len("model.layers."):].split(".", 1)
        return f"blk.{int(idx)}.{_LAYER_NAMES[rest]}"
    raise KeyError(hf_name)


def gguf_path(ckpt_dir: str, fmt: str) -> str:
    return os.path.join(ckpt_dir, f"model-{GGUF_FORMATS[fmt][0]}.gguf")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def synthetic_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary llama.cpp accepts ("gpt2" model, "glm4" pre-tokenizer):
    ids 0-255 the 256 byte symbols, then two-character alphanumeric tokens with their merges, then
    unreachable dummy tokens, and the GLM special tokens (CONTROL) at their real ids (ids from
    151329 on; reserved specials fill the rest of the range). Returns (tokens, types, merges)."""
    from gguf import TokenType

    tokens: list[str] = [None] * vocab_size  # type: ignore[list-item]
    types = [int(TokenType.NORMAL)] * vocab_size
    byte_chars = _bytes_to_unicode()
    for b in range(256):
        tokens[b] = byte_chars[b]
    first_special = 151329 if vocab_size > 151329 + len(GLM_SPECIAL_TOKENS) else vocab_size - 32
    alnum = [chr(c) for c in range(ord("0"), ord("9") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] \
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges: list[str] = []
    nxt = 256
    for a in alnum:
        for b in alnum:
            if nxt >= first_special:
                break
            tokens[nxt] = a + b
            merges.append(f"{a} {b}")
            nxt += 1
    for i in range(nxt, first_special):
        tokens[i] = f"<dummy_{i}>"
    specials = (GLM_SPECIAL_TOKENS if first_special == 151329 else
                {first_special + k: v for k, v in enumerate(GLM_SPECIAL_TOKENS.values())})
    for i in range(first_special, vocab_size):
        tokens[i] = specials.get(i, f"<|reserved_special_{i}|>")
        types[i] = int(TokenType.CONTROL)
    return tokens, types, merges


def ensure_tokenizer(ckpt_dir: str, vocab_size: int) -> None:
    """tokenizer.json / tokenizer_config.json of ``synthetic_vocab`` in the checkpoint directory (the
    same ids as the GGUF files' vocabulary), so that ``glm4rt serve`` can load the checkpoint."""
    if os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, types, merges = synthetic_vocab(vocab_size)
    from gguf import TokenType

    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != int(TokenType.CONTROL)}
    tok = Tokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    spec = json.loads(tok.to_str())
    specials = {i: t for i, (t, ty) in enumerate(zip(tokens, types)) if ty == int(TokenType.CONTROL)}
    spec["model"]["vocab"].update({t: i for i, t in specials.items()})
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in specials.items()]
    with open(os.path.join(ckpt_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(ckpt_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}, f)


def write_gguf(ckpt_dir: str, fmt: str, out_path: str | None = None, log=print) -> str:
    """Write the checkpoint in ``ckpt_dir`` as a GGUF file for llama.cpp's "glm4" architecture.

    Every 2-D tensor (all layer matrices, token_embd and output) is stored in ``fmt``'s type
    ("pure" quantization: llama-quantize's default mixes would store output.weight as Q6_K for
    Q4_0); norms and biases stay F32. Q8_0/Q4_0 come from ``gguf.quants.quantize`` of the bf16
    values; BF16 copies the checkpoint's bits."""
    import gguf
    from glm4rt.gguf_io import add_glm4_metadata
    from glm4rt.weights import Checkpoint

    qtype = gguf.GGMLQuantizationType[GGUF_FORMATS[fmt][0]]
    ftype = gguf.LlamaFileType[GGUF_FORMATS[fmt][1]]
    out_path = out_path or gguf_path(ckpt_dir, fmt)
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    g = Geometry(**{k: cfg[k] for k in Geometry.__dataclass_fields__ if k in cfg})
    ckpt = Checkpoint(ckpt_dir)
    hf_names = [n for n, *_ in tensor_plan(g)]
    missing = [n for n in hf_names if n not in ckpt]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks {missing[:4]}")

    tmp = out_path + ".partial"
    w = gguf.GGUFWriter(tmp, "glm4")
    w.add_name(f"synthetic {g.tag()} ({fmt})")
    add_glm4_metadata(w, g)
    w.add_file_type(int(ftype))
    tokens, types, merges = synthetic_vocab(g.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    special_eos = EOS_ID if g.vocab_size > EOS_ID else tokens.index("<|endoftext|>")
    special_user = USER_ID if g.vocab_size > USER_ID else tokens.index("<|user|>")
    w.add_eos_token_id(special_eos)
    w.add_pad_token_id(special_eos)
    w.add_unk_token_id(special_eos)
    w.add_bos_token_id(special_eos)
    w.add_eot_token_id(special_user)
    w.add_add_bos_token(False)

    def stored_type(shape):
        return qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32

    for name in hf_names:
        shape = ckpt.info(name).shape
        t = stored_type(shape)
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[t]
            if shape[-1] % block:
                raise ValueError(f"{name}: row length {shape[-1]} is not a multiple of {block} ({t.name})")
            byte_shape = (*shape[:-1], shape[-1] // block * type_size)
            w.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8),
                              int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for name in hf_names:
        shape = ckpt.info(name).shape
        t = stored_type(shape)
        bits = ckpt.load(name, "bfloat16")  # uint16 view of the memory map
        if t == gguf.GGMLQuantizationType.F32:
            data = (bits.astype(np.uint32) << 16).view(np.float32)
        elif t == gguf.GGMLQuantizationType.BF16:
            data = np.ascontiguousarray(bits).view(np.uint8)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[t]
            data = np.empty((shape[0], shape[1] // block * type_size), dtype=np.uint8)
            for r0, r1 in _row_chunks(shape[0], shape[1]):
                rows = (bits[r0:r1].astype(np.uint32) << 16).view(np.float32)
                data[r0:r1] = gguf.quants.quantize(rows, t)
        w.write_tensor_data(data)
        del data
    w.close()
    os.replace(tmp, out_path)
    log(f"  wrote {out_path} ({os.path.getsize(out_path) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return out_path


def ensure_gguf(ckpt_dir: str, fmt: str, log=print) -> str:
    path = gguf_path(ckpt_dir, fmt)
    if not os.path.isfile(path):
        log(f"writing GGUF {os.path.basename(path)}")
        write_gguf(ckpt_dir, fmt, path, log=log)
    return path


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    """Bytes of each tensor stored in a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: int(t.n_bytes) for t in r.tensors}
