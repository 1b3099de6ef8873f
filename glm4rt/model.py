"""The GLM-4 network: weights named as in the Hugging Face checkpoint, and THE forward pass
(``Glm4Model.forward``), readable top to bottom.

GLM-4 quirks, each commented where it happens: four RMSNorms per layer ("sandwich" norms, with
``post_attention_layernorm`` being the norm *before* the MLP), rotary on only the first
``head_dim * partial_rotary_factor`` dims of each head with adjacent pairs (GPT-J style, not NeoX
halves), one fused ``gate_up_proj`` (gate first), q/k/v biases but no o_proj bias.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from . import autothreads, ops
from .config import CONFIG_DEFAULTS, CONFIG_NAME, Glm4Config
from .errors import CheckpointError, ConfigError
from .hub import HUB_KWARGS, resolve_model_dir
from .kv_cache import Glm4Cache
from .outputs import BaseModelOutputWithPast
from .quant import BLOCK_SIZE, GROUP_ROWS, QUANT_FORMATS, QuantLinear, packed_bytes, quantize_rows
from .weights import FLOAT_DTYPES, SAFE_WEIGHTS_NAME, Checkpoint, save_safetensors


class Linear:
    """One projection ``y = x @ weight.T (+ bias)`` owning its weight in whatever format.

    Args:
        weight: ``[out_features, in_features]`` float32, or uint16 holding bf16 bit patterns.
        bias: optional float32 ``[out_features]``.
    """

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> None:
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``x [n_tokens, in_features]`` -> ``[n_tokens, out_features]`` float32."""
        return ops.linear(x, self.weight, self.bias, out)

    def parameters(self, name: str) -> dict[str, np.ndarray]:
        """Checkpoint tensors of this layer under module name ``name``."""
        out = {name + ".weight": self.weight}
        if self.bias is not None:
            out[name + ".bias"] = self.bias
        return out


@dataclass
class Glm4Attention:
    o_proj: Linear                    # [H, n_heads * d], never a bias
    q_proj: Optional[Linear] = None   # [n_heads * d, H] (+ bias when attention_bias)
    k_proj: Optional[Linear] = None   # [n_kv_heads * d, H] (+ bias)
    v_proj: Optional[Linear] = None   # [n_kv_heads * d, H] (+ bias)
    qkv_proj: Optional[Linear] = None  # quantized models: q, k, v rows stacked, one matmul

    def modules(self) -> dict[str, Linear]:
        return {n: m for n in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")
                if (m := getattr(self, n)) is not None}


@dataclass
class Glm4MLP:
    gate_up_proj: Linear  # [2 * I, H]: rows [0, I) gate, [I, 2I) up
    down_proj: Linear     # [H, I]


@dataclass
class Glm4DecoderLayer:
    self_attn: Glm4Attention
    mlp: Glm4MLP
    input_layernorm: np.ndarray           # [H] before attention
    post_self_attn_layernorm: np.ndarray  # [H] on the attention output
    post_attention_layernorm: np.ndarray  # [H] before the MLP (HF name, despite "post")
    post_mlp_layernorm: np.ndarray        # [H] on the MLP output


# ---- weights: names, shapes, loading ---------------------------------------------------------

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


def _normalise_dtype(dtype: Any) -> str:
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


def _base_model_specs(config: Glm4Config) -> dict[str, TensorSpec]:
    """Tensors of the decoder stack, under the checkpoint prefix ``model.``."""
    H, d, I = config.hidden_size, config.head_dim, config.intermediate_size
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    specs = {"model.embed_tokens.weight": TensorSpec((config.vocab_size, H), "matrix")}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                     "post_mlp_layernorm"):
            specs[p + norm + ".weight"] = TensorSpec((H,), "norm")
        for proj, rows in (("q_proj", n_h * d), ("k_proj", n_kv * d), ("v_proj", n_kv * d)):
            specs[p + f"self_attn.{proj}.weight"] = TensorSpec((rows, H), "matrix")
            if config.attention_bias:
                specs[p + f"self_attn.{proj}.bias"] = TensorSpec((rows,), "bias")
        specs[p + "self_attn.o_proj.weight"] = TensorSpec((H, n_h * d), "matrix")
        specs[p + "mlp.gate_up_proj.weight"] = TensorSpec((2 * I, H), "matrix")
        specs[p + "mlp.down_proj.weight"] = TensorSpec((H, I), "matrix")
    specs["model.norm.weight"] = TensorSpec((H,), "norm")
    return specs


