"""Checkpoints in and out: which tensors a GLM-4 class has (``TensorSpec``s from the config), the
checks a checkpoint must pass against them, the name fix-ups of ``sanitize``, quantize-on-load,
random initialisation, and ``save_checkpoint``. The model classes (model.py, heads.py) build
themselves from the ``{name: array}`` dict this module returns and never read files.

Every tensor keeps its Hugging Face name, except that quantizing stacks q, k and v of a layer into
one packed ``self_attn.qkv_proj`` (one matmul instead of three), as glm4rt saves it.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from . import bf16, gguf_io
from .config import CONFIG_DEFAULTS, CONFIG_NAME, Glm4Config
from .errors import CheckpointError, ConfigError
from .hub import pop_hub_kwargs, resolve_model_dir
from .quant import BLOCK_SIZE, GROUP_ROWS, QUANT_FORMATS, packed_bytes, quantize_rows
from .weights import FLOAT_DTYPES, SAFE_WEIGHTS_NAME, Checkpoint, save_safetensors


@dataclass(frozen=True)
class TensorSpec:
    """Expected checkpoint tensor: shape, and kind: "matrix" (kept in the model dtype),
    "norm" (float32, initialised to ones), "bias" (float32, initialised to zeros) or "packed"
    (quantized bytes, used as stored, holding a ``matrix`` of [out_features, in_features])."""
    shape: tuple[int, ...]
    kind: str
    matrix: Optional[tuple[int, int]] = None


_DTYPE_ALIASES = {
    "auto": "auto", None: "auto",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
# Config fields that from_pretrained(**kwargs) may override.
_CONFIG_KWARGS = set(CONFIG_DEFAULTS) | {"num_labels", "id2label", "label2id", "rope_parameters",
                                         "rope_scaling", "torch_dtype"}
# Tensors of sibling classes (other heads) or non-persistent buffers: skipped, not an error.
_OTHER_HEADS = ("lm_head.weight", "lm_head.qweight", "score.weight", "score.bias")
# Stored dtypes each kind of TensorSpec may have.
_KIND_DTYPES = {"matrix": FLOAT_DTYPES, "norm": FLOAT_DTYPES, "bias": FLOAT_DTYPES, "packed": ("U8",)}
_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,9})\.")
QKV = ("q_proj", "k_proj", "v_proj")

# __metadata__ entry of a quantized checkpoint: {qweight name: [out_features, in_features]}, as JSON.
# The packed size alone cannot tell a wrong config.json: int4 [126, 48] and [128, 48] take the same
# bytes (rows are packed 16 at a time, weights 32 at a time).
QWEIGHT_SHAPES = "glm4rt.qweight_shapes"

# Rows read per step when quantizing a checkpoint on load: about 64 MiB of source data.
QUANT_CHUNK_BYTES = 64 * 2**20


def normalise_dtype(dtype: Any) -> str:
    """``"auto"``, ``"float32"`` or ``"bfloat16"`` for any spelling of them (NumPy, torch, str).

    Raises:
        ValueError: another dtype.
    """
    key = dtype
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        key = np.dtype(dtype).name
    elif not isinstance(dtype, str) and dtype is not None:
        key = str(dtype).replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise ValueError(
            f"dtype={dtype!r} is not supported: use 'auto' (keep bf16 weights as bf16, others float32), "
            "'float32' or 'bfloat16' (every sum is fp32 either way; GLM-4's activations overflow fp16).")
    return _DTYPE_ALIASES[key]


def base_model_specs(config: Glm4Config) -> dict[str, TensorSpec]:
    """Tensors of the decoder stack, under the checkpoint prefix ``model.``."""
    H, d, I = config.hidden_size, config.head_dim, config.intermediate_size
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    specs = {"model.embed_tokens.weight": TensorSpec((config.vocab_size, H), "matrix")}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                     "post_mlp_layernorm"):
            specs[p + norm + ".weight"] = TensorSpec((H,), "norm")
        for proj, rows in zip(QKV, (n_h * d, n_kv * d, n_kv * d)):
            specs[p + f"self_attn.{proj}.weight"] = TensorSpec((rows, H), "matrix")
            if config.attention_bias:
                specs[p + f"self_attn.{proj}.bias"] = TensorSpec((rows,), "bias")
        specs[p + "self_attn.o_proj.weight"] = TensorSpec((H, n_h * d), "matrix")
        specs[p + "mlp.gate_up_proj.weight"] = TensorSpec((2 * I, H), "matrix")
        specs[p + "mlp.down_proj.weight"] = TensorSpec((H, I), "matrix")
    specs["model.norm.weight"] = TensorSpec((H,), "norm")
    return specs


def sanitize(names: list[str]) -> dict[str, str]:
    """The checkpoint's tensor names fixed up to the names glm4rt uses: ``{canonical: stored}``.

    Checkpoints saved from a bare ``Glm4Model`` lack the ``model.`` prefix; rotary ``inv_freq``
    buffers (written by old transformers versions) are recomputed, so they are dropped.
    """
    out = {}
    for name in names:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        canonical = "model." + name if name.startswith(("embed_tokens.", "layers.", "norm.")) else name
        out[canonical] = name
    return out


def quant_layout(config: Glm4Config, with_lm_head: bool) -> dict[str, list[tuple[str, int]]]:
    """Which modules a quantized model has and where their rows come from:
    ``{quantized module: [(source module, rows), ...]}``; q, k and v stack into ``qkv_proj``."""
    d, n_h, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    H, I = config.hidden_size, config.intermediate_size
    layout: dict[str, list[tuple[str, int]]] = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layout[p + "self_attn.qkv_proj"] = [(p + "self_attn." + proj, rows)
                                            for proj, rows in zip(QKV, (n_h * d, n_kv * d, n_kv * d))]
        layout[p + "self_attn.o_proj"] = [(p + "self_attn.o_proj", H)]
        layout[p + "mlp.gate_up_proj"] = [(p + "mlp.gate_up_proj", 2 * I)]
        layout[p + "mlp.down_proj"] = [(p + "mlp.down_proj", H)]
    if with_lm_head:  # a tied lm_head gets its own quantized copy of the embedding matrix
        layout["lm_head"] = [("model.embed_tokens" if config.tie_word_embeddings else "lm_head",
                              config.vocab_size)]
    return layout


def quantized_specs(config: Glm4Config, fmt: str, specs: dict[str, TensorSpec],
                    with_lm_head: bool) -> dict[str, TensorSpec]:
    """The tensors of a saved quantized checkpoint: ``specs`` with every quantized module's
    weight (and bias) replaced by its packed bytes (and its stacked bias)."""
    out = dict(specs)
    for target, sources in quant_layout(config, with_lm_head).items():
        in_features = specs[sources[0][0] + ".weight"].shape[1]
        n_rows = sum(rows for _, rows in sources)
        has_bias = any(src + ".bias" in specs for src, _ in sources)
        for src, _ in sources:
            if src != "model.embed_tokens":
                out.pop(src + ".weight")
            out.pop(src + ".bias", None)
        out[target + ".qweight"] = TensorSpec((packed_bytes(fmt, n_rows, in_features),), "packed",
                                              (n_rows, in_features))
        if has_bias:
            out[target + ".bias"] = TensorSpec((n_rows,), "bias")
    return out


def _check_packed_matrices(ckpt: Checkpoint, stored: dict[str, str], specs: dict[str, TensorSpec]) -> None:
    """Each packed weight's matrix, as recorded in its file when it was saved, against the config."""
    records: dict[str, dict] = {}  # file -> its parsed record
    for name, spec in specs.items():
        if spec.kind != "packed" or name not in stored:
            continue
        info = ckpt.info(stored[name])
        if info.file not in records:
            record = ckpt.metadata(stored[name]).get(QWEIGHT_SHAPES)
            if record is None:
                raise CheckpointError(
                    f"{info.file}: a quantized checkpoint without the {QWEIGHT_SHAPES} record of its "
                    "matrices' shapes (written by an older glm4rt?): quantize the original checkpoint again")
            try:
                records[info.file] = json.loads(record)
                if not isinstance(records[info.file], dict):
                    raise ValueError("not an object")
            except ValueError as e:
                raise CheckpointError(f"{info.file}: corrupt {QWEIGHT_SHAPES} record ({e})") from None
        recorded = records[info.file].get(stored[name])
        if recorded != list(spec.matrix):
            raise CheckpointError(
                f"tensor {stored[name]!r} in {info.file} holds a quantized {recorded!r:.60} matrix "
                f"({QWEIGHT_SHAPES}), but the config expects {list(spec.matrix)}")


