"""GLM-4-style tokenizer files built from parts: a byte-level BPE (vocabulary and merges) behind
GLM-4's split regex, GLM-4's special tokens at given ids, the ``[gMASK]<sop>`` prefix that GLM-4's
tokenizer.json adds to encoded text (a TemplateProcessing post-processor), and a
tokenizer_config.json. Used to read the tokenizer of a GGUF file (``glm4rt.gguf_io``), and by the
demo model's training script and the tests to write theirs."""
from __future__ import annotations

import json
from typing import Any, Optional

from .tokenizer import GLM4_SPLIT_REGEX

# GLM-4's special tokens in its order (ids 151329 .. 151342 in GLM-4's own vocabulary).
GLM4_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                       "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                       "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")
PREFIX_TOKENS = ("[gMASK]", "<sop>")  # what GLM-4's tokenizer puts before encoded text


def glm4_bpe(vocab: Optional[dict[str, int]] = None, merges: Optional[list[tuple[str, str]]] = None):
    """A ``tokenizers.Tokenizer``: byte-level BPE (empty, to be trained, without ``vocab``) behind
    GLM-4's split regex, with the byte-level decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE() if vocab is None else models.BPE(vocab=vocab, merges=merges or []))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok


def glm4_tokenizer_spec(tok, special_ids: dict[str, int]) -> dict[str, Any]:
    """tokenizer.json of ``tok`` (a BPE from ``glm4_bpe``) with the special tokens at
    ``special_ids`` (entries of the model vocabulary too, so that every loader keeps their ids)
    and the ``[gMASK]<sop>`` prefix where both tokens are among them."""
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"].update(special_ids)
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in sorted(special_ids.items(), key=lambda x: x[1])]
    if all(t in special_ids for t in PREFIX_TOKENS):
        prefix = [{"SpecialToken": {"id": t, "type_id": 0}} for t in PREFIX_TOKENS]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": prefix + [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": prefix + [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [special_ids[t]], "tokens": [t]} for t in PREFIX_TOKENS},
        }
    return spec


def glm4_tokenizer_config(special_ids: dict[str, int], chat_template: Optional[str],
                          model_max_length: int, eos_token: str = "<|endoftext|>",
                          pad_token: Optional[str] = "<|endoftext|>") -> dict[str, Any]:
    """tokenizer_config.json of a GLM-4-style tokenizer (as GLM-4-0414's, with these values)."""
    config: dict[str, Any] = {
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for t, i in sorted(special_ids.items(), key=lambda x: x[1])},
        "additional_special_tokens": [t for t, _ in sorted(special_ids.items(), key=lambda x: x[1])],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": eos_token,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
        "pad_token": pad_token,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
