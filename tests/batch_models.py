"""Tiny GLM-4 checkpoints for the batch and Ray tests: built by transformers with every parameter
random (``hf_reference.randomise``), at the real vocab size so that the GLM test tokenizer's ids
(special tokens included) exist, and short texts to run through them."""
from __future__ import annotations

import numpy as np
import torch
from transformers import Glm4Config

from glm_tokenizer import build_glm_tokenizer
from hf_reference import HEAD_CLASSES, randomise

LABELS = {"seqcls": ["billing", "bug", "praise"], "tokcls": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]}
WORDS = ("the quick brown fox jumps over a lazy dog while we pay our invoice and report the crash "
         "thanks team great work refund broken login slow page").split()


def build_model(directory: str, head: str, seed: int = 0) -> str:
    """``head``: causal, seqcls or tokcls."""
    labels = LABELS.get(head)
    config = Glm4Config(vocab_size=151552, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                        max_position_embeddings=512, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                        **({"id2label": dict(enumerate(labels))} if labels else {}))
    torch.manual_seed(seed)
    model = HEAD_CLASSES[head](config).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    build_glm_tokenizer(directory)
    return directory


def texts(n: int, seed: int = 0, longest: int = 40) -> list[str]:
    """``n`` short texts of 0 to ``longest`` words (a few empty)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(0, longest + 1))) for _ in range(n)]
