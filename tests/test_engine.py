"""Glm4Engine without HTTP: continuous batching gives every request ``generate``'s tokens for it
alone, for every weight format, chunk size and mix of prompt lengths; limits, cancel, shutdown."""
import threading

import numpy as np
import pytest

import glm4rt
from conftest import fixture_dir
from glm4rt import Glm4Cache
from glm4rt.engine import (EngineClosedError, EngineError, EngineParams, ErrorEvent, FinishEvent, Glm4Engine,
                           TokenEvent)
from glm4rt.model import RowBatch
from glm4rt.sampling import SamplingParams

LOADS = {
    "f32": dict(path="gqa1_official"),
    "bf16": dict(path="gqa8_bf16_sharded"),
    "int8": dict(path="gqa1_official", quantization="int8"),
    "int4": dict(path="gqa2_nobias_tied_v5", quantization="int4"),
}


def _load(kind):
    spec = dict(LOADS[kind])
    return glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(spec.pop("path")), **spec)


def _alone(model, prompt, n, **kw):
    with glm4rt.batch_invariant():
        out = model.generate(np.array([prompt]), max_new_tokens=n, eos_token_id=[], **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", list(LOADS))
@pytest.mark.parametrize("parallel, chunk", [(3, 4), (8, 64)])
def test_batched_requests_equal_generate_alone(kind, parallel, chunk):
    model = _load(kind)
    rng = np.random.default_rng(len(kind) + parallel)
    lengths = [1, 2, 5, 9, 17, 30, 3, 12]
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths]
    with Glm4Engine(model, parallel=parallel, ctx=48, prefill_chunk=chunk, eos_token_ids=[]) as engine:
        handles = [engine.submit(p, EngineParams(max_tokens=10)) for p in prompts]
        got = [h.result() for h in handles]
    for p, (ids, _, finish) in zip(prompts, got):
        assert ids == _alone(model, p, 10)
        assert finish.reason == "length" and finish.completion_tokens == 10 and finish.prompt_tokens == len(p)


def test_seeded_sampling_is_the_same_in_any_batch():
    model = _load("int4")
    prompt = list(range(3, 14))
    sampling = SamplingParams(do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    alone = _alone(model, prompt, 12, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, seed=3)
    with Glm4Engine(model, parallel=4, ctx=48, prefill_chunk=5, eos_token_ids=[]) as engine:
        others = [engine.submit([i + 1] * (i + 2), EngineParams(max_tokens=12, sampling=sampling)) for i in range(3)]
        mine = engine.submit(prompt, EngineParams(max_tokens=12, sampling=sampling, seed=3))
        assert mine.result()[0] == alone
        for h in others:
            h.result()


def test_prefix_reuse_keeps_the_bits():
    """A second turn reuses the first turn's cache and still gives generate's tokens."""
    model = _load("f32")
    turn1 = list(range(5, 25))
    with Glm4Engine(model, parallel=1, cache_slots=1, ctx=60, prefill_chunk=7, eos_token_ids=[]) as engine:
        ids1, _, f1 = engine.generate(turn1, EngineParams(max_tokens=6))
        turn2 = turn1 + ids1 + [7, 8, 9]
        ids2, _, f2 = engine.generate(turn2, EngineParams(max_tokens=6))
        cold2, _, f3 = engine.generate(turn2, EngineParams(max_tokens=6, cache_prompt=False))
    assert f1.cached_tokens == 0 and f2.cached_tokens == len(turn1) + len(ids1) - 1
    assert f3.cached_tokens == 0
    assert ids2 == cold2 == _alone(model, turn2, 6)


def test_forward_rows_rows_of_several_sequences():
    model = _load("bf16")
    cfg = model.config
    cache = Glm4Cache.for_config(cfg, 3, 32)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 6), rng.integers(0, cfg.vocab_size, 3)
    ids = np.concatenate([a, b])
    batch = RowBatch(ids, np.array([2] * 6 + [0] * 3), np.concatenate([np.arange(6), np.arange(3)]), np.array([5, 8]))
    hidden = model.model.forward_rows(batch, cache)
    with glm4rt.batch_invariant():
        ha = model.model(a[None]).last_hidden_state[0, -1]
        hb = model.model(b[None]).last_hidden_state[0, -1]
    assert np.array_equal(hidden, np.stack([ha, hb]))
    bad = [RowBatch(ids, np.full(9, 3), batch.positions, batch.keep),        # slot outside the cache
           RowBatch(ids, batch.slots, batch.positions + 30, batch.keep),     # position past capacity
           RowBatch(ids + cfg.vocab_size, batch.slots, batch.positions, batch.keep),
           RowBatch(ids, batch.slots, batch.positions, np.array([8, 5])),   # keep not ascending
           RowBatch(ids[:0], batch.slots[:0], batch.positions[:0], batch.keep[:0])]
    for rb in bad:
        with pytest.raises(ValueError):
            model.model.forward_rows(rb, cache)


