"""The serving engine: continuous batching of many requests on one model, usable without HTTP.

One scheduler thread owns the model. Each step it runs ONE forward (``Glm4Model.forward_rows``)
over a row per decoding request (its last token) and a chunk of the prompt of requests still
prefilling, so the weights are read once per step for every active sequence. Requests join
between steps and leave when they finish; each has its own cache slot, position, sampler and
random generator. The kernels run batch-invariant (``glm4rt.batch_invariant``): a request's
tokens are those ``generate`` gives for it alone in that mode (greedy: token for token; sampled
with a seed: the same draws), whatever else is batched with it.

Prefix reuse: a slot keeps the keys and values of its last sequence after the request ends. A new
request takes the free slot whose cached tokens share the longest prefix with its prompt and
prefills only the rest (chat clients resend the whole conversation each turn); with no shared
prefix it takes the least recently used free slot. Memory is bounded by the slots: ``parallel``
running sequences plus ``cache_slots`` kept ones, ``ctx`` positions each, allocated up front.

    engine = Glm4Engine(model, tokenizer, parallel=4)
    handle = engine.submit(prompt_ids, EngineParams(max_tokens=64))
    for event in handle:             # TokenEvent ..., then FinishEvent
        ...
    engine.shutdown()
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Iterator, Optional, Sequence

import numpy as np

from . import ops
from .errors import Glm4rtError
from .kv_cache import Glm4Cache
from .model import RowBatch
from .sampling import SamplingParams, process_logits, select_next

log = logging.getLogger(__name__)


class EngineError(Glm4rtError):
    """A request the engine cannot take (too long for the context, bad parameters)."""


class QueueFullError(EngineError):
    """Every slot is busy and the waiting queue is full: retry later."""


class EngineClosedError(EngineError):
    """The engine is shut down."""


@dataclasses.dataclass(frozen=True)
class EngineParams:
    """What one request asks for.

    Args:
        max_tokens: new tokens at most (None: until the context is full).
        sampling: greedy or sampling settings (``glm4rt.sampling.SamplingParams``).
        seed: seed of this request's sampler (None: fresh entropy).
        stop_token_ids: ids that end the request (not part of its text).
        stop: strings that end the request; the text stops before the first one.
        presence_penalty, frequency_penalty: OpenAI's penalties on the tokens generated so far
            (subtracted from the logits: presence once per seen token, frequency per occurrence).
        logprobs: return the chosen token's log-probability (of the model's distribution).
        top_logprobs: also the most likely ``top_logprobs`` tokens and theirs (0-20).
        ignore_eos: do not stop at the model's end-of-sequence ids (benchmarks).
        cache_prompt: reuse a cached prefix of the prompt (False: prefill it all, in a slot whose
            cache is the least recently used).
    """
    max_tokens: Optional[int] = None
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    cache_prompt: bool = True


@dataclasses.dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be "" while a character or a
    possible stop string is incomplete) and, when asked for, log-probabilities."""
    token_id: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None


@dataclasses.dataclass
class FinishEvent:
    """The request ended: ``reason`` is ``"stop"`` (a stop token or string), ``"length"``
    (max_tokens or the context) or ``"cancelled"``; ``text`` is what was held back and is part of
    the answer."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str = ""


@dataclasses.dataclass
class ErrorEvent:
    """The request failed (the engine shut down, or an internal error); ``message`` says why."""
    message: str


class RequestHandle:
    """A submitted request: iterate over it for its events (blocking), ``cancel()`` to stop it."""

    def __init__(self, request_id: int, prompt_tokens: int, listener=None) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events: queue.Queue = queue.Queue()
        self._listener = listener
        self.cancelled = threading.Event()

    def _put(self, event) -> None:
        """(engine thread) Deliver an event: to the queue, or to the listener when one was given."""
        if self._listener is not None:
            self._listener(event)
        else:
            self._events.put(event)

    def cancel(self) -> None:
        """Stop the request; its slot is freed before the next step."""
        self.cancelled.set()

    def get(self, timeout: Optional[float] = None):
        """The next event (blocks; ``queue.Empty`` after ``timeout`` seconds)."""
        return self._events.get(timeout=timeout)

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent | ErrorEvent]:
        while True:
            event = self._events.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    def result(self) -> tuple[list[int], str, FinishEvent]:
        """Wait for the end: ``(token ids, text, finish event)``.

        Raises:
            EngineError: the request failed.
        """
        ids, text = [], []
        for event in self:
            if isinstance(event, ErrorEvent):
                raise EngineError(event.message)
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                text.append(event.text)
            else:
                text.append(event.text)
                return ids, "".join(text), event
        raise EngineError("the request ended without a result")  # pragma: no cover


class _Slot:
    """One cache sequence: the tokens whose keys and values it holds (positions 0 .. len - 1)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.tokens: list[int] = []
        self.busy = False
        self.last_used = 0.0


