"""Next-token selection: the logits processors and the sampler of transformers' ``generate``.

``process_logits`` applies, in the same order and with the same float32 arithmetic, the processors
``GenerationMixin._get_logits_processor`` builds for the settings glm4rt supports::

    RepetitionPenaltyLogitsProcessor   always, when repetition_penalty != 1.0
    --- warpers: only when do_sample ---
    TemperatureLogitsWarper            temperature != 1.0
    TopKLogitsWarper                   top_k != 0          (top_k defaults to 50!)
    TopPLogitsWarper                   top_p < 1.0
    MinPLogitsWarper                   min_p is not None

``select_next`` then takes ``argmax`` (greedy) or draws from ``softmax(scores)`` (sampling), as
``GenerationMixin._sample`` does. Filtered tokens carry ``-inf`` and can never be drawn.

One knowing difference: top-p sorts with a stable sort, torch with an unstable one. When tokens with
*equal* scores straddle the top-p boundary, both keep the same number of them, but which of the tied
tokens survive may differ (torch's choice depends on its sort internals; ours keeps the higher ids).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConfigError, Glm4rtError
from .checks import is_real

# transformers' GenerationConfig._get_default_generation_params() (checked in test_sampling.py):
# what an unset (missing or null) field of generation_config.json becomes inside generate().
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}
_SAMPLING_FIELDS = tuple(k for k in GENERATION_DEFAULTS if k != "max_length")  # SamplingParams'

# generation_config.json fields that would make generate() add a processor (or change the decoding
# mode) that glm4rt does not implement -> field: predicate "this value is inactive".
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "num_beams": lambda v: v is None or v == 1,
    "penalty_alpha": lambda v: v is None or v == 0,           # contrastive search
    "typical_p": lambda v: v is None or v >= 1.0,
    "epsilon_cutoff": lambda v: v is None or not 0.0 < v < 1.0,
    "eta_cutoff": lambda v: v is None or not 0.0 < v < 1.0,
    "top_h": lambda v: v is None,
    "no_repeat_ngram_size": lambda v: v is None or v == 0,
    "encoder_repetition_penalty": lambda v: v is None or v == 1.0,
    "encoder_no_repeat_ngram_size": lambda v: v is None or v == 0,
    "bad_words_ids": lambda v: v is None,
    "sequence_bias": lambda v: v is None,
    "suppress_tokens": lambda v: v is None,
    "begin_suppress_tokens": lambda v: v is None,
    "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None,
    "min_length": lambda v: v is None or v == 0,
    "min_new_tokens": lambda v: v is None or v == 0,
    "guidance_scale": lambda v: v is None or v == 1,
    "exponential_decay_length_penalty": lambda v: v is None,
    "remove_invalid_values": lambda v: not v,
    "watermarking_config": lambda v: v is None,
    "constraints": lambda v: v is None,
    "force_words_ids": lambda v: v is None,
    "dola_layers": lambda v: v is None,
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; field meanings and defaults as in transformers' GenerationConfig.

    Args:
        do_sample: draw from the processed distribution (True) or take its argmax (False).
        temperature: divide the scores by this (sampling only; 1.0 = off). Must be > 0 when sampling.
        top_k: keep the ``top_k`` highest scores, plus any tied with the k-th (sampling only; 0 = off).
            The default 50 is transformers' default: sampling is top-50 unless told otherwise.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (sampling only;
            1.0 = off). In (0, 1].
        min_p: drop tokens whose probability is below ``min_p`` times the top probability (sampling
            only; None = off). In [0, 1].
        repetition_penalty: for every token already in ``input_ids``, divide a positive score / multiply
            a negative score by this (greedy and sampling; 1.0 = off). Must be > 0.

    Raises:
        ValueError (``Glm4rtError``): a value outside its range.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise Glm4rtError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_real(self.temperature):  # checked when greedy too, where its value is unused
            raise Glm4rtError(f"temperature must be a number, got {self.temperature!r}")
        if self.do_sample and not _real(self.temperature) > 0:
            raise Glm4rtError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature!r}; "
                "for greedy decoding set do_sample=False")
        top_k = self.top_k
        if isinstance(top_k, float) and top_k.is_integer():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise Glm4rtError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < _real(self.top_p) <= 1.0:
            raise Glm4rtError(f"top_p must be in (0, 1] (1.0 disables it), got {self.top_p!r}")
        if self.min_p is not None and not 0.0 <= _real(self.min_p) <= 1.0:
            raise Glm4rtError(f"min_p must be in [0, 1] or None (disabled), got {self.min_p!r}")
        if not _real(self.repetition_penalty) > 0:
            raise Glm4rtError(
                f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty!r}")
        # Normalise the types once so the hot path never has to.
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", None if self.min_p is None else float(self.min_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @classmethod
    def from_generation_config(cls, generation_config: dict) -> "SamplingParams":
        """Read the sampling fields of a ``generation_config.json`` dict, as ``generate()`` would.

        A missing or ``null`` field takes transformers' global default (do_sample False, temperature
        1.0, top_k 50, top_p 1.0, min_p None, repetition_penalty 1.0). Fields unrelated to choosing a
        token (eos_token_id, max_length, ...) are ignored.

        Args:
            generation_config: the parsed JSON object.

        Returns:
            The ``SamplingParams``.

        Raises:
            ConfigError: a field asks for a decoding feature glm4rt does not implement (beam search,
                typical_p, no_repeat_ngram_size, ...), rather than silently ignoring it.
            ValueError (``Glm4rtError``): a sampling field outside its range.
        """
        if not isinstance(generation_config, dict):
            raise Glm4rtError(
                f"generation_config must be a dict, got {type(generation_config).__name__}")
        active = [f"{key}={generation_config[key]!r}" for key, inactive in _UNSUPPORTED.items()
                  if key in generation_config and not inactive(generation_config[key])]
        if active:
            raise ConfigError(f"generation_config sets {', '.join(active)}, which glm4rt does not "
                              "implement (it supports greedy and sampling with temperature, top_k, "
                              "top_p, min_p and repetition_penalty)")
        fields = {}
        for key in _SAMPLING_FIELDS:
            value = generation_config.get(key)
            fields[key] = GENERATION_DEFAULTS[key] if value is None else value
        return cls(**fields)


def process_logits(scores: np.ndarray, input_ids: np.ndarray, params: SamplingParams,
                   attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Apply the logits processors ``generate()`` would apply for ``params``, in its order.

    Greedy (``do_sample=False``) applies only the repetition penalty; sampling adds temperature,
    top-k, top-p and min-p. Removed tokens get ``-inf``. The input is not modified.

    Args:
        scores: ``[batch, vocab]`` next-token logits; converted to float32 as transformers does.
        input_ids: ``[batch, seq]`` integer ids of everything so far, prompt included (ids >= vocab
            are ignored by the repetition penalty, as in transformers).
        params: the ``SamplingParams``.
        attention_mask: optional ``[batch, seq]``; as in ``generate()``, the repetition penalty skips
            the positions before each row's first non-zero entry (left padding). None = all ones.

    Returns:
        ``[batch, vocab]`` float32 processed scores.

    Raises:
        ValueError (``Glm4rtError``): wrong shapes or negative token ids.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise Glm4rtError(f"scores must be a float [batch, vocab] array, got {scores.dtype} "
                          f"{scores.shape}")
    input_ids = np.asarray(input_ids)
    if (input_ids.ndim != 2 or input_ids.shape[0] != scores.shape[0]
            or not np.issubdtype(input_ids.dtype, np.integer)):
        raise Glm4rtError(f"input_ids must be an integer [batch={scores.shape[0]}, seq] array, got "
                          f"{input_ids.dtype} {input_ids.shape}")
    if input_ids.size and input_ids.min() < 0:
        raise Glm4rtError(f"input_ids must be >= 0, got {input_ids.min()}")
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise Glm4rtError(f"attention_mask must match input_ids {input_ids.shape}, got "
                              f"{attention_mask.shape}")

    scores = scores.astype(np.float32, copy=True)  # [batch, vocab]
    for _name, step in _processors(params):
        scores = step(scores, input_ids, attention_mask)
    return scores


def select_next(scores: np.ndarray, params: SamplingParams,
                rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Choose one token per row: argmax when greedy, else a draw from ``softmax(scores)``.

    Greedy returns the first maximum on ties, like ``torch.argmax``. Sampling uses one uniform number
    per row from ``rng`` (inverse CDF in float64), so the same seed gives the same tokens; tokens
    whose score is ``-inf`` have probability 0 and are never returned.

    Args:
        scores: ``[batch, vocab]`` processed scores (the output of ``process_logits``).
        params: the ``SamplingParams`` (only ``do_sample`` is read).
        rng: the random generator; required when sampling, unused when greedy.

    Returns:
        ``[batch]`` int64 token ids.

    Raises:
        ValueError (``Glm4rtError``): wrong shape, no generator when sampling, or a row with no
            finite score or a NaN/+inf score when sampling (``torch.multinomial`` refuses those too).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise Glm4rtError(f"scores must be a [batch, vocab] array, got shape {scores.shape}")
    if not params.do_sample:
        return np.argmax(scores, axis=-1).astype(np.int64)
    if not isinstance(rng, np.random.Generator):
        raise Glm4rtError(f"sampling needs a numpy.random.Generator, got {type(rng).__name__}")

    scores = scores.astype(np.float64)  # [batch, vocab]
    row_max = scores.max(axis=-1, keepdims=True)  # [batch, 1]
    bad = ~np.isfinite(row_max[:, 0]) | np.isnan(scores).any(axis=-1)
    if bad.any():
        raise Glm4rtError(f"cannot sample from rows {np.flatnonzero(bad).tolist()}: every score is "
                          "-inf, or a score is NaN/+inf")
    probs = np.exp(scores - row_max)  # [batch, vocab], -inf -> 0
    cdf = np.cumsum(probs, axis=-1)  # [batch, vocab], non-decreasing, cdf[:, -1] >= 1
    u = rng.random(scores.shape[0]) * cdf[:, -1]  # [batch], in [0, total)
    # First index whose cdf exceeds u (searchsorted 'right', per row). A zero-probability token
    # repeats its predecessor's cdf, so it can never be the first to exceed u.
    tokens = np.count_nonzero(cdf <= u[:, None], axis=-1)  # [batch]
    # Rounding could put u at the total; fall back to the last token with non-zero probability.
    last_live = scores.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # [batch]
    return np.minimum(tokens, last_live).astype(np.int64)


# ---- the processors: transformers' semantics and float32 arithmetic, NumPy, batched -----------------
# Python float constants are rounded to float32 first: torch does the same when a Python scalar
# meets a float32 tensor, and it decides ties at the top-p / min-p thresholds.

def _processors(params: SamplingParams) -> list[tuple[str, Callable]]:
    """The steps of ``process_logits``, named after the transformers classes they mirror, in the
    order ``_get_logits_processor`` appends them (min_tokens_to_keep is 1 without beam search)."""
    steps = []
    if params.repetition_penalty != 1.0:
        steps.append(("RepetitionPenaltyLogitsProcessor",
                      lambda s, ids, mask: _repetition_penalty(s, ids, mask, params.repetition_penalty)))
    if params.do_sample:
        if params.temperature != 1.0:
            steps.append(("TemperatureLogitsWarper",
                          lambda s, ids, mask: s / np.float32(params.temperature)))
        if params.top_k != 0:
            steps.append(("TopKLogitsWarper", lambda s, ids, mask: _top_k(s, params.top_k)))
        if params.top_p < 1.0:
            steps.append(("TopPLogitsWarper", lambda s, ids, mask: _top_p(s, params.top_p)))
        if params.min_p is not None:
            steps.append(("MinPLogitsWarper", lambda s, ids, mask: _min_p(s, params.min_p)))
    return steps


def _repetition_penalty(scores, input_ids, attention_mask, penalty):
    batch, vocab = scores.shape
    ids = input_ids
    if attention_mask is not None:
        # generate(): prompt_ignore_length = index of the first non-zero mask entry (left padding).
        first_real = np.argmax(attention_mask != 0, axis=1)  # [batch]
        skip = np.arange(ids.shape[1])[None, :] < first_real[:, None]  # [batch, seq]
        ids = np.where(skip, vocab, ids)
    ids = np.minimum(ids, vocab)  # ids beyond the head's vocab land in a spare column, dropped below
    seen = np.zeros((batch, vocab + 1), dtype=bool)  # [batch, vocab + 1]
    seen[np.arange(batch)[:, None], ids] = True
    seen = seen[:, :vocab]  # [batch, vocab]
    penalised = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return np.where(seen, penalised, scores)


def _top_k(scores, top_k):
    vocab = scores.shape[-1]
    k = min(max(top_k, 1), vocab)
    kth = np.partition(scores, vocab - k, axis=-1)[:, vocab - k, None]  # [batch, 1], k-th largest
    return np.where(scores < kth, np.float32(-np.inf), scores)  # ties with the k-th all survive


def _top_p(scores, top_p):
    # Stable sort: equal scores keep id order. (Cheap after top-k: the -inf run sorts in one pass.)
    order = np.argsort(scores, axis=-1, kind="stable")  # [batch, vocab], ascending
    probs = _softmax_f32(np.take_along_axis(scores, order, axis=-1))  # [batch, vocab], sorted
    # torch's CPU cumsum accumulates float32 in float64 and rounds each partial sum to float32.
    cumulative = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)
    drop_sorted = cumulative <= np.float32(1.0 - top_p)  # the low tail holding <= 1 - top_p
    drop_sorted[:, -1] = False  # min_tokens_to_keep = 1: the top token always stays
    drop = np.empty_like(drop_sorted)  # [batch, vocab], original order
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, np.float32(-np.inf), scores)


def _min_p(scores, min_p):
    probs = _softmax_f32(scores)  # [batch, vocab]
    top = probs.max(axis=-1, keepdims=True)  # [batch, 1]
    drop = probs < np.float32(min_p) * top
    drop[np.arange(scores.shape[0]), np.argmax(probs, axis=-1)] = False  # min_tokens_to_keep = 1
    return np.where(drop, np.float32(-np.inf), scores)


def _softmax_f32(x):
    # As torch's CPU kernel: exp(x - max), then times 1/sum. An all -inf row gives NaN there too.
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e * (np.float32(1.0) / e.sum(axis=-1, keepdims=True, dtype=np.float32))


def _real(value) -> float:
    """``value`` as a float for range checks; NaN for anything that is not a real number."""
    return float(value) if is_real(value) else math.nan