def _quantize_from_checkpoint(ckpt: Checkpoint, stored: dict[str, str], sources: list[tuple[str, int]],
                              fmt: str) -> np.ndarray:
    """Stream the source matrices of one quantized module from the checkpoint, a chunk of rows at
    a time (peak memory: the packed result plus one chunk), into one packed matrix. A source whose
    rows do not end on a 16-row group (tiny test geometries) is stacked with the rest in memory
    first, since packing starts at group boundaries."""
    in_features = ckpt.info(stored[sources[0][0] + ".weight"]).shape[1]
    n_rows = sum(rows for _, rows in sources)
    packed = np.empty(packed_bytes(fmt, n_rows, in_features), dtype=np.uint8)
    if any(rows % GROUP_ROWS for _, rows in sources[:-1]):
        stacked = np.concatenate([ckpt.read_rows(stored[src + ".weight"], 0, rows) for src, rows in sources])
        quantize_rows(stacked, fmt, n_rows, 0, packed)
        return packed
    chunk = max(GROUP_ROWS, QUANT_CHUNK_BYTES // (4 * in_features) // GROUP_ROWS * GROUP_ROWS)
    row0 = 0
    for src, rows in sources:
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            quantize_rows(ckpt.read_rows(stored[src + ".weight"], start, stop), fmt, n_rows, row0 + start, packed)
        row0 += rows
    return packed


def init_tensor(spec: TensorSpec, std: float, rng: np.random.Generator, dtype: str) -> np.ndarray:
    """transformers' ``_init_weights``: normal(0, initializer_range) matrices, unit norms, zero biases."""
    if spec.kind == "norm":
        return np.ones(spec.shape, dtype=np.float32)
    if spec.kind == "bias":
        return np.zeros(spec.shape, dtype=np.float32)
    w = rng.normal(0.0, std, size=spec.shape).astype(np.float32)
    return bf16.from_f32(w) if dtype == "bfloat16" else w


def random_tensors(specs: dict[str, TensorSpec], config: Glm4Config, dtype: Any,
                   seed: Optional[int]) -> dict[str, np.ndarray]:
    """Freshly initialised tensors for ``Cls(config)``, as transformers initialises them."""
    target = normalise_dtype(dtype)
    rng = np.random.default_rng(seed)
    return {name: init_tensor(spec, config.initializer_range, rng, target) for name, spec in specs.items()}


@dataclass
class ModelClass:
    """What loading needs to know of a model class."""
    name: str
    tensor_specs: Callable[[Glm4Config], dict[str, TensorSpec]]
    has_lm_head: bool                 # quantized along with the layers
    newly_initialisable: tuple[str, ...]  # tensors it may create when the checkpoint lacks them


@dataclass
class Loaded:
    config: Glm4Config
    tensors: dict[str, np.ndarray]
    directory: str


def load_checkpoint(model_class: ModelClass, name_or_path: str | os.PathLike, *, dtype: Any = "auto",
                    quantization: Optional[str] = None, config: Optional[Glm4Config] = None,
                    seed: Optional[int] = None, progress: Optional[bool] = None, **kwargs: Any) -> Loaded:
    """The tensors of ``model_class`` from a checkpoint; see ``Glm4PreTrainedModel.from_pretrained``."""
    target = normalise_dtype(dtype)
    if quantization is not None and quantization not in QUANT_FORMATS:
        raise ValueError(f"quantization={quantization!r}: choose one of {sorted(QUANT_FORMATS)} or None")
    hub_kwargs = pop_hub_kwargs(kwargs)
    unknown = sorted(set(kwargs) - _CONFIG_KWARGS)
    if unknown:
        raise TypeError(f"{model_class.name}.from_pretrained() got unexpected keyword arguments {unknown}")
    if isinstance(name_or_path, (str, os.PathLike)) and os.fspath(name_or_path).endswith(".gguf") \
            and not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"no such GGUF file: {os.fspath(name_or_path)!r}")
    if gguf_io.is_gguf_file(name_or_path):
        if config is not None or hub_kwargs:
            raise ValueError("a GGUF file carries its own config: config= and hub options do not apply")
        return _load_gguf(model_class, os.fspath(name_or_path), target, quantization, seed, kwargs)
    directory = resolve_model_dir(name_or_path, **hub_kwargs)
    config_source = "the config given" if config is not None else os.path.join(directory, CONFIG_NAME)
    if config is None:
        config = Glm4Config.from_pretrained(directory, **kwargs)
    elif kwargs:
        config = Glm4Config.from_dict(config.to_dict(), **kwargs)
    ckpt = Checkpoint(directory)
    stored = sanitize(ckpt.names())  # canonical -> stored name
    _check_layer_count(config, config_source, stored, directory)
    specs = model_class.tensor_specs(config)
    saved_fmt = (getattr(config, "quantization_config", None) or {}).get("format")
    if saved_fmt is not None:
        if quantization not in (None, saved_fmt):
            raise ValueError(f"{directory} is already quantized as {saved_fmt}; it cannot be "
                             f"re-quantized as {quantization} (quantize the original checkpoint)")
        specs = quantized_specs(config, saved_fmt, specs, model_class.has_lm_head)
    missing = _check_tensors(ckpt, stored, specs, model_class, directory)
    if saved_fmt is not None:
        _check_packed_matrices(ckpt, stored, specs)

    # Quantize on load: the weights of these modules are streamed, never loaded whole.
    layout = quant_layout(config, model_class.has_lm_head) if quantization and saved_fmt is None else {}
    streamed = {src + ".weight" for sources in layout.values() for src, _ in sources}
    streamed.discard("model.embed_tokens.weight")  # a tied lm_head's source stays the embedding

    tensors: dict[str, np.ndarray] = {}
    present = [n for n in specs if n in stored and n not in streamed]
    bar = tqdm(total=len(present) + len(layout), desc="Loading weights", unit="tensor", leave=False,
               disable=None if progress is None else not progress)
    for name in present:
        kind = specs[name].kind
        if kind == "packed":
            tensors[name] = ckpt.load_raw(stored[name])
        else:
            keep_bf16 = kind == "matrix" and (
                target == "bfloat16" or (target == "auto" and ckpt.info(stored[name]).dtype == "BF16"))
            tensors[name] = ckpt.load(stored[name], "bfloat16" if keep_bf16 else "float32")
        bar.update()
    for module, sources in layout.items():
        tensors[module + ".qweight"] = _quantize_from_checkpoint(ckpt, stored, sources, quantization)
        biases = [tensors.pop(src + ".bias") for src, _ in sources if src + ".bias" in tensors]
        if biases:
            tensors[module + ".bias"] = np.concatenate(biases)
        bar.update()
    bar.close()
    if layout:
        config.quantization_config = {"quant_method": "glm4rt", "format": quantization,
                                      "block_size": BLOCK_SIZE, "group_rows": GROUP_ROWS}
    if missing:
        rng = np.random.default_rng(seed)
        matrix_dtype = "bfloat16" if target == "bfloat16" else "float32"
        for name in missing:
            tensors[name] = init_tensor(specs[name], config.initializer_range, rng, matrix_dtype)
        warnings.warn(
            f"Some weights of {model_class.name} were not initialized from the model checkpoint at "
            f"{directory} and are newly initialized: {missing}. You should probably train this "
            "model on a down-stream task to be able to use it for predictions and inference.",
            stacklevel=3)
    return Loaded(config, tensors, directory)


