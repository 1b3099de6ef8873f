"""The GLM-4 network: weights named as in the Hugging Face checkpoint, and THE forward pass
(``Glm4Model.forward``), readable top to bottom. Reading checkpoints is ``loading.py``'s job.

GLM-4 quirks, each commented where it happens: four RMSNorms per layer ("sandwich" norms, with
``post_attention_layernorm`` being the norm *before* the MLP), rotary on only the first
``head_dim * partial_rotary_factor`` dims of each head with adjacent pairs (GPT-J style, not NeoX
halves), one fused ``gate_up_proj`` (gate first), q/k/v biases but no o_proj bias.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import autothreads, bf16, loading, ops
from .config import Glm4Config
from .kv_cache import Glm4Cache
from .outputs import BaseModelOutputWithPast
from .quant import QuantLinear

# The MLP of a long prompt runs on balanced chunks of at most this many tokens, so that its
# [tokens, 2 * intermediate] fp32 activations stay small (GLM-4-9B, 4096 tokens: 57 MiB instead of
# 449 MiB). Weights are read no more often: every matmul path of many tokens works through
# blocks of about 512 tokens or fewer anyway (ops.cpp).
MLP_CHUNK_TOKENS = 512


class Linear:
    """One projection ``y = x @ weight.T (+ bias)`` with a float weight (``quant.QuantLinear`` is
    its packed int8/int4 twin; the forward calls both the same way).

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


class StackedLinear:
    """Float projections of one input as one ``[sum of out_features, in]`` layer: float q, k and v
    stay three memory-mapped matrices (stacking them would copy the weights), while the forward
    calls them as it calls a quantized ``qkv_proj``.

    Args:
        parts: ``{HF module name: Linear}`` in row order (``q_proj``, ``k_proj``, ``v_proj``).
    """

    def __init__(self, parts: dict[str, Linear]) -> None:
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts.values())

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``x [n_tokens, in_features]`` -> ``out [n_tokens, out_features]``, part by part."""
        col = 0
        for part in self.parts.values():
            out[:, col:col + part.out_features] = part(x)  # [n_tokens, part rows]
            col += part.out_features
        return out

    def parameters(self, name: str) -> dict[str, np.ndarray]:
        """Checkpoint tensors of the parts, named as siblings of ``name`` (``...self_attn.q_proj``)."""
        parent = name.rsplit(".", 1)[0]
        return {k: v for part_name, part in self.parts.items() for k, v in part.parameters(f"{parent}.{part_name}").items()}


@dataclass
class Glm4Attention:
    qkv_proj: StackedLinear | QuantLinear  # [(n_heads + 2 n_kv_heads) * d, H]: q, k, v rows (+ biases)
    o_proj: Linear | QuantLinear          # [H, n_heads * d], never a bias


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


def make_linear(tensors: dict[str, np.ndarray], name: str, config: Glm4Config,
                out_features: int, in_features: int) -> Linear | QuantLinear:
    """The layer ``name`` from loaded tensors: packed (``.qweight``) or a float matrix (``.weight``)."""
    bias = tensors.get(name + ".bias")
    if name + ".qweight" in tensors:
        qc = config.quantization_config  # a GGUF's modules may differ: module_formats
        fmt = qc.get("module_formats", {}).get(name, qc["format"])
        return QuantLinear(tensors[name + ".qweight"], fmt, out_features, in_features, bias)
    return Linear(tensors[name + ".weight"], bias)


class Glm4PreTrainedModel:
    """Shared construction and loading of the GLM-4 classes.

    ``Cls(config)`` builds a randomly initialised model (as transformers does);
    ``Cls.from_pretrained(path_or_hub_id, dtype=..., **config_overrides)`` loads a checkpoint.
    """

    config_class = Glm4Config
    # Tensors the class may create when the checkpoint lacks them (new classification heads).
    newly_initialisable: tuple[str, ...] = ()
    # Whether the class has an lm_head (quantized along with the layers).
    has_lm_head = False

    def __init__(self, config: Glm4Config, *, dtype: Any = "float32", seed: Optional[int] = None,
                 tensors: Optional[dict[str, np.ndarray]] = None) -> None:
        """Args:
            config: the model's config.
            dtype: ``"float32"`` or ``"bfloat16"`` matrices for a random initialisation.
            seed: seed of the random initialisation.
            tensors: ``{checkpoint name: array}`` to build from instead (``loading.load_checkpoint``).
        """
        if not isinstance(config, Glm4Config):
            raise TypeError(f"config must be a Glm4Config, got {type(config).__name__}")
        self.config = config
        self.name_or_path: Optional[str] = None
        self.checkpoint_dir: Optional[str] = None  # where from_pretrained found the files
        if tensors is None:
            tensors = loading.random_tensors(self.tensor_specs(config), config, dtype, seed)
        self._build(tensors)

    @classmethod
    def tensor_specs(cls, config: Glm4Config) -> dict[str, loading.TensorSpec]:
        """The checkpoint tensors of this class for ``config``."""
        raise NotImplementedError

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    @classmethod
    def loading_class(cls) -> loading.ModelClass:
        """What ``loading`` needs to know of this class."""
        return loading.ModelClass(cls.__name__, cls.tensor_specs, cls.has_lm_head, cls.newly_initialisable)

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
        loaded = loading.load_checkpoint(cls.loading_class(), pretrained_model_name_or_path, dtype=dtype,
                                         quantization=quantization, config=config, seed=seed,
                                         progress=progress, **kwargs)
        model = cls(loaded.config, tensors=loaded.tensors)
        model.name_or_path = os.fspath(pretrained_model_name_or_path)
        model.checkpoint_dir = loaded.directory
        return model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (bf16 weights stay BF16) so that this
        class, or transformers, can load the directory."""
        loading.save_checkpoint(save_directory, self.config, self.named_parameters(), self.loading_class())

    def __call__(self, *args: Any, **kwargs: Any):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = getattr(ids, "shape", None)  # arrays only: other inputs go to forward's checks
        if shape is not None and len(shape) >= 2 and shape[1] == 1:  # a decode step
            with autothreads.decode_step():  # threads that follow the machine's load
                return self.forward(*args, **kwargs)
        return self.forward(*args, **kwargs)


