"""A tiny chat-capable checkpoint for generation/chat/CLI tests: a random GLM-4 at the real vocab
size (151552, so the GLM special tokens exist) next to the GLM-style test tokenizer. Its lm_head
rows are zero for every id the tokenizer does not know and for the special tokens, so greedy
decoding always picks a real text token and never stops early (replies run to max_new_tokens)."""
from __future__ import annotations

import json
import os

import numpy as np

import glm4rt
from glm_tokenizer import build_glm_tokenizer


def build_chat_checkpoint(directory: str, template: str = "glm4", seed: int = 0) -> str:
    config = glm4rt.Glm4Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=4096, rms_norm_eps=1e-5)
    model = glm4rt.Glm4ForCausalLM(config, seed=seed)
    build_glm_tokenizer(directory, template=template)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(directory)
    text_ids = np.array(sorted(i for i in tok.get_vocab().values() if i < 151329))
    rng = np.random.default_rng(seed)
    lm_head = np.zeros((config.vocab_size, config.hidden_size), dtype=np.float32)
    lm_head[text_ids] = rng.standard_normal((len(text_ids), config.hidden_size))
    model.lm_head.weight = lm_head
    model.model.embed_tokens[:] = rng.standard_normal(model.model.embed_tokens.shape).astype(np.float32)
    model.save_pretrained(directory)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
                   "do_sample": False}, f)
    return directory
