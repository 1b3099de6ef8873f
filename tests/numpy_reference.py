"""An independent float64 NumPy forward of GLM-4, written from the architecture notes (not from
glm4rt's code): a third opinion next to transformers and glm4rt. Slow and simple on purpose."""
from __future__ import annotations

import numpy as np

from glm4rt.weights import Checkpoint
from helpers import round_bf16


def load_float64(directory: str) -> dict[str, np.ndarray]:
    ckpt = Checkpoint(directory)
    return {name: ckpt.load(name, "float32").astype(np.float64) for name in ckpt.names()}


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotary_interleaved(x, pos, rot_dim, theta):
    """x [T, heads, d]; rotate pairs (2i, 2i+1) of the first rot_dim dims by pos * theta^(-2i/R)."""
    inv_freq = 1.0 / theta ** (np.arange(0, rot_dim, 2) / rot_dim)
    ang = pos[:, None] * inv_freq[None]  # [T, R/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    y = x.copy()
    x0, x1 = x[..., 0:rot_dim:2], x[..., 1:rot_dim:2]
    y[..., 0:rot_dim:2] = x0 * cos - x1 * sin
    y[..., 1:rot_dim:2] = x1 * cos + x0 * sin
    return y


def forward_logits(w: dict[str, np.ndarray], cfg, ids: np.ndarray, pos: np.ndarray | None = None,
                   bf16_inputs: bool = False) -> np.ndarray:
    """Logits [T, vocab] of one unpadded sequence ``ids [T]`` (positions ``pos``, default 0..T-1).
    ``bf16_inputs``: every matrix product takes its activations rounded to bf16 (the semantics of
    bf16 weights; the weights of a bf16 checkpoint are bf16 values already)."""
    mm_in = round_bf16 if bf16_inputs else (lambda a: a)
    T = len(ids)
    pos = np.arange(T, dtype=np.float64) if pos is None else np.asarray(pos, dtype=np.float64)
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    eps, R, I = cfg.rms_norm_eps, int(cfg.head_dim * cfg.partial_rotary_factor), cfg.intermediate_size
    x = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def proj(name, h, p=p):
            y = mm_in(h) @ w[p + name + ".weight"].T
            return y + w[p + name + ".bias"] if (p + name + ".bias") in w else y

        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rotary_interleaved(proj("self_attn.q_proj", h).reshape(T, nh, d), pos, R, cfg.rope_theta)
        k = rotary_interleaved(proj("self_attn.k_proj", h).reshape(T, nkv, d), pos, R, cfg.rope_theta)
        v = proj("self_attn.v_proj", h).reshape(T, nkv, d)
        heads = []
        for j in range(nh):
            g = j // (nh // nkv)
            s = q[:, j] @ k[:, g].T / np.sqrt(d) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, g])
        a = mm_in(np.concatenate(heads, axis=-1)) @ w[p + "self_attn.o_proj.weight"].T
        x = x + rms_norm(a, w[p + "post_self_attn_layernorm.weight"], eps)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gu = mm_in(h) @ w[p + "mlp.gate_up_proj.weight"].T
        gate, up = gu[:, :I], gu[:, I:]
        m = mm_in(up * gate / (1 + np.exp(-gate))) @ w[p + "mlp.down_proj.weight"].T
        x = x + rms_norm(m, w[p + "post_mlp_layernorm.weight"], eps)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return mm_in(x) @ head.T