# ---- the model --------------------------------------------------------------------------------

@dataclass
class ForwardInputs:
    """A forward call's inputs, checked and in the forward's terms (``Glm4Model.prepare_inputs``)."""
    batch: int                          # B
    seq: int                            # T new tokens per sequence
    past: int                           # positions already in the cache
    x: np.ndarray                       # [B * T, H] float32 input embeddings
    positions: np.ndarray               # [B * T] rotary position of each new token
    key_mask: Optional[np.ndarray]      # [B, past + T] uint8, 1 = attend (None: every key)
    kv: Glm4Cache                       # reserved for past + T positions
    keep: Optional[np.ndarray]          # [K] positions whose final states are wanted (None: all)
    prune: bool                         # whether the last layer runs on the kept positions only

    @property
    def total(self) -> int:
        """Keys visible to this call."""
        return self.past + self.seq


@dataclass
class RowBatch:
    """Tokens of several sequences in one forward, each at its own position of its own cache
    sequence (the serving engine's step: some sequences decode one token, others prefill a chunk).

    The rows of a sequence are consecutive positions; a row attends to its sequence's cached keys
    up to its own position.
    """
    input_ids: np.ndarray  # [N] token ids
    slots: np.ndarray      # [N] int64 cache sequence of each token
    positions: np.ndarray  # [N] int64 its position (rotary and cache row)
    keep: np.ndarray       # [K] int64 rows whose final states are returned (ascending)