def _load_gguf(model_class: ModelClass, path: str, target: str, quantization: Optional[str],
               seed: Optional[int], overrides: dict[str, Any]) -> Loaded:
    """``load_checkpoint`` of a GGUF file (glm4rt.gguf_io)."""
    f = gguf_io.GgufFile(path)
    config = gguf_io.read_config(f)
    if overrides:
        config = Glm4Config.from_dict(config.to_dict(), **overrides)
    specs = model_class.tensor_specs(config)
    tensors, formats, missing = gguf_io.read_tensors(f, specs, config, target, quantization)
    if not model_class.has_lm_head:  # a head's matrix (score) is float: never quantized
        formats = {m: fmt for m, fmt in formats.items() if m != "lm_head"}
    fatal = [n for n in missing if n not in model_class.newly_initialisable]
    if fatal:
        raise CheckpointError(f"{path}: the GGUF lacks tensors of a {model_class.name}: {_short_list(fatal)}")
    config.quantization_config = gguf_io.quantization_config(formats)
    if missing:
        rng = np.random.default_rng(seed)
        for name in missing:
            tensors[name] = init_tensor(specs[name], config.initializer_range, rng,
                                        "bfloat16" if target == "bfloat16" else "float32")
        warnings.warn(f"Some weights of {model_class.name} were not initialized from the GGUF {path} and are "
                      f"newly initialized: {missing}.", stacklevel=3)
    return Loaded(config, tensors, path)


