"""Quantization with calibration text: q4k weights rounded by GPTQ (Frantar et al., 2022).

Rounding every weight to its nearest code (what quantize-on-load does) leaves each projection's
errors uncorrelated with its inputs. GPTQ instead rounds the input features of a matrix one at a
time and moves each rounding error onto the features not yet rounded, weighted by the inverse of
H = X^T X, the Gram matrix of the calibration activations that feed the matrix, so that the
error of the product ``X W^T`` is what gets small, not the error of ``W``. The q4k grid of each
block (its sub-scales and the row's D and M) is chosen first, from the float weights by the
format's least-squares fit weighted by diag(H) (llama.cpp's "imatrix" idea); GPTQ then chooses
the codes on those fixed grids.

What it costs: one float forward over the calibration text per pass, holding the H of as many
layers as ``memory_bytes`` allows (a pass per few layers for a 9B model), then a Cholesky
factorisation and the column sweep per matrix (N K^2 flops, done in blocks of 128 columns).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from . import ops
from .quant import BLOCK_SIZE, GROUP_ROWS, Q4K_SUPER, QuantLinear, format_id, pack_q4k, quantize_weight

GPTQ_BLOCK = 128  # columns rounded between two updates of the rest of the matrix


def unpack_q4k_grid(packed: np.ndarray, n: int, k: int) -> tuple[np.ndarray, ...]:
    """The grid of a packed q4k matrix: ``sc, mn [n, nb]`` (uint8) and ``d, m [n, ns]`` (float16)."""
    nb = -(-k // BLOCK_SIZE)
    ns, ng = -(-nb // Q4K_SUPER), -(-n // GROUP_ROWS)
    groups = packed.reshape(ng, nb * 288 + ns * 64)
    blocks = groups[:, :nb * 288].reshape(ng, nb, 288)
    sub = [blocks[:, :, off:off + 16].transpose(0, 2, 1).reshape(ng * GROUP_ROWS, nb)[:n] for off in (256, 272)]
    heads = groups[:, nb * 288:].reshape(ng, ns, 2, GROUP_ROWS * 2).copy().view(np.float16)  # [g, s, D|M, row]
    heads = heads.transpose(2, 0, 3, 1).reshape(2, ng * GROUP_ROWS, ns)[:, :n]
    return sub[0], sub[1], heads[0], heads[1]


def gptq_q4k(weight: np.ndarray, hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Quantize ``weight [n, k]`` (float32 or bf16 bits) to packed q4k with GPTQ's error feedback.

    Args:
        weight: the float matrix.
        hessian: ``[k, k]`` X^T X / tokens of the calibration inputs of this matrix.
        damp: added to H's diagonal, as a fraction of its mean (GPTQ's dampening).
    Returns:
        The packed bytes (``quant.packed_bytes("q4k", n, k)``).
    """
    w = ops.bf16_to_f32(weight) if weight.dtype == np.uint16 else np.array(weight, dtype=np.float32)
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ValueError(f"hessian must be a finite [{k}, {k}] matrix, got {h.shape}")
    diag = np.diag(h).copy()
    grid = quantize_weight(w, "q4k", np.maximum(diag, 0).astype(np.float32))
    sc, mn, d, m = unpack_q4k_grid(grid, n, k)
    scale = np.repeat((np.repeat(d.astype(np.float32), Q4K_SUPER, 1)[:, :sc.shape[1]] * sc), BLOCK_SIZE, 1)[:, :k]
    offset = np.repeat((np.repeat(m.astype(np.float32), Q4K_SUPER, 1)[:, :mn.shape[1]] * mn), BLOCK_SIZE, 1)[:, :k]
    dead = diag <= 0  # a feature the calibration never saw: its weights do not matter to it
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * max(float(np.mean(diag[~dead])) if (~dead).any() else 1.0, 1e-12)
    # U: the upper Cholesky factor of H^-1; row i holds how rounding feature i moves the later ones.
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    codes = np.empty((n, k), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for c0 in range(0, k, GPTQ_BLOCK):
            c1 = min(k, c0 + GPTQ_BLOCK)
            block = w[:, c0:c1].copy()
            errors = np.empty((n, c1 - c0), dtype=np.float32)
            for j in range(c1 - c0):
                c = c0 + j
                s, o = scale[:, c], offset[:, c]
                q = np.where(s > 0, np.clip(np.rint((block[:, j] + o) / s), 0, 15), 0)
                codes[:, c] = q
                err = (block[:, j] - (s * q - o)) / u[c, c]
                block[:, j + 1:] -= np.outer(err, u[c, c + 1:c1])
                errors[:, j] = err
            w[:, c1:] -= errors @ u[c0:c1, c1:]
    return pack_q4k(codes, sc, mn, d, m)


class _Recorder:
    """A projection that adds ``x^T x`` of its inputs to a running sum, then computes as before."""

    def __init__(self, layer, k: int) -> None:
        self.layer, self.gram, self.tokens = layer, np.zeros((k, k), dtype=np.float32), 0

    def __call__(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        self.gram += x.T @ x
        self.tokens += x.shape[0]
        return self.layer(x, out=out)


def _projections(model) -> list[tuple[object, str, str, int]]:
    """``(owner, attribute, label, in_features)`` of every projection GPTQ rounds, in forward order."""
    cfg = model.config
    H, I, qd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    out = []
    for i, layer in enumerate(model.model.layers):
        out += [(layer.self_attn, "qkv_proj", f"model.layers.{i}.self_attn.qkv_proj", H),
                (layer.self_attn, "o_proj", f"model.layers.{i}.self_attn.o_proj", qd),
                (layer.mlp, "gate_up_proj", f"model.layers.{i}.mlp.gate_up_proj", H),
                (layer.mlp, "down_proj", f"model.layers.{i}.mlp.down_proj", I)]
    out.append((model, "lm_head", "lm_head", H))
    return out


def _float_weight(layer) -> np.ndarray:
    """The ``[out, in]`` float matrix of a float projection (a stacked q, k, v as one)."""
    parts = getattr(layer, "parts", None)
    if parts is not None:
        return np.concatenate([_float_weight(p) for p in parts.values()])
    return layer.weight


def calibration_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[np.ndarray]:
    """``text`` as token ids cut into windows of ``window`` tokens, ``max_tokens`` in all."""
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("calibration text is empty (fewer than 2 tokens)")
    return [np.asarray(ids[i:i + window], dtype=np.int64)[None] for i in range(0, len(ids), window)]


def quantize_gptq(src: str | os.PathLike, text: str, *, max_tokens: int = 32768, window: int = 512,
                  damp: float = 0.01, memory_bytes: int = 4 << 30,
                  log: Callable[[str], None] = lambda s: None):
    """Load ``src`` and return it with every projection and the lm_head in q4k, rounded by GPTQ
    on the calibration ``text`` (the statistics come from the float model).

    Args:
        src: a float (bf16 / fp32) checkpoint directory or hub id.
        text: calibration text, ideally like what the model will read (at least a few thousand tokens).
        max_tokens: tokens of ``text`` used. window: tokens per forward (at most the model's context).
        damp: GPTQ's dampening of H. memory_bytes: bound on the H matrices held at once.
        log: progress messages.
    Returns:
        A ``Glm4ForCausalLM`` with q4k weights (save it with ``save_pretrained``).
    """
    from .heads import Glm4ForCausalLM
    from .tokenizer import Glm4Tokenizer

    source = Glm4ForCausalLM.from_pretrained(src)
    if getattr(source.config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is quantized already: calibrate from its float checkpoint")
    window = max(1, min(window, source.config.max_position_embeddings))
    windows = calibration_windows(Glm4Tokenizer.from_pretrained(source.checkpoint_dir), text, max_tokens, window)
    model = Glm4ForCausalLM.from_pretrained(src, quantization="q4k")  # the result: packed buffers to overwrite
    todo = _projections(source)
    targets = {label: (owner, attr) for owner, attr, label, _ in _projections(model)}
    log(f"calibration: {sum(w.shape[1] for w in windows)} tokens in {len(windows)} windows; "
        f"{len(todo)} matrices")
    while todo:
        batch, held = [], 0
        for item in todo:  # as many projections as the memory bound allows (at least one)
            held += 4 * item[3] ** 2
            if batch and held > memory_bytes:
                break
            batch.append(item)
        todo = todo[len(batch):]
        originals = {}
        for owner, attr, label, k in batch:
            originals[label] = getattr(owner, attr)
            setattr(owner, attr, _Recorder(originals[label], k))
        try:
            for ids in windows:
                source(ids)
        finally:
            recorders = {label: getattr(owner, attr) for owner, attr, label, _ in batch}
            for owner, attr, label, _ in batch:
                setattr(owner, attr, originals[label])
        for _, _, label, _ in batch:
            rec = recorders[label]
            packed = gptq_q4k(_float_weight(rec.layer), rec.gram / max(rec.tokens, 1), damp)
            owner, attr = targets[label]
            dst: QuantLinear = getattr(owner, attr)
            if dst.packed.shape != packed.shape or dst._fmt_id != format_id("q4k"):
                raise AssertionError(f"{label}: packed size {packed.shape} != {dst.packed.shape}")
            dst.packed = packed
            log(f"calibration: {label} done")
    return model