def _canonical_name(name: str) -> str:
    """Checkpoints saved from a bare ``Glm4Model`` lack the ``model.`` prefix; add it."""
    if name.startswith(("embed_tokens.", "layers.", "norm.")):
        return "model." + name
    return name


def quant_layout(config: Glm4Config, with_lm_head: bool) -> dict[str, list[tuple[str, int]]]:
    """Which modules a quantized model has and where their rows come from:
    ``{quantized module: [(source module, rows), ...]}``. q, k and v are stacked into one
    ``self_attn.qkv_proj`` (one matmul instead of three) when each is made of whole 16-row groups."""
    d, n_h, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    H, I = config.hidden_size, config.intermediate_size
    fuse = (n_h * d) % GROUP_ROWS == 0 and (n_kv * d) % GROUP_ROWS == 0
    layout: dict[str, list[tuple[str, int]]] = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [(p + "self_attn.q_proj", n_h * d), (p + "self_attn.k_proj", n_kv * d),
               (p + "self_attn.v_proj", n_kv * d)]
        if fuse:
            layout[p + "self_attn.qkv_proj"] = qkv
        else:
            layout.update({name: [(name, rows)] for name, rows in qkv})
        layout[p + "self_attn.o_proj"] = [(p + "self_attn.o_proj", H)]
        layout[p + "mlp.gate_up_proj"] = [(p + "mlp.gate_up_proj", 2 * I)]
        layout[p + "mlp.down_proj"] = [(p + "mlp.down_proj", H)]
    if with_lm_head:  # a tied lm_head gets its own quantized copy of the embedding matrix
        layout["lm_head"] = [("model.embed_tokens" if config.tie_word_embeddings else "lm_head",
                              config.vocab_size)]
    return layout