def _check_tensors(ckpt: Checkpoint, stored: dict[str, str], specs: dict[str, TensorSpec],
                   model_class: ModelClass, directory: str) -> list[str]:
    """Names, shapes and dtypes of the stored tensors against ``specs``; returns the missing ones
    that the class may initialise."""
    unexpected = [n for n in stored if n not in specs and n not in _OTHER_HEADS]
    if unexpected:
        where = [f"{stored[n]!r} ({os.path.basename(ckpt.info(stored[n]).file)})" for n in unexpected]
        raise CheckpointError(
            f"checkpoint {directory!r} has tensors that a {model_class.name} with this config does not "
            f"use: {_short_list(where)} (does config.json match the weights?)")
    missing = [n for n in specs if n not in stored]
    fatal = [n for n in missing if n not in model_class.newly_initialisable]
    if fatal:
        raise CheckpointError(f"checkpoint {directory!r} lacks tensors: {_short_list([repr(n) for n in fatal])} "
                              "(does config.json match the weights?)")
    for name in specs:
        if name not in stored:
            continue
        info, spec = ckpt.info(stored[name]), specs[name]
        if info.shape != spec.shape:
            raise CheckpointError(
                f"tensor {stored[name]!r} has shape {list(info.shape)} in {info.file}, but the "
                f"config expects {list(spec.shape)}")
        if info.dtype not in _KIND_DTYPES[spec.kind]:
            raise CheckpointError(
                f"tensor {stored[name]!r} is stored as {info.dtype} in {info.file}, but a "
                f"{'quantized weight' if spec.kind == 'packed' else spec.kind} must be one of "
                f"{', '.join(_KIND_DTYPES[spec.kind])}")
    return missing


