"""generate(): token-for-token parity with transformers' greedy generate (committed goldens, and
live on a fresh checkpoint), sampling determinism, stopping rules, the streamer protocol, and the
KV cache being allocated once."""
import numpy as np
import pytest

import glm4rt
from conftest import fixture_dir, golden
from glm4rt.kv_cache import Glm4Cache

NAME = "generation"


@pytest.fixture(scope="module")
def model():
    return glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(NAME), dtype="float32")  # bf16 checkpoint, exact fp32 compute


@pytest.fixture(scope="module")
def g():
    return golden(NAME)


def test_greedy_single_prompt_matches_transformers(model, g):
    out = model.generate(g["gen_prompt"], max_new_tokens=64, do_sample=False)
    assert out.shape == (1, 11 + 64)
    np.testing.assert_array_equal(out, g["gen_greedy"])


def test_greedy_left_padded_batch_matches_transformers(model, g):
    out = model.generate(g["gen_batch_ids"], attention_mask=g["gen_batch_mask"], max_new_tokens=64)
    np.testing.assert_array_equal(out, g["gen_batch_out"])


def test_repetition_penalty_matches_transformers(model, g):
    out = model.generate(g["gen_prompt"], max_new_tokens=64, repetition_penalty=1.3, eos_token_id=[])
    np.testing.assert_array_equal(out, g["gen_rep"])


def test_eos_stops_rows_and_pads_them_like_transformers(model, g):
    stop = int(g["gen_stop_id"])
    out = model.generate(g["gen_batch_ids"], attention_mask=g["gen_batch_mask"], max_new_tokens=64,
                         eos_token_id=[stop])
    np.testing.assert_array_equal(out, g["gen_stop_out"])
    row0 = out[0, 11:]
    first = int(np.argmax(row0 == stop))
    assert first == int(np.argmax(g["gen_batch_out"][0, 11:] == stop)) <= 5
    assert np.all(row0[first + 1:] == model.generation_config["pad_token_id"])


def test_stops_on_every_eos_id(model, g):
    greedy = g["gen_greedy"][0, 11:]
    a, b = int(greedy[3]), int(greedy[9])
    first = int(np.argmax(np.isin(greedy, [a, b])))  # where either eos id first occurs
    out = model.generate(g["gen_prompt"], max_new_tokens=64, eos_token_id=[b, a])
    assert out.shape[1] == 11 + first + 1 and out[0, -1] in (a, b)
    np.testing.assert_array_equal(out, g["gen_greedy"][:, :11 + first + 1])


def test_top_k_1_sampling_equals_greedy(model, g):
    out = model.generate(g["gen_prompt"], max_new_tokens=64, do_sample=True, top_k=1, temperature=0.7, seed=3)
    np.testing.assert_array_equal(out, g["gen_greedy"])


def test_same_seed_same_tokens(model, g):
    kw = dict(max_new_tokens=40, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[])
    a = model.generate(g["gen_prompt"], seed=11, **kw)
    b = model.generate(g["gen_prompt"], seed=11, **kw)
    c = model.generate(g["gen_prompt"], seed=12, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, g["gen_greedy"][:, :a.shape[1]])


def test_max_length_and_transformers_default_of_20(model, g):
    assert model.generate(g["gen_prompt"], max_length=15, eos_token_id=[]).shape == (1, 15)
    assert model.generate(g["gen_prompt"], eos_token_id=[]).shape == (1, 20)  # GenerationConfig default


def test_generation_config_supplies_defaults(model, g):
    saved = dict(model.generation_config)
    try:
        model.generation_config = {**saved, "max_new_tokens": 7, "eos_token_id": []}
        assert model.generate(g["gen_prompt"]).shape == (1, 18)
        assert model.generate(g["gen_prompt"], max_new_tokens=3).shape == (1, 14)
    finally:
        model.generation_config = saved


def test_streamer_receives_prompt_then_each_step(model, g):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(np.array(value))

        def end(self):
            self.ended = True

    rec = Recorder()
    out = model.generate(g["gen_prompt"], max_new_tokens=5, streamer=rec, eos_token_id=[])
    np.testing.assert_array_equal(rec.puts[0], g["gen_prompt"])
    assert len(rec.puts) == 6 and rec.ended
    np.testing.assert_array_equal(np.concatenate(rec.puts[1:]), out[0, 11:])


def test_context_overflow_is_a_clear_error(model, g):
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        model.generate(g["gen_prompt"], max_new_tokens=limit)
    with pytest.raises(ValueError, match="context"):
        model.generate(np.ones((1, limit), dtype=np.int64), max_new_tokens=1)


