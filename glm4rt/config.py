"""``Glm4Config``: the model's hyper-parameters, read from and written to ``config.json``.

Mirrors transformers' ``Glm4Config`` (same fields and defaults). Two ``config.json`` dialects exist:
the official checkpoints (transformers 4.51 era: top-level ``rope_theta``, ``partial_rotary_factor``,
``torch_dtype``) and files written by transformers 5.x (nested ``rope_parameters``, ``dtype``); both
load to the same config. Settings glm4rt does not implement raise ``ConfigError`` rather than being
silently ignored.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

from .errors import ConfigError

CONFIG_NAME = "config.json"

# Field -> default, as in transformers' Glm4Config.
_DEFAULTS: dict[str, Any] = {
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


class Glm4Config:
    """Configuration of a GLM-4 (``Glm4ForCausalLM``) model.

    Args:
        **kwargs: any field of transformers' ``Glm4Config`` (see ``_DEFAULTS`` for the defaults),
            ``rope_parameters`` (5.x dialect) or ``rope_scaling`` (only ``None``/default rope is
            supported), ``num_labels`` / ``id2label`` / ``label2id`` / ``problem_type`` for the
            classification heads, ``dtype`` or ``torch_dtype``. Unknown keys are kept as attributes
            and written back by ``to_dict``.
    Raises:
        ConfigError: a setting glm4rt does not implement or an inconsistent geometry.
    """

    model_type = "glm4"

    def __init__(self, **kwargs: Any) -> None:
        kwargs = dict(kwargs)
        rope = kwargs.pop("rope_parameters", None) or {}
        rope_scaling = kwargs.pop("rope_scaling", None)
        for key, value in _DEFAULTS.items():
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
            setattr(self, key, value)
        # Rope: the nested 5.x form wins over the top-level official form when both are given.
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be a dict, got {type(rope).__name__}")
        for scaling in (rope_scaling, rope):
            rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if rope_type not in ("default", None):
                raise ConfigError(
                    f"rope type {rope_type!r} is not supported by glm4rt (only default rope, as in "
                    "the published GLM-4 checkpoints)")
        if "rope_theta" in rope:
            self.rope_theta = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            self.partial_rotary_factor = rope["partial_rotary_factor"]
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # Labels, as transformers' PretrainedConfig: id2label decides num_labels when given.
        if id2label is not None:
            self.id2label = {int(k): v for k, v in dict(id2label).items()}
        else:
            n = 2 if num_labels is None else int(num_labels)
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        if num_labels is not None and id2label is not None and len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(int(num_labels))}
        self.label2id = ({k: int(v) for k, v in dict(label2id).items()} if label2id is not None
                         else {v: k for k, v in self.id2label.items()})
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        """Number of classification labels (``len(id2label)``)."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        self.id2label = {i: f"LABEL_{i}" for i in range(int(n))}
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim > MAX_HEAD_DIM:
            raise ConfigError(f"head_dim={self.head_dim} is larger than {MAX_HEAD_DIM}, the most glm4rt's "
                              "attention kernels take (GLM-4 models use 128)")
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (GLM-4 uses 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 < float(self.partial_rotary_factor) <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(
                f"int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even "
                "(rotary rotates pairs of dims)")
        if float(self.rope_theta) <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if float(self.rms_norm_eps) < 0:
            raise ConfigError(f"rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"problem_type must be one of {_PROBLEM_TYPES}, got {self.problem_type!r}")

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
            rope = dict(data.pop("rope_parameters", None) or {})
            rope.update(overrides.pop("rope_parameters", None) or {})
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
        from .hub import HUB_KWARGS, resolve_model_dir

        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        else:
            config_file = os.path.join(resolve_model_dir(path, **hub_kwargs), CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.path.dirname(config_file)!r}")
        try:
            with open(config_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file} must hold a JSON object")
        return cls.from_dict(data, **kwargs)

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