class _Sequence:
    """A running request: its slot, every token so far, how many are in the cache."""

    def __init__(self, handle: RequestHandle, prompt: list[int], params: EngineParams, max_len: int,
                 tokenizer) -> None:
        self.handle, self.params = handle, params
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_len = max_len           # prompt + new tokens at most
        self.slot: Optional[_Slot] = None
        self.n_cached = 0                # tokens whose keys and values are in the slot
        self.reused = 0                  # of those, taken from the slot's previous sequence
        self.rng = np.random.default_rng(params.seed)
        self.counts: dict[int, int] = {}  # generated token -> occurrences (OpenAI penalties)
        self.decoder = None
        self.pending = ""                # text held back: it may start a stop string
        self.stopped_by_string = False   # (the text after it is dropped)
        if tokenizer is not None:
            from .tokenizer import StreamDecoder
            self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.tokens) - 1 or self.generated == 0


class Glm4Engine:
    """Continuous batching over a ``Glm4ForCausalLM``; thread-safe ``submit``.

    Args:
        model: the ``Glm4ForCausalLM``.
        tokenizer: a ``Glm4Tokenizer`` for text output and stop strings (None: ids only).
        parallel: sequences decoded together at most.
        ctx: positions per sequence (prompt + answer); default the model's context, at most 4096.
        cache_slots: finished sequences whose cache is kept for prefix reuse (default ``parallel``).
        prefill_chunk: prompt tokens per step at most (across requests). While other requests
            decode, a new prompt is prefilled in smaller chunks, sized from the measured step times
            so that a decode step with a chunk takes about ``max_stall`` times one without: the
            running streams slow down by that much, never stop, while the prompt is read.
        max_stall: see ``prefill_chunk`` (> 1).
        max_waiting: requests queued for a slot at most; more get ``QueueFullError``.
        eos_token_ids: ids that end every request (default: the checkpoint's generation config /
            config ``eos_token_id``).
    """

    def __init__(self, model, tokenizer=None, *, parallel: int = 4, ctx: Optional[int] = None,
                 cache_slots: Optional[int] = None, prefill_chunk: int = 512, max_stall: float = 2.5,
                 max_waiting: int = 64, eos_token_ids: Optional[Sequence[int]] = None) -> None:
        config = model.config
        for name, value in (("parallel", parallel), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        cache_slots = parallel if cache_slots is None else cache_slots
        if not isinstance(cache_slots, int) or cache_slots < 0:
            raise ValueError(f"cache_slots must be an integer >= 0, got {cache_slots!r}")
        ctx = min(config.max_position_embeddings, 4096) if ctx is None else ctx
        if not isinstance(ctx, int) or not 2 <= ctx <= config.max_position_embeddings:
            raise ValueError(f"ctx must be an integer in [2, {config.max_position_embeddings}] "
                             f"(max_position_embeddings), got {ctx!r}")
        if not isinstance(max_stall, (int, float)) or not max_stall > 1:
            raise ValueError(f"max_stall must be a number > 1, got {max_stall!r}")
        self.max_stall = float(max_stall)
        self._decode_step: Optional[float] = None   # seconds of a step without prompt rows (average)
        self._prefill_token: Optional[float] = None  # seconds a prompt row adds to a step (average)
        self.model, self.tokenizer = model, tokenizer
        self.parallel, self.ctx, self.prefill_chunk, self.max_waiting = parallel, ctx, prefill_chunk, max_waiting
        if eos_token_ids is None:
            eos = model.generation_config.get("eos_token_id", config.eos_token_id)
            eos_token_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.cache = Glm4Cache.for_config(config, parallel + cache_slots, ctx)
        self.slots = [_Slot(i) for i in range(parallel + cache_slots)]
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
                      "steps": 0, "busy_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="glm4rt-engine", daemon=True)
        self._thread.start()

    # ---- the public side -----------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: EngineParams = EngineParams(),
               listener=None) -> RequestHandle:
        """Queue a request; returns at once.

        Args:
            prompt_ids: the prompt's token ids.
            params: what to generate.
            listener: called on the engine thread with each event instead of queueing it for the
                handle's iterator (e.g. to hand it to an asyncio loop); it must not block.

        Raises:
            EngineError: an empty prompt, ids outside the vocabulary, or a prompt / ``max_tokens``
                that does not fit in ``ctx``.
            QueueFullError: ``max_waiting`` requests are already waiting.
            EngineClosedError: after ``shutdown``.
        """
        prompt = [int(t) for t in np.asarray(prompt_ids, dtype=np.int64).reshape(-1)]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise EngineError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) >= self.ctx:
            raise EngineError(f"the prompt has {len(prompt)} tokens; the context holds {self.ctx} "
                              "(prompt and answer together)")
        room = self.ctx - len(prompt)
        if params.max_tokens is not None:
            if params.max_tokens < 1:
                raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}")
            if params.max_tokens > room:
                raise EngineError(f"max_tokens {params.max_tokens} does not fit: the prompt has "
                                  f"{len(prompt)} tokens and the context holds {self.ctx} "
                                  f"(at most {room} new tokens)")
        if not 0 <= params.top_logprobs <= 20:
            raise EngineError(f"top_logprobs must be in [0, 20], got {params.top_logprobs}")
        max_len = len(prompt) + (room if params.max_tokens is None else params.max_tokens)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting + max(0, self.parallel - len(self._running)):
                raise QueueFullError(f"all {self.parallel} slots are busy and {len(self._waiting)} "
                                     "requests are waiting; retry later")
            handle = RequestHandle(next(self._ids), len(prompt), listener)
            self._waiting.append(_Sequence(handle, prompt, params, max_len, self.tokenizer))
            self.stats["requests"] += 1
            self._lock.notify()
        return handle

    def generate(self, prompt_ids: Sequence[int], params: EngineParams = EngineParams()
                 ) -> tuple[list[int], str, FinishEvent]:
        """Submit and wait: ``(new token ids, text, finish event)``."""
        return self.submit(prompt_ids, params).result()

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop: waiting and running requests get an ``ErrorEvent``; returns when the scheduler
        thread has ended (the current step finishes first)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "Glm4Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        ops.set_batch_invariant(True)  # this thread's kernels (forward_rows sets it too)
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._running:
                    self._lock.wait()
                if self._closed:
                    self._fail_all("the server is shutting down")
                    return
                self._admit()
            self._drop_cancelled()
            if not self._running:
                continue
            start = time.perf_counter()
            try:
                self._step()
            except Exception as e:  # a bug must not leave clients waiting forever
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, error=f"internal error: {e}")
            self.stats["busy_seconds"] += time.perf_counter() - start
            self.stats["steps"] += 1

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running) + list(self._waiting):
            seq.handle._put(ErrorEvent(message))
        self._running.clear()
        self._waiting.clear()

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        while self._waiting and len(self._running) < self.parallel:
            seq = self._waiting.popleft()
            if seq.handle.cancelled.is_set():
                seq.handle._put(FinishEvent("cancelled", seq.prompt_len, 0, 0))
                continue
            free = [s for s in self.slots if not s.busy]
            # The longest shared prefix wins; without one, the least recently used slot.
            shared, best = max(((_common_prefix(s.tokens, seq.tokens) if seq.params.cache_prompt else 0, s)
                                for s in free), key=lambda p: (p[0], -p[1].last_used))
            if shared == 0:
                best = min(free, key=lambda s: s.last_used)
            # At least the prompt's last token is run again: its logits give the first new token.
            seq.n_cached = seq.reused = min(shared, seq.prompt_len - 1)
            best.busy, best.tokens = True, []
            seq.slot = best
            self._running.append(seq)
            self.stats["cached_tokens"] += seq.reused

    def _drop_cancelled(self) -> None:
        for seq in list(self._running):
            if seq.handle.cancelled.is_set():
                self._finish(seq, reason="cancelled")

    def _step(self) -> None:
        """One forward over every running sequence: a decode row each, or a prompt chunk."""
        ids, slots, positions, keep, sampled = [], [], [], [], []
        budget = self._prefill_budget()
        n_prefill = 0
        for seq in self._running:
            if seq.prefilling:
                n = min(len(seq.tokens) - seq.n_cached, budget)
                if n == 0:
                    continue  # waits for the next step's budget
                budget -= n
                n_prefill += n
            else:
                n = 1
            first = seq.n_cached
            ids.extend(seq.tokens[first:first + n])
            slots.extend([seq.slot.index] * n)
            positions.extend(range(first, first + n))
            seq.n_cached += n
            if seq.n_cached == len(seq.tokens):  # the last known token ran: sample the next
                keep.append(len(ids) - 1)
                sampled.append(seq)
        if not ids:
            return
        start = time.perf_counter()
        batch = RowBatch(np.array(ids, dtype=np.int64), np.array(slots, dtype=np.int64),
                         np.array(positions, dtype=np.int64), np.array(keep, dtype=np.int64))
        hidden = self.model.model.forward_rows(batch, self.cache)      # [K, H]
        logits = self.model.lm_head(hidden) if len(keep) else hidden   # [K, V]
        for seq, row in zip(sampled, logits):
            self._sample(seq, row)
        self._time_step(time.perf_counter() - start, n_prefill, len(ids) - n_prefill)

    # Chunked prefill: a step with p prompt rows takes about decode_step + p * prefill_token; the
    # averages are measured on the steps themselves (exponential, weight 1/4 for the newest).
    MIN_CHUNK = 16

    def _prefill_budget(self) -> int:
        """Prompt rows for this step: all it may take when nothing decodes; otherwise as many as
        keep the step within max_stall times a decode step."""
        if all(seq.prefilling for seq in self._running):
            return self.prefill_chunk
        if self._decode_step is None or self._prefill_token is None:
            return min(self.prefill_chunk, 2 * self.MIN_CHUNK)  # until both are measured
        rows = int((self.max_stall - 1.0) * self._decode_step / self._prefill_token)
        return max(self.MIN_CHUNK, min(self.prefill_chunk, rows))

    def _time_step(self, seconds: float, n_prefill: int, n_decode: int) -> None:
        def average(old: Optional[float], new: float) -> float:
            return new if old is None else 0.75 * old + 0.25 * new

        if n_prefill == 0:
            self._decode_step = average(self._decode_step, seconds)
        elif n_decode and self._decode_step is not None:
            self._prefill_token = average(self._prefill_token, max(seconds - self._decode_step, 0.0) / n_prefill)
        elif not n_decode:  # a prompt alone: its rows cost the whole step (an upper bound)
            self._prefill_token = average(self._prefill_token, seconds / n_prefill)

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> None:
        p = seq.params
        scores = logits[None]  # [1, V]
        if seq.counts and (p.presence_penalty or p.frequency_penalty):
            scores = scores.copy()
            ids = np.fromiter(seq.counts, dtype=np.int64)
            counts = np.fromiter(seq.counts.values(), dtype=np.float32)
            scores[0, ids] -= np.float32(p.presence_penalty) + np.float32(p.frequency_penalty) * counts
        if not p.sampling.do_sample and p.sampling.repetition_penalty == 1.0:
            token = int(np.argmax(scores[0]))  # what process_logits + select_next give, without copies
        else:
            processed = process_logits(scores, np.array([seq.tokens], dtype=np.int64), p.sampling)
            token = int(select_next(processed, p.sampling, seq.rng)[0])
        logprob = top = None
        if p.logprobs:
            lp = logits.astype(np.float64)
            lp = lp - lp.max()
            lp -= np.log(np.exp(lp).sum())
            logprob = float(lp[token])
            if p.top_logprobs:
                best = np.argsort(-lp, kind="stable")[:p.top_logprobs]
                top = [(int(t), float(lp[t])) for t in best]
        seq.tokens.append(token)
        seq.counts[token] = seq.counts.get(token, 0) + 1
        self.stats["completion_tokens"] += 1
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:  # counted, not shown
            self._finish(seq, reason="stop")
            return
        text = seq.decoder.put(token) if seq.decoder is not None else ""
        text, stopped = self._stop_strings(seq, text)
        seq.handle._put(TokenEvent(token, text, logprob, top))
        if stopped:
            self._finish(seq, reason="stop")
        elif len(seq.tokens) >= seq.max_len:
            self._finish(seq, reason="length")

    @staticmethod
    def _stop_strings(seq: _Sequence, text: str) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string was reached (the text then
        ends before it). Text that could be the start of a stop string is held back."""
        stops = seq.params.stop
        if not stops:
            return text, False
        pending = seq.pending + text
        cut = _first_stop(pending, stops)
        if cut is not None:
            seq.pending, seq.stopped_by_string = "", True
            return pending[:cut], True
        hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        seq.pending = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold], False

    def _finish(self, seq: _Sequence, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        """End a running sequence; its slot keeps the cached tokens for prefix reuse."""
        if seq in self._running:
            self._running.remove(seq)
        slot = seq.slot
        slot.tokens = seq.tokens[:seq.n_cached] if error is None else []
        slot.busy, slot.last_used = False, time.monotonic()
        if error is not None:
            seq.handle._put(ErrorEvent(error))
            return
        rest = ""
        if not seq.stopped_by_string:  # the held-back text was no stop string after all
            rest = seq.pending + (seq.decoder.flush() if seq.decoder is not None else "")
            rest = rest[:_first_stop(rest, seq.params.stop)]  # (None: all of it)
        self.stats["prompt_tokens"] += seq.prompt_len
        seq.handle._put(FinishEvent(reason, seq.prompt_len, seq.generated, seq.reused, rest))


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the first of ``stops`` begins in ``text`` (None: nowhere)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
