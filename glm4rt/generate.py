"""Token generation: greedy or sampled decoding over a KV cache allocated once, with the stopping
rules of transformers' ``generate`` (every eos id, max_length / max_new_tokens, stop strings).

``generate_tokens`` is the one decode loop: it yields each step's new tokens, and both
``generate`` (ids, like transformers) and ``stream_text`` (text pieces) are built on it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .jsonfile import read_json
from .kv_cache import Glm4Cache
from .sampling import GENERATION_DEFAULTS, SamplingParams, process_logits, select_next
from .checks import is_int, is_real

GENERATION_CONFIG_NAME = "generation_config.json"

# What generate() / stream_text() accept as generation arguments.
_CALL_KWARGS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                "repetition_penalty", "eos_token_id", "pad_token_id", "stop_strings", "seed"}


def load_generation_config(directory: Optional[str]) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` as a dict ({} when absent).

    Raises:
        ConfigError: the file exists but is not a JSON object.
    """
    if directory is None:
        return {}
    path = os.path.join(directory, GENERATION_CONFIG_NAME)
    return read_json(path) if os.path.isfile(path) else {}


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int, for a count such as ``max_new_tokens``: a whole number (an integral float
    too, as JSON configs may write one) that is at least ``minimum``.

    Raises:
        TypeError: not a number (a string is not parsed, a bool is not a count).
        ValueError: a fraction, or less than ``minimum``.
    """
    if not is_real(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _check_token_id(name: str, value: Any) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be a token id (an integer), got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _check_stop_strings(value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"stop_strings must be a string or a list of strings, got {value!r}")
    if not all(values):
        raise ValueError(f"stop_strings must not be empty strings (every text ends with one), got {value!r}")
    return list(values)


@dataclass
class GenerationSettings:
    """Everything that decides what ``generate`` produces, after merging call arguments, the
    checkpoint's generation config and transformers' defaults."""
    max_length: int
    sampling: SamplingParams
    eos_token_ids: list[int]
    pad_token_id: Optional[int]
    stop_strings: list[str] = field(default_factory=list)
    seed: Optional[int] = None


def resolve_settings(model, prompt_len: int, overrides: dict[str, Any]) -> GenerationSettings:
    """Merge ``overrides`` (call arguments that are not None) over ``model.generation_config``
    over transformers' defaults.

    Raises:
        TypeError: an unknown argument, or a value of the wrong type (``max_new_tokens="3"``).
        ValueError: a value out of range (``max_new_tokens=2.5``, ``top_p=2``).
    """
    unknown = sorted(set(overrides) - _CALL_KWARGS)
    if unknown:
        raise TypeError(f"unexpected generation arguments {unknown}")
    gen = dict(model.generation_config)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "max_length" in given and "max_new_tokens" not in given:
        gen.pop("max_new_tokens", None)  # an explicit total length beats the config's new tokens
    merged = {**GENERATION_DEFAULTS, **{k: v for k, v in gen.items() if v is not None}, **given}
    if merged.get("max_new_tokens") is not None:
        max_length = prompt_len + check_count("max_new_tokens", merged["max_new_tokens"])
    else:
        max_length = check_count("max_length", merged["max_length"])
    eos = merged.get("eos_token_id", model.config.eos_token_id)
    if isinstance(eos, np.ndarray):
        eos = eos.tolist()
    eos_ids = [] if eos is None else [_check_token_id("eos_token_id", e)
                                      for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = merged.get("pad_token_id", model.config.pad_token_id)
    if pad is None and eos_ids:
        pad = eos_ids[0]  # as transformers does
    seed = merged.get("seed")
    sampling = SamplingParams.from_generation_config(merged)
    return GenerationSettings(max_length=max_length, sampling=sampling, eos_token_ids=eos_ids,
                              pad_token_id=None if pad is None else _check_token_id("pad_token_id", pad),
                              stop_strings=_check_stop_strings(merged.get("stop_strings") or []),
                              seed=None if seed is None else check_count("seed", seed))


def _as_array(name: str, value: Any, dtype=None) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:  # ragged lists, strings that are no numbers
        raise ValueError(f"{name} must be a [batch, seq] array, got {type(value).__name__}: {e}") from None


def _check_prompt(model, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = _as_array("input_ids", input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a non-empty [batch, seq] integer array, got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:  # also when nothing is generated
        raise ValueError(f"input_ids must be token ids in [0, {model.config.vocab_size}) (vocab_size), got "
                         f"{int(ids.min())} .. {int(ids.max())}")
    mask = np.ones(ids.shape, dtype=np.int64) if attention_mask is None else \
        _as_array("attention_mask", attention_mask, np.int64)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must have the shape of input_ids {ids.shape}")
    return ids.astype(np.int64), mask


def generate_tokens(model, input_ids: Any, attention_mask: Any = None, *,
                    settings: GenerationSettings, cache: Optional[Glm4Cache] = None,
                    tokenizer=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The decode loop. Yields ``(next_tokens [batch], finished [batch] bool)`` after each step.

    Args:
        model: a ``Glm4ForCausalLM``.
        input_ids, attention_mask: the prompt ``[batch, seq]`` (left padding for batches).
        settings: from ``resolve_settings``.
        cache: a cache already holding a prefix of ``input_ids`` (its ``seq_len`` tokens) for
            reuse across chat turns; only the rest is prefilled. Default: a fresh cache.
        tokenizer: needed for ``stop_strings``.
    Raises:
        ValueError: the prompt plus the new tokens do not fit in ``max_position_embeddings``.
    """
    config = model.config
    ids, mask = _check_prompt(model, input_ids, attention_mask)
    B, T0 = ids.shape
    total = max(settings.max_length, T0)
    if T0 >= config.max_position_embeddings or total > config.max_position_embeddings:
        raise ValueError(
            f"the prompt ({T0} tokens) plus the new tokens ({total - T0}) exceed the model's context of "
            f"{config.max_position_embeddings} positions (max_position_embeddings)")
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=...)")
    if total == T0:
        return
    if cache is None:
        cache = Glm4Cache.for_config(config, B, total)
    cache.reserve(B, total)  # allocated once for the whole generation
    reused = cache.get_seq_length()
    if reused >= T0 or B != cache.batch_size:
        raise ValueError(f"the cache holds {reused} tokens, the prompt only {T0}: nothing to prefill")

    all_ids = np.full((B, total), settings.pad_token_id or 0, dtype=np.int64)  # [B, total]
    all_ids[:, :T0] = ids
    all_mask = np.ones((B, total), dtype=np.int64)                            # [B, total]
    all_mask[:, :T0] = mask
    # transformers' generate positions: cumsum of the mask - 1, pads at 0.
    positions = np.where(all_mask == 0, 0, np.cumsum(all_mask, axis=1) - 1)   # [B, total]
    rng = np.random.default_rng(settings.seed)
    eos = np.array(settings.eos_token_ids, dtype=np.int64)
    finished = np.zeros(B, dtype=bool)
    texts = [""] * B

    start = reused
    for t in range(T0, total):
        out = model(all_ids[:, start:t], attention_mask=all_mask[:, :t], position_ids=positions[:, start:t],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        scores = process_logits(out.logits[:, -1], all_ids[:, :t], settings.sampling,  # [B, V]
                                attention_mask=all_mask[:, :t])
        next_tokens = select_next(scores, settings.sampling, rng)                     # [B]
        if settings.pad_token_id is not None and eos.size:
            next_tokens = np.where(finished, settings.pad_token_id, next_tokens)
        all_ids[:, t] = next_tokens
        now_done = np.isin(next_tokens, eos) if eos.size else np.zeros(B, dtype=bool)
        if settings.stop_strings:
            for b in range(B):
                if not finished[b]:
                    texts[b] += _token_text(tokenizer, int(next_tokens[b]))
                    texts[b] = texts[b][-max(len(s) for s in settings.stop_strings) * 4:]
                    now_done[b] |= any(texts[b].endswith(s) for s in settings.stop_strings)
        finished |= now_done
        yield next_tokens, finished.copy()
        if finished.all():
            return
        start = t


def _token_text(tokenizer, token_id: int) -> str:
    """The text of one generated id; "" for an id the tokenizer lacks (a model's embedding can have
    more rows than its tokenizer has tokens), which Glm4Tokenizer.decode refuses."""
    try:
        return tokenizer.decode([token_id])
    except ValueError:
        return ""


def generate(model, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: Optional[int] = None,
             max_length: Optional[int] = None, do_sample: Optional[bool] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None,
             eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None,
             stop_strings: Optional[str | Sequence[str]] = None, tokenizer=None, seed: Optional[int] = None,
             streamer=None, past_key_values: Optional[Glm4Cache] = None) -> np.ndarray:
    """Generate like transformers' ``generate``: returns ``[batch, prompt + new]`` int64 ids; rows
    that finish early are filled with ``pad_token_id`` after their eos token.

    Args:
        model: a ``Glm4ForCausalLM``.
        input_ids: int ``[batch, seq]`` (or ``[seq]``); batches of different lengths left-padded.
        attention_mask: ``[batch, seq]``, 0 at padding (default: all ones).
        max_new_tokens / max_length: new tokens, or total length (transformers' default 20).
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty: as transformers; unset
            values come from the checkpoint's ``generation_config.json``, then transformers' defaults.
        eos_token_id: one id or a list; generation stops on every one of them.
        pad_token_id: fills finished rows (default: generation config, config, then eos[0]).
        stop_strings: stop a row when its generated text ends with one of these (needs ``tokenizer``).
        seed: seed of the sampler; the same seed gives the same tokens.
        streamer: an object with ``put(ids)`` / ``end()`` (transformers' streamer protocol): it
            receives the prompt first, then each step's new tokens ``[batch]``.
        past_key_values: a ``Glm4Cache`` holding a prefix of ``input_ids`` to reuse.
    Returns:
        The prompt followed by the generated tokens.
    """
    ids, mask = _check_prompt(model, input_ids, attention_mask)
    settings = resolve_settings(model, ids.shape[1], dict(
        max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        stop_strings=stop_strings, seed=seed))
    if streamer is not None:
        streamer.put(ids)
    steps = []
    for next_tokens, _ in generate_tokens(model, ids, mask, settings=settings, cache=past_key_values,
                                          tokenizer=tokenizer):
        steps.append(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens)
    if streamer is not None:
        streamer.end()
    return np.concatenate([ids] + [s[:, None] for s in steps], axis=1) if steps else ids


def stream_text(model, tokenizer, input_ids: Any, attention_mask: Any = None, *,
                skip_special_tokens: bool = True, past_key_values: Optional[Glm4Cache] = None,
                **kwargs: Any) -> Iterator[str]:
    """Generate for one prompt and yield the new text piece by piece.

    Args:
        model: a ``Glm4ForCausalLM``.
        tokenizer: a ``Glm4Tokenizer`` (decodes the pieces, and checks ``stop_strings``).
        input_ids: the prompt, ``[1, seq]`` or ``[seq]``.
        skip_special_tokens: leave special tokens (e.g. the final ``<|user|>``) out of the text.
        past_key_values: a cache holding a prefix of the prompt, to reuse.
        **kwargs: the sampling and length arguments of ``generate``.
    Yields:
        Text pieces; each ends on a complete character, and together they are the decoded reply.
    """
    from .tokenizer import StreamDecoder

    ids, mask = _check_prompt(model, input_ids, attention_mask)
    if ids.shape[0] != 1:
        raise ValueError(f"stream_text takes one prompt, got a batch of {ids.shape[0]}")
    settings = resolve_settings(model, ids.shape[1], kwargs)
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    for next_tokens, _ in generate_tokens(model, ids, mask, settings=settings, cache=past_key_values,
                                          tokenizer=tokenizer):
        piece = decoder.put(int(next_tokens[0]))
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