def test_bad_requests():
    model = _load("f32")
    with Glm4Engine(model, parallel=1, ctx=32) as engine:
        for prompt, params, match in [([], EngineParams(), "empty"),
                                      ([1] * 32, EngineParams(), "context"),
                                      ([1, 2], EngineParams(max_tokens=31), "max_tokens"),
                                      ([1, 2], EngineParams(max_tokens=0), "max_tokens"),
                                      ([model.config.vocab_size], EngineParams(), r"\[0, "),
                                      ([-1], EngineParams(), r"\[0, "),
                                      ([1], EngineParams(top_logprobs=21), "top_logprobs")]:
            with pytest.raises(EngineError, match=match):
                engine.submit(prompt, params)
        # still serving
        assert engine.generate([1, 2], EngineParams(max_tokens=2))[2].completion_tokens == 2
    with pytest.raises(ValueError, match="parallel"):
        Glm4Engine(model, parallel=0)
    with pytest.raises(ValueError, match="ctx"):
        Glm4Engine(model, ctx=model.config.max_position_embeddings + 1)


def test_stop_tokens_and_stop_strings():
    model = _load("f32")

    class CharTokenizer:  # every id is one character: "a" + id % 26
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

        def known_ids(self, ids):
            return list(ids)

    prompt = [3, 1, 4, 1, 5]
    expected = _alone(model, prompt, 12)
    text = "".join(chr(97 + i % 26) for i in expected)
    with Glm4Engine(model, CharTokenizer(), parallel=2, ctx=40, eos_token_ids=[]) as engine:
        ids, out, finish = engine.generate(prompt, EngineParams(max_tokens=12, stop_token_ids=(expected[4],)))
        cut = expected.index(expected[4])  # the stop token: counted, not shown
        assert ids == expected[:cut] and finish.reason == "stop" and finish.completion_tokens == cut + 1
        stop = text[5:8]
        _, out, finish = engine.generate(prompt, EngineParams(max_tokens=12, stop=(stop, "zzzzzz")))
        assert out == text[:text.find(stop)] and finish.reason == "stop"
        _, out, finish = engine.generate(prompt, EngineParams(max_tokens=12, stop=(text[-1] + "q",)))
        assert out == text and finish.reason == "length"  # held back, then released


def test_cancel_and_shutdown():
    model = _load("f32")
    engine = Glm4Engine(model, parallel=1, ctx=64, eos_token_ids=[])
    running = engine.submit([1, 2, 3], EngineParams(max_tokens=60))
    waiting = engine.submit([4, 5], EngineParams(max_tokens=5))
    waiting.cancel()
    first = running.get(timeout=30)
    assert isinstance(first, TokenEvent)
    engine.shutdown()
    events = [first] + list(running)
    assert isinstance(events[-1], (ErrorEvent, FinishEvent))
    if isinstance(events[-1], ErrorEvent):
        assert "shutting down" in events[-1].message
    assert isinstance(list(waiting)[-1], (FinishEvent, ErrorEvent))
    with pytest.raises(EngineClosedError):
        engine.submit([1], EngineParams())


def test_submit_from_many_threads():
    model = _load("int8")
    prompts = [[i + 1] * (i % 5 + 1) for i in range(12)]
    expected = [_alone(model, p, 4) for p in prompts]
    got = [None] * 12
    with Glm4Engine(model, parallel=3, ctx=32, max_waiting=12, eos_token_ids=[]) as engine:
        def run(i):
            got[i] = engine.generate(prompts[i], EngineParams(max_tokens=4))[0]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == expected


def test_presence_and_frequency_penalties():
    """OpenAI's penalties, against a decode loop written here: the model's logits for the whole
    sequence so far, minus presence * (seen) + frequency * count over the generated tokens."""
    model = _load("f32")
    prompt = [4, 4, 9]
    presence, frequency = 0.7, 1.3
    seq, counts = list(prompt), {}
    with glm4rt.batch_invariant():
        for _ in range(12):
            logits = model(np.array([seq])).logits[0, -1].copy()
            for t, c in counts.items():
                logits[t] -= np.float32(presence) + np.float32(frequency) * np.float32(c)
            t = int(np.argmax(logits))
            counts[t] = counts.get(t, 0) + 1
            seq.append(t)
    expected = seq[len(prompt):]
    assert expected != _alone(model, prompt, 12)  # the penalties change this answer
    with Glm4Engine(model, parallel=2, ctx=40, eos_token_ids=[]) as engine:
        ids = engine.generate(prompt, EngineParams(max_tokens=12, presence_penalty=presence,
                                                   frequency_penalty=frequency))[0]
    assert ids == expected
