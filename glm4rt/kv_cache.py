"""The KV cache: keys and values of every layer, allocated as one block and written in place.

Layout ``[n_layers, batch, n_kv_heads, capacity, head_dim]`` float32: each (layer, sequence, kv head)
is one contiguous run of positions, which is what the attention kernel reads. ``reserve`` grows the
capacity geometrically when a forward call needs more room (generation reserves the final length
up front, so the decode loop never reallocates).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Glm4Cache:
    """Keys/values for ``num_layers`` layers (transformers' ``DynamicCache`` role).

    Args:
        num_layers, num_kv_heads, head_dim: the model geometry (see ``for_config``).
        batch_size: number of sequences.
        max_cache_len: initial capacity in positions (grown on demand by ``reserve``).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int = 1,
                 max_cache_len: int = 0) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.batch_size = batch_size
        shape = (num_layers, batch_size, num_kv_heads, max_cache_len, head_dim)
        self.key_cache = np.zeros(shape, dtype=np.float32)    # [L, B, n_kv, capacity, d]
        self.value_cache = np.zeros(shape, dtype=np.float32)  # [L, B, n_kv, capacity, d]
        self.seq_len = 0

    @classmethod
    def for_config(cls, config, batch_size: int = 1, max_cache_len: int = 0) -> "Glm4Cache":
        """An empty cache for a model with ``config``."""
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   batch_size, max_cache_len)

    @property
    def capacity(self) -> int:
        """Positions allocated per sequence."""
        return self.key_cache.shape[3]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions."""
        return self.seq_len

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """``(key, value)`` of one layer as views ``[batch, n_kv_heads, seq_len, head_dim]``."""
        n = self.seq_len
        return self.key_cache[layer_idx, :, :, :n], self.value_cache[layer_idx, :, :, :n]

    def reserve(self, batch_size: int, total_len: int) -> None:
        """Make room for ``total_len`` positions, keeping the cached ones.

        Raises:
            ValueError: ``batch_size`` differs from the cache's.
        """
        if batch_size != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences but the input has {batch_size}")
        if total_len <= self.capacity:
            return
        new_cap = max(total_len, 2 * self.capacity)
        for attr in ("key_cache", "value_cache"):
            old = getattr(self, attr)
            grown = np.zeros(old.shape[:3] + (new_cap, self.head_dim), dtype=np.float32)
            grown[:, :, :, :self.seq_len] = old[:, :, :, :self.seq_len]
            setattr(self, attr, grown)

    def write(self, layer_idx: int, key: np.ndarray, value: np.ndarray, start: int) -> None:
        """Store new positions ``start .. start + n_tokens`` of one layer.

        Args:
            key, value: ``[batch, n_tokens, n_kv_heads, head_dim]`` (the projection layout).
        """
        end = start + key.shape[1]
        self.key_cache[layer_idx, :, :, start:end] = key.transpose(0, 2, 1, 3)
        self.value_cache[layer_idx, :, :, start:end] = value.transpose(0, 2, 1, 3)

    def crop(self, max_length: int) -> None:
        """Forget every position from ``max_length`` on."""
        self.seq_len = min(self.seq_len, max(0, int(max_length)))

    def to_legacy_cache(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Copies in transformers' legacy format: per layer ``(key, value)``, each
        ``[batch, n_kv_heads, seq_len, head_dim]``."""
        return tuple((k.copy(), v.copy()) for k, v in (self[i] for i in range(self.num_layers)))

    @classmethod
    def from_legacy_cache(cls, past: Sequence[tuple[np.ndarray, np.ndarray]], config) -> "Glm4Cache":
        """Build a cache from the legacy per-layer ``(key, value)`` tuples.

        Raises:
            ValueError: wrong number of layers or a shape that does not fit ``config``.
        """
        if len(past) != config.num_hidden_layers:
            raise ValueError(f"past_key_values has {len(past)} layers, the model has {config.num_hidden_layers}")
        first = np.asarray(past[0][0])
        if first.ndim != 4:
            raise ValueError(f"past_key_values[0][0] must be [batch, n_kv_heads, seq_len, head_dim], got {first.shape}")
        batch, _, seq, _ = first.shape
        expected = (batch, config.num_key_value_heads, seq, config.head_dim)
        cache = cls.for_config(config, batch, seq)
        for i, (k, v) in enumerate(past):
            k, v = np.asarray(k, dtype=np.float32), np.asarray(v, dtype=np.float32)
            if k.shape != expected or v.shape != expected:
                raise ValueError(
                    f"past_key_values[{i}] has shapes {k.shape} / {v.shape}, expected {expected}")
            cache.key_cache[i] = k
            cache.value_cache[i] = v
        cache.seq_len = seq
        return cache
