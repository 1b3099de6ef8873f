"""``Glm4Config``: the model's hyper-parameters, read from and written to ``config.json``.

Mirrors transformers' ``Glm4Config`` (same fields and defaults). Two ``config.json`` dialects exist:
the official checkpoints (transformers 4.51 era: top-level ``rope_theta``, ``partial_rotary_factor``,
``torch_dtype``) and files written by transformers 5.x (nested ``rope_parameters``, ``dtype``); both
load to the same config. Settings glm4rt does not implement raise ``ConfigError`` rather than being
silently ignored, and so does every field of the wrong type or out of range, before anything is
built from it: the error names the field (and, from ``from_pretrained``, the file).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

from .errors import ConfigError
from .jsonfile import read_json
from .quant import BLOCK_SIZE, GROUP_ROWS, QUANT_FORMATS
from .checks import is_int

CONFIG_NAME = "config.json"

# Field -> default, as in transformers' Glm4Config.
CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "partial_rotary_factor": 0.5,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1.5625e-07,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "bos_token_id": None,
    "attention_bias": True,
    # heads (transformers' PretrainedConfig fields)
    "problem_type": None,
    # bookkeeping carried through config.json
    "dtype": None,
    "architectures": None,
}
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
_SUPPORTED_ACTS = ("silu", "swish")
MAX_HEAD_DIM = 256  # csrc/kernels.h kMaxHeadDim
MAX_DIM = 2**31 - 1  # the kernels take sizes and row counts as 32-bit ints (csrc/bindings.cpp)
MAX_LABELS = 2**20  # id2label is built as a dict of num_labels entries when the config is made
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
_BOOLS = ("use_cache", "tie_word_embeddings", "attention_bias")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_F32_MAX = float(np.finfo(np.float32).max)  # rope_theta is used in float32, as transformers does


class Glm4Config:
    """Configuration of a GLM-4 (``Glm4ForCausalLM``) model.

    Args:
        **kwargs: any field of transformers' ``Glm4Config`` (see ``CONFIG_DEFAULTS`` for the defaults),
            ``rope_parameters`` (5.x dialect) or ``rope_scaling`` (only ``None``/default rope is
            supported), ``num_labels`` / ``id2label`` / ``label2id`` / ``problem_type`` for the
            classification heads, ``dtype`` or ``torch_dtype``. Unknown keys are kept as attributes
            and written back by ``to_dict``.
    Raises:
        ConfigError: a setting glm4rt does not implement, an inconsistent geometry, or a field of the
            wrong type or out of range (each message names the field).
    """

    model_type = "glm4"

    def __init__(self, **kwargs: Any) -> None:
        kwargs = dict(kwargs)
        rope = _check_rope("rope_parameters", kwargs.pop("rope_parameters", None))
        _check_rope("rope_scaling", kwargs.pop("rope_scaling", None))
        for key, value in CONFIG_DEFAULTS.items():
            setattr(self, key, copy.deepcopy(value))
        if "torch_dtype" in kwargs:
            torch_dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", torch_dtype)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            if hasattr(type(self), key):  # a method or property: the field would replace it
                raise ConfigError(f"{key} is not a config field (it is a Glm4Config attribute)")
            setattr(self, key, value)
        # Rope: the nested 5.x form wins over the top-level official form when both are given.
        if "rope_theta" in rope:
            self.rope_theta = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            self.partial_rotary_factor = rope["partial_rotary_factor"]
        self._validate()
        # Labels, as transformers' PretrainedConfig: id2label decides num_labels when given.
        id2label, label2id = _check_labels(num_labels, id2label, label2id)
        if id2label is not None:
            self.id2label = id2label
        else:
            n = 2 if num_labels is None else num_labels
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        if num_labels is not None and id2label is not None and len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        self.label2id = label2id if label2id is not None else {v: k for k, v in self.id2label.items()}

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        """Number of classification labels (``len(id2label)``)."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        _check_labels(n, None, None)
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """The 5.x nested rope settings."""
        return {"rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor,
                "rope_type": "default"}

    def _validate(self) -> None:
        """Type and range of every known field; sizes first, since the others are checked
        against them."""
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), 1, MAX_DIM)
        if self.head_dim is None:  # transformers' fallback for configs without head_dim
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int("head_dim", self.head_dim, 1, MAX_DIM)
        if self.head_dim > MAX_HEAD_DIM:
            raise ConfigError(f"head_dim={self.head_dim} is larger than {MAX_HEAD_DIM}, the most glm4rt's "
                              "attention kernels take (GLM-4 models use 128)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim > MAX_DIM:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} and num_key_value_heads="
                              f"{self.num_key_value_heads} of head_dim {self.head_dim}: more q/k/v rows "
                              f"than the kernels take ({MAX_DIM})")
        if 2 * self.intermediate_size > MAX_DIM:
            raise ConfigError(f"intermediate_size={self.intermediate_size}: gate_up_proj would have more "
                              f"rows than the kernels take ({MAX_DIM})")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(f"hidden_act={self.hidden_act!r:.80} is not supported (GLM-4 uses 'silu')")
        _check_real("partial_rotary_factor", self.partial_rotary_factor, 0.0, 1.0, low_open=True)
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even and positive "
                "(rotary rotates pairs of dims)")
        # Below 1 the rotary frequencies grow past 1 per position (at 1e-300 they are infinite).
        _check_real("rope_theta", self.rope_theta, 1.0, _F32_MAX)
        # Above 1 the norm would flatten every hidden state of ordinary size (at 1e308: to zero).
        _check_real("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        _check_real("initializer_range", self.initializer_range, 0.0, _F32_MAX)
        _check_real("attention_dropout", self.attention_dropout, 0.0, 1.0)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r:.80}")
        for name in _TOKEN_IDS:
            _check_token_ids(name, getattr(self, name))
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"problem_type must be one of {_PROBLEM_TYPES}, got {self.problem_type!r:.80}")
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise ConfigError(f"dtype (torch_dtype) must be a string such as 'bfloat16', got {self.dtype!r:.80}")
        if self.architectures is not None and not (
                isinstance(self.architectures, list) and all(isinstance(a, str) for a in self.architectures)):
            raise ConfigError(f"architectures must be a list of strings, got {self.architectures!r:.80}")
        _check_quantization_config(getattr(self, "quantization_config", None))

    # ---- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> "Glm4Config":
        """Build a config from a ``config.json`` dict, then apply keyword overrides."""
        data = dict(config_dict)
        model_type = data.get("model_type")
        if model_type not in (None, "glm4"):
            raise ConfigError(
                f"model_type {model_type!r} is not a GLM-4 (Glm4ForCausalLM) checkpoint; glm4rt runs "
                "model_type 'glm4' (GLM-4-0414 / GLM-Z1 family)")
        if "rope_parameters" in overrides or "rope_theta" in overrides or "partial_rotary_factor" in overrides:
            rope = dict(_check_rope("rope_parameters", data.pop("rope_parameters", None)))
            rope.update(_check_rope("rope_parameters", overrides.pop("rope_parameters", None)))
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in overrides:
                    rope[key] = overrides.pop(key)
            data["rope_parameters"] = rope
        if "num_labels" in overrides and "id2label" not in overrides:
            data.pop("id2label", None)
            data.pop("label2id", None)
        data.update(overrides)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "Glm4Config":
        """Read ``config.json`` from a checkpoint directory or a Hugging Face hub id.

        Args:
            pretrained_model_name_or_path: a directory (or a ``config.json`` path) or a hub id.
            **kwargs: hub options (``revision``, ``cache_dir``, ``local_files_only``, ``token``)
                and config fields that override the file (``num_labels=3`` ...).
        Returns:
            The config.
        Raises:
            FileNotFoundError: no such directory / no config.json.
            ConfigError: the file is not valid JSON or holds unsupported settings.
        """
        from .hub import pop_hub_kwargs, resolve_model_dir

        hub_kwargs = pop_hub_kwargs(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        else:
            config_file = os.path.join(resolve_model_dir(path, **hub_kwargs), CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.path.dirname(config_file)!r}")
        data = read_json(config_file)
        try:
            return cls.from_dict(data, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers 5.x writes it (``rope_parameters``, ``dtype``)."""
        out: dict[str, Any] = {"model_type": self.model_type}
        for key, value in vars(self).items():
            if key in ("rope_theta", "partial_rotary_factor", "id2label", "label2id") or key.startswith("_"):
                continue
            out[key] = copy.deepcopy(value)
        out["rope_parameters"] = self.rope_parameters
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        return out

    def to_json_string(self) -> str:
        """``to_dict()`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``config.json`` into ``save_directory`` (created if needed). Returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Glm4Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Glm4Config {self.to_json_string()}"


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not is_int(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r:.80}")


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    """A JSON number (not a bool, string or NaN) in [low, high], or (low, high]."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r:.80}")


def _check_token_ids(name: str, value: Any) -> None:
    """null or one token id; eos_token_id may also be a list of them (generation stops on any).
    Not bounded by vocab_size: the defaults are GLM-4's ids, which a small config made with
    ``Glm4Config(vocab_size=...)`` keeps (as transformers')."""
    many = name == "eos_token_id"
    ids = value if many and isinstance(value, list) else [] if value is None else [value]
    if not all(is_int(i) and 0 <= i <= MAX_DIM for i in ids):
        what = "a token id or a list of token ids" if many else "a token id"
        raise ConfigError(f"{name} must be null or {what} (integers in [0, {MAX_DIM}]), got {value!r:.80}")


def _check_rope(name: str, value: Any) -> dict[str, Any]:
    """``rope_parameters`` / ``rope_scaling``: null or an object asking for default rope."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be an object or null, got {value!r:.80}")
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(
            f"{name}: rope type {rope_type!r:.80} is not supported by glm4rt (only default rope, as in "
            "the published GLM-4 checkpoints)")
    return value


def _check_labels(num_labels: Any, id2label: Any, label2id: Any
                  ) -> tuple[Optional[dict[int, str]], Optional[dict[str, int]]]:
    """num_labels, id2label and label2id checked; the label maps with integer ids."""
    if num_labels is not None:
        _check_int("num_labels", num_labels, 1, MAX_LABELS)
    if id2label is not None:
        if not isinstance(id2label, dict) or not 1 <= len(id2label) <= MAX_LABELS:
            raise ConfigError(f"id2label must be an object of 1 to {MAX_LABELS} labels, got {id2label!r:.80}")
        ids = {k: int(k) if isinstance(k, str) and re.fullmatch(r"\d{1,9}", k) else k for k in id2label}
        if not all(is_int(i) and i >= 0 for i in ids.values()) or not all(
                isinstance(v, str) for v in id2label.values()):
            raise ConfigError(f"id2label must map label ids (integers >= 0) to names, got {id2label!r:.80}")
        id2label = {ids[k]: v for k, v in id2label.items()}
    if label2id is not None:
        if not isinstance(label2id, dict) or len(label2id) > MAX_LABELS or not all(
                is_int(i) and i >= 0 for i in label2id.values()):
            raise ConfigError(f"label2id must map label names to ids (integers >= 0), got {label2id!r:.80}")
    return id2label, label2id


def _check_quantization_config(value: Any) -> None:
    """A checkpoint saved quantized by glm4rt: its format, block size and row grouping."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"quantization_config must be an object, got {value!r:.80}")
    method = value.get("quant_method")
    if method != "glm4rt":
        raise ConfigError(f"quantization_config.quant_method {method!r:.80} is not supported: glm4rt "
                          "reads checkpoints it quantized itself ('glm4rt')")
    fmt = value.get("format")
    if not isinstance(fmt, str) or fmt not in QUANT_FORMATS:
        raise ConfigError(f"quantization_config.format {fmt!r:.80} is not one of {sorted(QUANT_FORMATS)}")
    for key, expected in (("block_size", BLOCK_SIZE), ("group_rows", GROUP_ROWS)):
        if key in value and (not is_int(value[key]) or value[key] != expected):
            raise ConfigError(f"quantization_config.{key} must be {expected} (the layout glm4rt writes), "
                              f"got {value[key]!r:.80}")