def test_bad_arguments(model, g):
    with pytest.raises(ValueError, match="temperature"):
        model.generate(g["gen_prompt"], do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(g["gen_prompt"], stop_strings=["x"])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(g["gen_prompt"], attention_mask=np.ones((1, 3)))


def test_max_new_tokens_fraction_is_refused(model, g):
    # issue 18: 2.5 was accepted (and rounded down somewhere along the way)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a whole number >= 0, got 2.5"):
        model.generate(g["gen_prompt"], max_new_tokens=2.5)
    assert model.generate(g["gen_prompt"], max_new_tokens=2.0, eos_token_id=[]).shape == (1, 13)  # integral


def test_max_new_tokens_string_is_a_clear_type_error(model, g):
    # issue 18: '3' gave "'<' not supported between instances of 'str' and 'int'"
    with pytest.raises(TypeError, match=r"max_new_tokens must be an integer, got '3' \(str\)"):
        model.generate(g["gen_prompt"], max_new_tokens="3")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be a whole number >= 0, got -1"),
    (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an integer, got True \(bool\)"),
    (dict(max_new_tokens=float("nan")), ValueError, r"max_new_tokens must be a whole number >= 0, got nan"),
    (dict(max_length=12.5), ValueError, r"max_length must be a whole number >= 0, got 12.5"),
    (dict(max_length=None, max_new_tokens=[4]), TypeError, r"max_new_tokens must be an integer, got \[4\]"),
    (dict(eos_token_id="3"), TypeError, r"eos_token_id must be a token id \(an integer\), got '3' \(str\)"),
    (dict(eos_token_id=[1, 2.5]), TypeError, r"eos_token_id must be a token id \(an integer\), got 2.5"),
    (dict(eos_token_id=-1), ValueError, r"eos_token_id must be >= 0, got -1"),
    (dict(pad_token_id=[1]), TypeError, r"pad_token_id must be a token id \(an integer\), got \[1\] \(list\)"),
    (dict(seed=-1), ValueError, r"seed must be a whole number >= 0, got -1"),
    (dict(seed="7"), TypeError, r"seed must be an integer, got '7' \(str\)"),
    (dict(stop_strings=5), TypeError, r"stop_strings must be a string or a list of strings, got 5"),
    (dict(stop_strings=["a", ""]), ValueError, r"stop_strings must not be empty strings"),
    (dict(do_sample=True, temperature="0.7"), ValueError, r"temperature must be a number, got '0.7'"),
    (dict(temperature=None, top_p="0.5"), ValueError, r"top_p must be in \(0, 1\] .*got '0.5'"),
])
def test_generation_arguments_of_wrong_type_or_range(model, g, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.generate(g["gen_prompt"], **kwargs)


def test_prompt_ids_out_of_range_are_refused_even_when_nothing_is_generated(model, g):
    # found by tests/fuzz_inputs.py: max_length below the prompt length returned negative ids as they were
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 300\) \(vocab_size\), got -1 .. 5"):
        model.generate(np.array([[5, -1, 3]]), max_length=2)
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 300\) .* got 0 .. 300"):
        model.generate(np.array([[0, 300]]), max_new_tokens=1)


@pytest.mark.parametrize("input_ids, attention_mask, message", [
    ([[1, 2], [3]], None, "input_ids must be a \\[batch, seq\\] array, got list"),
    (np.array([[1, 2]]), "ones", "attention_mask must be a \\[batch, seq\\] array, got str"),
])
def test_prompt_that_is_no_array(model, input_ids, attention_mask, message):
    # found by tests/fuzz_inputs.py: "invalid literal for int() with base 10: 'ones'"
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=1)


def test_kv_cache_is_allocated_once(model, g, monkeypatch):
    allocations = []
    original = Glm4Cache.reserve

    def spy(self, batch_size, total_len):
        before = id(self.key_cache)
        original(self, batch_size, total_len)
        if id(self.key_cache) != before:
            allocations.append(self.capacity)

    monkeypatch.setattr(Glm4Cache, "reserve", spy)
    init_sizes = []
    original_init = Glm4Cache.__init__

    def init_spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        init_sizes.append(self.capacity)

    monkeypatch.setattr(Glm4Cache, "__init__", init_spy)
    model.generate(g["gen_prompt"], max_new_tokens=30, eos_token_id=[])
    assert init_sizes == [11 + 30] and allocations == []