def _quantized_specs(config: Glm4Config, fmt: str, specs: dict[str, TensorSpec],
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


def _make_linear(tensors: dict[str, np.ndarray], name: str, config: Glm4Config,
                 out_features: int, in_features: int) -> Linear | QuantLinear:
    """The layer ``name`` from loaded tensors: packed (``.qweight``) or a plain matrix (``.weight``)."""
    bias = tensors.get(name + ".bias")
    if name + ".qweight" in tensors:
        fmt = config.quantization_config["format"]
        return QuantLinear(tensors[name + ".qweight"], fmt, out_features, in_features, bias)
    return Linear(tensors[name + ".weight"], bias)


# __metadata__ entry of a quantized checkpoint: {qweight name: [out_features, in_features]}, as JSON.
# The packed size alone cannot tell a wrong config.json: int4 [126, 48] and [128, 48] take the same
# bytes (rows are packed 16 at a time, weights 32 at a time).
QWEIGHT_SHAPES = "glm4rt.qweight_shapes"


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


# Rows read per step when quantizing a checkpoint on load: about 64 MiB of source data.
_QUANT_CHUNK_BYTES = 64 * 2**20

# The MLP of a long prompt runs on balanced chunks of at most this many tokens, so that its
# [tokens, 2 * intermediate] fp32 activations stay small (GLM-4-9B, 4096 tokens: 57 MiB instead of
# 449 MiB). Weights are read no more often: every matmul path of many tokens works through
# blocks of about 512 tokens or fewer anyway (ops.cpp).
MLP_CHUNK_TOKENS = 512


def _quantize_from_checkpoint(ckpt: Checkpoint, stored: dict[str, str], sources: list[tuple[str, int]],
                              fmt: str) -> np.ndarray:
    """Stream the source matrices of one quantized module from the checkpoint, a chunk of rows at
    a time (peak memory: the packed result plus one chunk), into one packed matrix."""
    in_features = ckpt.info(stored[sources[0][0] + ".weight"]).shape[1]
    n_rows = sum(rows for _, rows in sources)
    packed = np.empty(packed_bytes(fmt, n_rows, in_features), dtype=np.uint8)
    chunk = max(GROUP_ROWS, _QUANT_CHUNK_BYTES // (4 * in_features) // GROUP_ROWS * GROUP_ROWS)
    row0 = 0
    for src, rows in sources:
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            quantize_rows(ckpt.read_rows(stored[src + ".weight"], start, stop), fmt, n_rows, row0 + start, packed)
        row0 += rows
    return packed


def _init_tensor(spec: TensorSpec, std: float, rng: np.random.Generator, dtype: str) -> np.ndarray:
    """transformers' ``_init_weights``: normal(0, initializer_range) matrices, unit norms, zero biases."""
    if spec.kind == "norm":
        return np.ones(spec.shape, dtype=np.float32)
    if spec.kind == "bias":
        return np.zeros(spec.shape, dtype=np.float32)
    w = rng.normal(0.0, std, size=spec.shape).astype(np.float32)
    return ops.f32_to_bf16(w) if dtype == "bfloat16" else w


class Glm4PreTrainedModel:
    """Shared construction and loading of the GLM-4 classes.

    ``Cls(config)`` builds a randomly initialised model (as transformers does);
    ``Cls.from_pretrained(path_or_hub_id, dtype=..., **config_overrides)`` loads a checkpoint.
    """

    config_class = Glm4Config
    # Tensors the class may create when the checkpoint lacks them (new classification heads).
    _newly_initialisable: tuple[str, ...] = ()
    # Whether the class has an lm_head (quantized along with the layers).
    _has_lm_head = False

    def __init__(self, config: Glm4Config, *, dtype: Any = "float32", seed: Optional[int] = None,
                 _tensors: Optional[dict[str, np.ndarray]] = None) -> None:
        if not isinstance(config, Glm4Config):
            raise TypeError(f"config must be a Glm4Config, got {type(config).__name__}")
        self.config = config
        self.name_or_path: Optional[str] = None
        self.checkpoint_dir: Optional[str] = None  # where from_pretrained found the files
        if _tensors is None:
            target = _normalise_dtype(dtype)
            rng = np.random.default_rng(seed)
            _tensors = {name: _init_tensor(spec, config.initializer_range, rng, target)
                        for name, spec in self._tensor_specs(config).items()}
        self._build(_tensors)

    @classmethod
    def _tensor_specs(cls, config: Glm4Config) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, dtype: Any = "auto",
                        quantization: Optional[str] = None, config: Optional[Glm4Config] = None,
                        seed: Optional[int] = None, progress: Optional[bool] = None, **kwargs: Any):
        """Load a checkpoint directory (or Hugging Face hub id) as published.

        Args:
            pretrained_model_name_or_path: directory with ``config.json`` and ``model.safetensors``
                (or shards + ``model.safetensors.index.json``), or a hub id such as
                ``"zai-org/GLM-4-9B-0414"`` (resolved through ``huggingface_hub`` and its cache).
            dtype: ``"auto"`` keeps bf16 matrices as bf16 (memory-mapped, no copy) and loads the
                rest as float32; ``"float32"`` or ``"bfloat16"`` force one weight format. bf16
                matrices multiply activations rounded to bf16 (as llama.cpp's BF16 and
                transformers' bf16 do: the AVX512-BF16 dot products), summed in float32;
                ``"float32"`` widens them exactly and computes in fp32 throughout (transformers'
                fp32 results to ~1e-6, at twice the memory). Norms, biases, attention, the
                residual stream and every sum are float32 in all cases.
            quantization: ``"int8"`` or ``"int4"`` quantizes every projection and the lm_head while
                loading, streaming the checkpoint a chunk of rows at a time (see ``glm4rt.quant``).
                A checkpoint saved quantized loads as it is (memory-mapped) without this argument.
            config: use this config instead of the directory's ``config.json``.
            seed: seed for newly initialised heads.
            progress: show a progress bar (default: when stderr is a terminal).
            **kwargs: hub options (``revision``, ``cache_dir``, ``local_files_only``, ``token``)
                and config overrides (``num_labels=``, ``problem_type=``, ``id2label=`` ...).
        Returns:
            The model.
        Raises:
            FileNotFoundError: no such directory / hub id, or no weights in it.
            CheckpointError: corrupt or truncated files, missing, unexpected or mis-shaped tensors.
            ConfigError: an unsupported config.
            TypeError: an unknown keyword argument.
        """
        target = _normalise_dtype(dtype)
        if quantization is not None and quantization not in QUANT_FORMATS:
            raise ValueError(f"quantization={quantization!r}: choose one of {sorted(QUANT_FORMATS)} or None")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        unknown = sorted(set(kwargs) - _CONFIG_KWARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword arguments {unknown}")
        directory = resolve_model_dir(pretrained_model_name_or_path, **hub_kwargs)
        config_source = "the config given" if config is not None else os.path.join(directory, CONFIG_NAME)
        if config is None:
            config = Glm4Config.from_pretrained(directory, **kwargs)
        elif kwargs:
            config = Glm4Config.from_dict(config.to_dict(), **kwargs)
        ckpt = Checkpoint(directory)
        stored = {_canonical_name(name): name for name in ckpt.names()}  # canonical -> stored name
        _check_layer_count(config, config_source, stored, directory)
        specs = cls._tensor_specs(config)
        saved_fmt = (getattr(config, "quantization_config", None) or {}).get("format")
        if saved_fmt is not None:
            if quantization not in (None, saved_fmt):
                raise ValueError(f"{directory} is already quantized as {saved_fmt}; it cannot be "
                                 f"re-quantized as {quantization} (quantize the original checkpoint)")
            specs = _quantized_specs(config, saved_fmt, specs, cls._has_lm_head)

        unexpected = [n for n in stored if n not in specs and n not in _OTHER_HEADS
                      and not n.endswith("rotary_emb.inv_freq")]
        if unexpected:
            where = [f"{stored[n]!r} ({os.path.basename(ckpt.info(stored[n]).file)})" for n in unexpected]
            raise CheckpointError(
                f"checkpoint {directory!r} has tensors that a {cls.__name__} with this config does not "
                f"use: {_short_list(where)} (does config.json match the weights?)")
        missing = [n for n in specs if n not in stored]
        fatal = [n for n in missing if n not in cls._newly_initialisable]
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
        if saved_fmt is not None:
            _check_packed_matrices(ckpt, stored, specs)

        # Quantize on load: the weights of these modules are streamed, never loaded whole.
        layout = quant_layout(config, cls._has_lm_head) if quantization and saved_fmt is None else {}
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
                tensors[name] = _init_tensor(specs[name], config.initializer_range, rng, matrix_dtype)
            warnings.warn(
                f"Some weights of {cls.__name__} were not initialized from the model checkpoint at "
                f"{directory} and are newly initialized: {missing}. You should probably train this "
                "model on a down-stream task to be able to use it for predictions and inference.",
                stacklevel=2)
        model = cls(config, _tensors=tensors)
        model.name_or_path = os.fspath(pretrained_model_name_or_path)
        model.checkpoint_dir = directory
        return model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (bf16 weights stay BF16) so that this
        class, or transformers, can load the directory."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        params = self.named_parameters()
        bf16 = frozenset(name for name, a in params.items() if a.dtype == np.uint16)
        metadata = {"format": "pt"}
        fmt = (getattr(self.config, "quantization_config", None) or {}).get("format")
        if fmt is not None:
            specs = _quantized_specs(self.config, fmt, self._tensor_specs(self.config), self._has_lm_head)
            metadata[QWEIGHT_SHAPES] = json.dumps({n: list(s.matrix) for n, s in specs.items() if s.kind == "packed"})
        save_safetensors(os.path.join(save_directory, SAFE_WEIGHTS_NAME), params, bf16, metadata)

    def __call__(self, *args: Any, **kwargs: Any):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = getattr(ids, "shape", None)  # arrays only: other inputs go to forward's checks
        if shape is not None and len(shape) >= 2 and shape[1] == 1:  # a decode step
            with autothreads.decode_step():  # threads that follow the machine's load
                return self.forward(*args, **kwargs)
        return self.forward(*args, **kwargs)


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


# ---- the model --------------------------------------------------------------------------------

class Glm4Model(Glm4PreTrainedModel):
    """The decoder stack: embeddings, ``num_hidden_layers`` layers, final norm.

    ``forward`` returns a ``BaseModelOutputWithPast`` (see there for the shapes).
    """

    @classmethod
    def _tensor_specs(cls, config: Glm4Config) -> dict[str, TensorSpec]:
        return _base_model_specs(config)

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        config = self.config
        self.embed_tokens = tensors["model.embed_tokens.weight"]  # [V, H]
        self.layers: list[Glm4DecoderLayer] = []
        H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
        q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."

            def lin(name: str, out_features: int, in_features: int, p: str = p) -> Linear | QuantLinear:
                return _make_linear(tensors, p + name, config, out_features, in_features)

            if p + "self_attn.qkv_proj.qweight" in tensors:
                attn = Glm4Attention(o_proj=lin("self_attn.o_proj", H, q_rows),
                                     qkv_proj=lin("self_attn.qkv_proj", q_rows + 2 * kv_rows, H))
            else:
                attn = Glm4Attention(o_proj=lin("self_attn.o_proj", H, q_rows), q_proj=lin("self_attn.q_proj", q_rows, H),
                                     k_proj=lin("self_attn.k_proj", kv_rows, H), v_proj=lin("self_attn.v_proj", kv_rows, H))
            self.layers.append(Glm4DecoderLayer(
                self_attn=attn,
                mlp=Glm4MLP(lin("mlp.gate_up_proj", 2 * I, H), lin("mlp.down_proj", H, I)),
                input_layernorm=tensors[p + "input_layernorm.weight"],
                post_self_attn_layernorm=tensors[p + "post_self_attn_layernorm.weight"],
                post_attention_layernorm=tensors[p + "post_attention_layernorm.weight"],
                post_mlp_layernorm=tensors[p + "post_mlp_layernorm.weight"],
            ))
        self.norm = tensors["model.norm.weight"]  # [H]
        # Rotary inverse frequencies over the R rotated dims, in float32 as transformers computes them.
        R = config.rotary_dim
        exponent = np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / np.float32(R)
        self.inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Every weight under its checkpoint name (bf16 matrices as uint16 bit patterns, quantized
        ones as ``<module>.qweight`` packed bytes)."""
        out = {"model.embed_tokens.weight": self.embed_tokens}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for name, module in layer.self_attn.modules().items():
                out.update(module.parameters(p + "self_attn." + name))
            out.update(layer.mlp.gate_up_proj.parameters(p + "mlp.gate_up_proj"))
            out.update(layer.mlp.down_proj.parameters(p + "mlp.down_proj"))
            for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                         "post_mlp_layernorm"):
                out[p + norm + ".weight"] = getattr(layer, norm)
        out["model.norm.weight"] = self.norm
        return out

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Embedding rows for ``input_ids [batch, seq]`` -> float32 ``[batch, seq, H]``."""
        rows = self.embed_tokens[input_ids.reshape(-1)]
        if rows.dtype == np.uint16:
            rows = ops.bf16_to_f32(rows)
        return rows.astype(np.float32, copy=False).reshape(*input_ids.shape, -1)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, inputs_embeds: Any = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                cache_position: Any = None, return_dict: Optional[bool] = None, cache: Any = None,
                *, keep_positions: Optional[np.ndarray] = None) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        Args:
            input_ids: int ``[batch, seq]`` token ids (or give ``inputs_embeds [batch, seq, H]``).
            attention_mask: ``[batch, past + seq]``, 1 for tokens to attend to, 0 for padding.
            position_ids: int ``[batch, seq]`` (or ``[1, seq]``); default ``past .. past + seq - 1``.
            past_key_values: a ``Glm4Cache`` (updated in place) or legacy per-layer ``(key, value)``
                tuples ``[batch, n_kv_heads, past, head_dim]``. ``cache`` is the transformers 5.x name.
            use_cache: return the cache (default ``config.use_cache``).
            output_attentions: also return each layer's attention probabilities.
            output_hidden_states: also return the embeddings and every layer's output.
            cache_position: int ``[seq]`` cache rows the new tokens occupy (contiguous); default
                ``past .. past + seq - 1``. A start below the cached length rewinds the cache.
            return_dict: ``False`` returns a tuple of the non-``None`` fields.
            keep_positions: int ``[K]`` positions in ``0 .. seq-1`` (ascending, distinct) whose final
                states are all the caller needs (the heads' kept or pooled positions): the last
                layer still projects every token's key and value into the cache, but runs
                attention, ``o_proj`` and the MLP for these positions only, as llama.cpp does for a
                prompt's last layer (the whole layer when hidden states or attentions are asked for).
        Returns:
            ``BaseModelOutputWithPast`` (or a tuple); with ``keep_positions``, ``last_hidden_state``
            holds those positions only, ``[batch, K, H]``.
        Raises:
            ValueError: token ids outside the vocabulary, a sequence longer than
                ``max_position_embeddings``, shapes that do not fit.
        """
        config = self.config
        if cache is not None:
            if past_key_values is not None:
                raise ValueError("pass either past_key_values or cache, not both")
            past_key_values = cache
        use_cache = config.use_cache if use_cache is None else use_cache
        return_dict = True if return_dict is None else return_dict

        # -- inputs ----------------------------------------------------------------------------
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = np.asarray(input_ids)
            if input_ids.dtype.kind not in "iu":
                raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
            if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)].ravel()[0]
                raise ValueError(f"token id {int(bad)} is out of range for vocab_size {config.vocab_size}")
            B, T = input_ids.shape
        else:
            inputs_embeds = np.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {config.hidden_size}], got {inputs_embeds.shape}")
            B, T = inputs_embeds.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"the input is empty: batch {B}, sequence {T}")

        if past_key_values is not None and not isinstance(past_key_values, Glm4Cache):
            past_key_values = Glm4Cache.from_legacy_cache(past_key_values, config)
        kv = past_key_values
        if kv is None:  # attention still needs the keys and values of this call
            kv = Glm4Cache.for_config(config, B, T)
        past = kv.get_seq_length()
        if cache_position is not None:
            cache_position = np.asarray(cache_position)
            if cache_position.dtype.kind not in "iu":
                raise ValueError(f"cache_position must be integers, got dtype {cache_position.dtype}")
            cache_position = cache_position.astype(np.int64).reshape(-1)
            start = int(cache_position[0]) if cache_position.size else -1
            if cache_position.size != T or not np.array_equal(cache_position, np.arange(start, start + T)):
                raise ValueError(f"cache_position must be {T} consecutive cache rows, got {cache_position}")
            if not 0 <= start <= past:
                raise ValueError(f"cache_position starts at {start} but the cache holds {past} positions")
            kv.crop(start)
            past = start
        total = past + T  # keys visible to this call
        if total > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {total} (past {past} + new {T}) exceeds max_position_embeddings "
                f"{config.max_position_embeddings}")

        if position_ids is None:
            positions = np.broadcast_to(np.arange(past, total, dtype=np.int64), (B, T))
        else:
            positions = np.asarray(position_ids)
            if positions.dtype.kind not in "iu":
                raise ValueError(f"position_ids must be integers, got dtype {positions.dtype}")
            if positions.ndim == 1:
                positions = positions[None]
            if positions.shape not in ((B, T), (1, T)):
                raise ValueError(f"position_ids must be [{B}, {T}] or [1, {T}], got {positions.shape}")
            if positions.size and positions.min() < 0:
                raise ValueError("position_ids must be >= 0")
            positions = np.broadcast_to(positions.astype(np.int64), (B, T))
        positions = np.ascontiguousarray(positions).reshape(-1)  # [B*T]

        key_mask = None
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.ndim != 2 or attention_mask.shape != (B, total):
                raise ValueError(
                    f"attention_mask must be 2-D [batch, past + seq] = [{B}, {total}], got {attention_mask.shape}")
            key_mask = np.ascontiguousarray(attention_mask != 0, dtype=np.uint8)  # [B, total]
        kv.reserve(B, total)

        # -- forward ---------------------------------------------------------------------------
        H, d = config.hidden_size, config.head_dim
        n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
        eps, R = float(config.rms_norm_eps), config.rotary_dim
        N = B * T
        q_rows = np.arange(past, total, dtype=np.int64)  # cache row of each new token
        if input_ids is not None:
            x = self.embed(input_ids).reshape(N, H)  # [N, H]
        else:
            x = np.array(inputs_embeds, dtype=np.float32).reshape(N, H)
        all_hidden = [x.reshape(B, T, H).copy()] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        # Activations, allocated once and reused by every layer: a fresh array of hundreds of MB
        # per layer would be fresh pages, and page faults, each time.
        n_chunks = -(-N // MLP_CHUNK_TOKENS)
        chunk = -(-N // n_chunks)  # balanced: no small last chunk on another matmul path
        I, n_qkv = config.intermediate_size, (n_h + 2 * n_kv) * d
        h = np.empty((N, H), dtype=np.float32)                     # normed input of a block
        attn = np.empty((B, T, n_h, d), dtype=np.float32)          # attention output per head
        q_buf = np.empty((N, n_h * d), dtype=np.float32)
        k_buf = np.empty((N, n_kv * d), dtype=np.float32)
        v_buf = np.empty((N, n_kv * d), dtype=np.float32)
        fused = bool(self.layers) and self.layers[0].self_attn.qkv_proj is not None  # quantized
        qkv_buf = np.empty((N, n_qkv), dtype=np.float32) if fused else None
        a_buf = np.empty((N, H), dtype=np.float32)                 # attention block output
        m_buf = np.empty((N, H), dtype=np.float32)                 # MLP block output
        gate_up = np.empty((chunk, 2 * I), dtype=np.float32)       # per chunk of tokens
        ffn = np.empty((chunk, I), dtype=np.float32)
        if keep_positions is not None:
            keep_positions = np.asarray(keep_positions, dtype=np.int64).reshape(-1)
            if keep_positions.size and (keep_positions.min() < 0 or keep_positions.max() >= T
                                        or np.any(np.diff(keep_positions) <= 0)):
                raise ValueError(f"keep_positions must be ascending distinct positions in [0, {T}), "
                                 f"got {keep_positions}")
            if keep_positions.size == T:
                keep_positions = None  # every position, in order
        # Whether the last layer runs on the kept rows only (every layer's output asked for, or no
        # position kept: it runs whole, and the kept rows are picked at the end).
        prune = (keep_positions is not None and keep_positions.size > 0
                 and not (output_hidden_states or output_attentions))

        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            # Attention block: x = x + post_self_attn_layernorm(attn(input_layernorm(x)))
            ops.rms_norm(x, layer.input_layernorm, eps, out=h)
            if sa.qkv_proj is not None:  # quantized: q, k, v rows stacked in one matrix
                qkv = sa.qkv_proj(h, out=qkv_buf)             # [N, (n_h + 2 n_kv) d]
                np.copyto(q_buf, qkv[:, :n_h * d])
                np.copyto(k_buf, qkv[:, n_h * d:(n_h + n_kv) * d])
                q, k = q_buf.reshape(N, n_h, d), k_buf.reshape(N, n_kv, d)  # [N, n_h, d], [N, n_kv, d]
                v = qkv[:, (n_h + n_kv) * d:]                 # [N, n_kv * d]
            else:
                q = sa.q_proj(h, out=q_buf).reshape(N, n_h, d)   # [N, n_h, d]
                k = sa.k_proj(h, out=k_buf).reshape(N, n_kv, d)  # [N, n_kv, d]
                v = sa.v_proj(h, out=v_buf)                      # [N, n_kv * d]
            ops.rotary_(q, positions, self.inv_freq, R)  # first R dims, adjacent pairs
            ops.rotary_(k, positions, self.inv_freq, R)
            kv.write(i, k.reshape(B, T, n_kv, d), v.reshape(B, T, n_kv, d), past)
            if prune and i == len(self.layers) - 1:
                # Last layer, only some positions wanted: the rest of the layer runs on their rows.
                T = keep_positions.size
                N = B * T
                q = np.ascontiguousarray(q.reshape(B, -1, n_h, d)[:, keep_positions])    # [B, T, n_h, d]
                x = np.ascontiguousarray(x.reshape(B, -1, H)[:, keep_positions]).reshape(N, H)  # [N, H]
                q_rows = q_rows[keep_positions]
                h, a_buf, m_buf = h[:N], a_buf[:N], m_buf[:N]
                attn = np.empty((B, T, n_h, d), dtype=np.float32)
            probs = np.empty((B, n_h, T, total), dtype=np.float32) if output_attentions else None
            ops.attention(q.reshape(B, T, n_h, d), kv.key_cache[i], kv.value_cache[i], total, q_rows,
                          key_mask, d ** -0.5, out=attn, probs=probs)
            a = sa.o_proj(attn.reshape(N, n_h * d), out=a_buf)  # [N, H]
            x += ops.rms_norm(a, layer.post_self_attn_layernorm, eps, out=a)

            # MLP block: x = x + post_mlp_layernorm(down(up * silu(gate)))
            ops.rms_norm(x, layer.post_attention_layernorm, eps, out=h)  # the pre-MLP norm
            for r0 in range(0, N, chunk):                                # rows r0 .. r1
                n = min(N, r0 + chunk) - r0
                gu = layer.mlp.gate_up_proj(h[r0:r0 + n], out=gate_up[:n])             # [n, 2I]
                layer.mlp.down_proj(ops.silu_mul(gu, out=ffn[:n]), out=m_buf[r0:r0 + n])  # [n, H]
            x += ops.rms_norm(m_buf, layer.post_mlp_layernorm, eps, out=m_buf)

            if output_hidden_states:
                all_hidden.append(x.reshape(B, T, H).copy())
            if output_attentions:
                all_attn.append(probs)

        x = ops.rms_norm(x, self.norm, eps).reshape(B, T, H)  # [B, T, H]
        kv.seq_len = total
        if output_hidden_states:
            all_hidden[-1] = x  # transformers reports the final *normed* state last
        out = BaseModelOutputWithPast(
            last_hidden_state=x if prune or keep_positions is None else x[:, keep_positions],
            past_key_values=kv if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()