def _check_layer_count(config: Glm4Config, config_source: str, stored: dict[str, str], directory: str) -> None:
    """num_hidden_layers against the layers the checkpoint holds, before anything is built per
    layer: a config asking for 10**12 layers must fail here, not while listing their tensors.
    (More layers stored than configured are reported as unexpected tensors.)"""
    present = 1 + max((int(m.group(1)) for n in stored if (m := _LAYER_NAME.match(n))), default=-1)
    if config.num_hidden_layers > present:
        raise ConfigError(
            f"{config_source}: num_hidden_layers={config.num_hidden_layers}, but the checkpoint in "
            f"{directory!r} holds {present} (tensors model.layers.<i>.* with i < {present})")


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def save_checkpoint(save_directory: str | os.PathLike, config: Glm4Config, params: dict[str, np.ndarray],
                    model_class: ModelClass) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``params`` (a model's
    ``named_parameters()``; bf16 weights stay BF16) so that glm4rt, or transformers for float
    weights, can load the directory."""
    qc = getattr(config, "quantization_config", None) or {}
    if qc.get("quant_method") == "gguf":
        raise ValueError("a model loaded from a quantized GGUF (its modules have mixed formats) cannot be saved as "
                         "a glm4rt checkpoint: load the GGUF directly, or quantize the original checkpoint with "
                         "`glm4rt quantize`")
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    bf16_names = frozenset(name for name, a in params.items() if a.dtype == np.uint16)
    metadata = {"format": "pt"}
    fmt = (getattr(config, "quantization_config", None) or {}).get("format")
    if fmt is not None:
        specs = quantized_specs(config, fmt, model_class.tensor_specs(config), model_class.has_lm_head)
        metadata[QWEIGHT_SHAPES] = json.dumps({n: list(s.matrix) for n, s in specs.items() if s.kind == "packed"})
    save_safetensors(os.path.join(save_directory, SAFE_WEIGHTS_NAME), params, bf16_names, metadata)