# How the layer stack's attention meets the cache: write(i, k [N, n_kv, d], v [N, n_kv * d]) caches
# layer i's keys and values; keep_rows(q, x) narrows the last layer to the kept rows;
# attend(i, q [n, n_h, d], out [n, n_h * d], probs) computes the attention output.

class PaddedAttention:
    """``forward``'s rectangular batch: B sequences of T new tokens after ``past`` cached ones,
    sequence b in cache sequence b, an optional padding mask. Rows are ``b * T + t``."""

    def __init__(self, inp: ForwardInputs, scale: float) -> None:
        self.inp, self.scale = inp, scale
        self.q_rows = np.arange(inp.past, inp.total, dtype=np.int64)  # [t] cache row of each query

    def write(self, i: int, k: np.ndarray, v: np.ndarray) -> None:
        B, T, kv_shape = self.inp.batch, self.inp.seq, k.shape[1:]
        self.inp.kv.write(i, k.reshape(B, T, *kv_shape), v.reshape(B, T, *kv_shape), self.inp.past)

    def keep_rows(self, q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, x, self.q_rows = _kept_rows(self.inp.keep, self.inp.batch, q, x, self.q_rows)
        return q, x

    def probs_buffer(self, n_heads: int) -> np.ndarray:
        """Where ``attend`` puts the attention probabilities ``[B, n_heads, t, total]``."""
        return np.empty((self.inp.batch, n_heads, self.q_rows.size, self.inp.total), dtype=np.float32)

    def attend(self, i: int, q: np.ndarray, out: np.ndarray, probs: Optional[np.ndarray]) -> None:
        B, t, (n_h, d), kv = self.inp.batch, self.q_rows.size, q.shape[1:], self.inp.kv
        ops.attention(q.reshape(B, t, n_h, d), kv.key_cache[i], kv.value_cache[i], self.inp.total,
                      self.q_rows, self.inp.key_mask, self.scale, out=out.reshape(B, t, n_h, d), probs=probs)


class RowAttention:
    """A ``RowBatch``: every row in its own cache sequence at its own position."""

    def __init__(self, batch: RowBatch, kv: Glm4Cache, scale: float) -> None:
        self.kv, self.scale = kv, scale
        self.slots, self.positions, self.keep = batch.slots, batch.positions, batch.keep

    def write(self, i: int, k: np.ndarray, v: np.ndarray) -> None:
        # row r to [slot r, :, position r]: advanced indices around a slice index rows first
        self.kv.key_cache[i, self.slots, :, self.positions] = k
        self.kv.value_cache[i, self.slots, :, self.positions] = v.reshape(k.shape)

    def keep_rows(self, q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.slots, self.positions = self.slots[self.keep], self.positions[self.keep]
        return np.ascontiguousarray(q[self.keep]), np.ascontiguousarray(x[self.keep])

    def attend(self, i: int, q: np.ndarray, out: np.ndarray, probs: None) -> None:
        ops.attention_rows(q, self.kv.key_cache[i], self.kv.value_cache[i], self.slots, self.positions,
                           self.scale, out=out.reshape(q.shape))


class Glm4Model(Glm4PreTrainedModel):
    """The decoder stack: embeddings, ``num_hidden_layers`` layers, final norm.

    ``forward`` returns a ``BaseModelOutputWithPast`` (see there for the shapes).
    """

    @classmethod
    def tensor_specs(cls, config: Glm4Config) -> dict[str, loading.TensorSpec]:
        return loading.base_model_specs(config)

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        config = self.config
        self.embed_tokens = tensors["model.embed_tokens.weight"]  # [V, H]
        self.layers: list[Glm4DecoderLayer] = []
        H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
        q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."

            def lin(name: str, out_features: int, in_features: int, p: str = p) -> Linear | QuantLinear:
                return make_linear(tensors, p + name, config, out_features, in_features)

            if p + "self_attn.qkv_proj.qweight" in tensors:  # quantized: stacked when packed
                qkv = lin("self_attn.qkv_proj", q_rows + 2 * kv_rows, H)
            else:
                qkv = StackedLinear({proj: lin("self_attn." + proj, rows, H)
                                     for proj, rows in zip(loading.QKV, (q_rows, kv_rows, kv_rows))})
            self.layers.append(Glm4DecoderLayer(
                self_attn=Glm4Attention(qkv_proj=qkv, o_proj=lin("self_attn.o_proj", H, q_rows)),
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
            out.update(layer.self_attn.qkv_proj.parameters(p + "self_attn.qkv_proj"))
            out.update(layer.self_attn.o_proj.parameters(p + "self_attn.o_proj"))
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
            rows = bf16.to_f32(rows)
        return rows.astype(np.float32, copy=False).reshape(*input_ids.shape, -1)

    def prepare_inputs(self, input_ids: Any, inputs_embeds: Any, attention_mask: Any, position_ids: Any,
                       past_key_values: Any, cache_position: Any, keep_positions: Any,
                       whole_last_layer: bool) -> ForwardInputs:
        """Check ``forward``'s inputs and put them in its terms (embeddings, positions, cache).

        Raises:
            ValueError: see ``forward``.
        """
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = np.asarray(input_ids)
            if input_ids.ndim != 2 and input_ids.dtype.kind in "iu":  # (a wrong dtype is reported first)
                raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
            _check_token_ids(input_ids, config.vocab_size)
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
        total = past + T
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

        key_mask = None
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.ndim != 2 or attention_mask.shape != (B, total):
                raise ValueError(
                    f"attention_mask must be 2-D [batch, past + seq] = [{B}, {total}], got {attention_mask.shape}")
            key_mask = np.ascontiguousarray(attention_mask != 0, dtype=np.uint8)  # [B, total]

        keep = None
        if keep_positions is not None:
            keep = np.asarray(keep_positions, dtype=np.int64).reshape(-1)  # [K]
            if keep.size and (keep.min() < 0 or keep.max() >= T or np.any(np.diff(keep) <= 0)):
                raise ValueError(f"keep_positions must be ascending distinct positions in [0, {T}), got {keep}")
            if keep.size == T:
                keep = None  # every position, in order
        kv.reserve(B, total)
        if input_ids is not None:
            x = self.embed(input_ids).reshape(B * T, -1)  # [B*T, H]
        else:
            x = np.array(inputs_embeds, dtype=np.float32).reshape(B * T, -1)
        return ForwardInputs(
            batch=B, seq=T, past=past, x=x,
            positions=np.ascontiguousarray(positions).reshape(-1), key_mask=key_mask, kv=kv, keep=keep,
            # The last layer runs whole when every layer's output is asked for, or when no position
            # is kept (the kept rows are then picked at the end).
            prune=keep is not None and keep.size > 0 and not whole_last_layer)

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
        inp = self.prepare_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                                  cache_position, keep_positions, bool(output_hidden_states or output_attentions))
        B, T, H = inp.batch, inp.seq, config.hidden_size
        attention = PaddedAttention(inp, config.head_dim ** -0.5)
        x, all_hidden, all_attn = self.decoder(
            inp.x, inp.positions, attention, inp.prune,
            (lambda x: x.reshape(B, T, H).copy()) if output_hidden_states else None, bool(output_attentions))
        x = x.reshape(B, -1, H)  # [B, T or K, H]
        inp.kv.seq_len = inp.total
        if output_hidden_states:
            all_hidden[-1] = x  # transformers reports the final *normed* state last
        out = BaseModelOutputWithPast(
            last_hidden_state=x if inp.prune or inp.keep is None else x[:, inp.keep],
            past_key_values=inp.kv if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    def forward_rows(self, batch: RowBatch, cache: Glm4Cache) -> np.ndarray:
        """Run the decoder on the tokens of several sequences at once (``RowBatch``), each reading
        and extending its own sequence of ``cache``, in batch-invariant mode: every row gets the
        bits it would get in a forward of its sequence alone (run in that mode).

        Args:
            batch: the tokens, their cache sequences and positions, the rows to return.
            cache: a ``Glm4Cache`` with one sequence per slot and room for every position.
        Returns:
            float32 ``[K, H]``: the final (normed) states of the kept rows.
        Raises:
            ValueError: ids outside the vocabulary, slots or positions outside the cache.
        """
        config = self.config
        ids = np.asarray(batch.input_ids).reshape(-1)
        N = ids.size
        if N == 0:
            raise ValueError("the batch has no tokens")
        _check_token_ids(ids, config.vocab_size)
        slots = np.asarray(batch.slots, dtype=np.int64).reshape(-1)
        positions = np.asarray(batch.positions, dtype=np.int64).reshape(-1)
        keep = np.asarray(batch.keep, dtype=np.int64).reshape(-1)
        if slots.size != N or positions.size != N:
            raise ValueError(f"slots and positions need one entry per token ({N})")
        if slots.min() < 0 or slots.max() >= cache.batch_size:
            raise ValueError(f"slots must be in [0, {cache.batch_size})")
        limit = min(cache.capacity, config.max_position_embeddings)
        if positions.min() < 0 or positions.max() >= limit:
            raise ValueError(f"positions must be in [0, {limit})")
        if keep.size and (keep.min() < 0 or keep.max() >= N or np.any(np.diff(keep) <= 0)):
            raise ValueError(f"keep must be ascending distinct rows in [0, {N})")
        attention = RowAttention(RowBatch(ids, slots, positions, keep), cache, config.head_dim ** -0.5)
        with ops.batch_invariant_mode():
            x, _, _ = self.decoder(self.embed(ids), positions, attention, keep.size < N, None, False)
        return x

    def decoder(self, x: np.ndarray, positions: np.ndarray, attention: PaddedAttention | RowAttention,
                prune: bool, hidden_state: Any, output_attentions: bool
                ) -> tuple[np.ndarray, Optional[list], Optional[list]]:
        """THE layer stack, for ``forward`` and ``forward_rows``.

        Args:
            x: float32 ``[N, H]`` input embeddings (the residual stream, updated in place).
            positions: int64 ``[N]`` rotary position of each row.
            attention: writes each layer's keys and values to the cache and attends over it.
            prune: run the last layer after its key/value projection on ``attention``'s kept rows only.
            hidden_state: ``x -> stored copy`` to collect every layer's output, or None.
            output_attentions: collect every layer's attention probabilities.
        Returns:
            ``(final normed states [n, H], hidden states or None, attentions or None)``.
        """
        config = self.config
        H, d, I = config.hidden_size, config.head_dim, config.intermediate_size
        n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
        eps, R = float(config.rms_norm_eps), config.rotary_dim
        N = x.shape[0]
        # Work buffers, allocated once and used by every layer: a fresh array of hundreds of MB
        # per layer would be fresh pages, and page faults, each time. Rows [:n] of each are used
        # (n = N, or the kept rows in a pruned last layer).
        n_chunks = -(-N // MLP_CHUNK_TOKENS)
        chunk = -(-N // n_chunks)  # balanced: no small last chunk on another matmul path
        h_buf = np.empty((N, H), dtype=np.float32)                      # normed input of a block
        qkv_buf = np.empty((N, (n_h + 2 * n_kv) * d), dtype=np.float32)
        q_buf = np.empty((N, n_h, d), dtype=np.float32)                 # q, k contiguous for rotary
        k_buf = np.empty((N, n_kv, d), dtype=np.float32)
        attn_buf = np.empty((N, n_h * d), dtype=np.float32)             # attention output per head
        a_buf = np.empty((N, H), dtype=np.float32)                      # attention block output
        m_buf = np.empty((N, H), dtype=np.float32)                      # MLP block output
        gate_up = np.empty((chunk, 2 * I), dtype=np.float32)            # per chunk of tokens
        ffn = np.empty((chunk, I), dtype=np.float32)

        all_hidden = [hidden_state(x)] if hidden_state else None
        all_attn = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            # Attention block: x = x + post_self_attn_layernorm(o_proj(attn(input_layernorm(x))))
            h = ops.rms_norm(x, layer.input_layernorm, eps, out=h_buf)
            qkv = sa.qkv_proj(h, out=qkv_buf)                 # [N, (n_h + 2 n_kv) d]
            np.copyto(q_buf.reshape(N, n_h * d), qkv[:, :n_h * d])
            np.copyto(k_buf.reshape(N, n_kv * d), qkv[:, n_h * d:(n_h + n_kv) * d])
            q, k = q_buf, k_buf                                # [N, n_h, d], [N, n_kv, d]
            v = qkv[:, (n_h + n_kv) * d:]                      # [N, n_kv * d], a strided view
            ops.rotary_(q, positions, self.inv_freq, R)        # first R dims, adjacent pairs
            ops.rotary_(k, positions, self.inv_freq, R)
            attention.write(i, k, v)
            if prune and i == len(self.layers) - 1:
                # Every key and value is cached; the rest of the layer runs for the kept rows.
                q, x = attention.keep_rows(q, x)
                if x.shape[0] == 0:  # no row kept: the cache is all this call was for
                    return x, all_hidden, all_attn
            n = x.shape[0]
            probs = attention.probs_buffer(n_h) if output_attentions else None
            attn = attn_buf[:n]                                # [n, n_h * d]
            attention.attend(i, q, attn, probs)
            a = sa.o_proj(attn, out=a_buf[:n])                 # [n, H]
            x += ops.rms_norm(a, layer.post_self_attn_layernorm, eps, out=a)

            # MLP block: x = x + post_mlp_layernorm(down(up * silu(gate)))
            h = ops.rms_norm(x, layer.post_attention_layernorm, eps, out=h_buf[:n])  # the pre-MLP norm
            m = m_buf[:n]
            for r0 in range(0, n, chunk):                      # rows r0 .. r0 + c
                c = min(n, r0 + chunk) - r0
                gu = layer.mlp.gate_up_proj(h[r0:r0 + c], out=gate_up[:c])             # [c, 2I]
                layer.mlp.down_proj(ops.silu_mul(gu, out=ffn[:c]), out=m[r0:r0 + c])  # [c, H]
            x += ops.rms_norm(m, layer.post_mlp_layernorm, eps, out=m)

            if hidden_state:
                all_hidden.append(hidden_state(x))
            if output_attentions:
                all_attn.append(probs)
        return ops.rms_norm(x, self.norm, eps), all_hidden, all_attn


def _check_token_ids(input_ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError unless ``input_ids`` are integers in ``[0, vocab_size)``."""
    if input_ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)].ravel()[0]
        raise ValueError(f"token id {int(bad)} is out of range for vocab_size {vocab_size}")


def _kept_rows(keep: np.ndarray, B: int, q: np.ndarray, x: np.ndarray,
               q_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The queries ``[B*T, n_h, d]``, residual rows ``[B*T, H]`` and cache rows ``[T]`` of the kept
    positions ``keep [K]``: ``[B*K, n_h, d]``, ``[B*K, H]``, ``[K]`` (as llama.cpp computes only a
    prompt's last position in its last layer)."""
    n_h, d = q.shape[1:]
    H = x.shape[1]
    q = np.ascontiguousarray(q.reshape(B, -1, n_h, d)[:, keep]).reshape(-1, n_h, d)
    x = np.ascontiguousarray(x.reshape(B, -1, H)[:, keep]).reshape(-1, H)
    return q, x, q_rows[keep]
