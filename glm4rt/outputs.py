"""Output dataclasses with transformers' field names (NumPy arrays instead of tensors).

Like transformers' ``ModelOutput``: fields that are ``None`` are skipped by ``to_tuple()`` and by
integer indexing, and ``out["logits"]`` works as well as ``out.logits``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np


class ModelOutput:
    """Mixin giving dataclass outputs tuple-like and dict-like access."""

    def to_tuple(self) -> tuple:
        """The non-``None`` fields, in declaration order."""
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        """Names of the non-``None`` fields."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    @property
    def cache(self):
        """transformers 5.x name of ``past_key_values``."""
        return getattr(self, "past_key_values", None)


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    """``last_hidden_state [batch, seq, hidden]``; ``hidden_states``: num_layers + 1 arrays (the
    embeddings, each layer's output, the last one after the final norm); ``attentions``: per layer
    ``[batch, n_heads, seq, past + seq]``."""
    last_hidden_state: Optional[np.ndarray] = None
    past_key_values: Any = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    """``logits [batch, kept positions, vocab]`` and the mean next-token loss when labels are given."""
    loss: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None
    past_key_values: Any = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    """``logits [batch, num_labels]``, pooled at each row's last non-pad token."""
    loss: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None
    past_key_values: Any = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    """``logits [batch, seq, num_labels]``."""
    loss: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
