"""glm4rt.sampling against transformers' generate(): the same processors in the same order with the
same float32 results, a sampler whose draws follow softmax(processed scores), and the validation.

Tests that compare with transformers take the ``hf`` fixture (importorskip torch/transformers); the
others never import torch."""
import math
import warnings
import zlib

import numpy as np
import pytest

from glm4rt.errors import ConfigError
from glm4rt.sampling import SamplingParams, _processors, process_logits, select_next

VOCAB = 1000
BATCH = 4
SEQ = 64


# ---- inputs ---------------------------------------------------------------------------------------

def _logits(case: str) -> np.ndarray:
    """[BATCH, VOCAB] float32 next-token logits of one named kind."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    normal = rng.standard_normal((BATCH, VOCAB))
    if case == "normal":
        x = 3.0 * normal
    elif case == "large":  # very peaked: top-p / min-p keep one or two tokens
        x = 300.0 * normal
    elif case == "small":  # nearly flat: top-p 0.5 keeps about half the vocabulary
        x = 1e-3 * normal
    elif case == "ties":  # half-integers: every value is shared by dozens of tokens
        x = np.round(4.0 * normal) / 2.0
    elif case == "masked":  # 30% already -inf (as after a constraint)
        x = 3.0 * normal
        x[rng.random(x.shape) < 0.3] = -np.inf
    elif case == "mixed_rows":  # a different regime in each row of one batch
        x = normal * np.array([[1e-2], [1.0], [30.0], [1e4]])
    else:
        raise KeyError(case)
    return x.astype(np.float32)


LOGIT_CASES = ["normal", "large", "small", "ties", "masked", "mixed_rows"]


def _input_ids(scores: np.ndarray) -> np.ndarray:
    """[BATCH, SEQ] int64 history with repeats, containing each row's current top token (so the
    penalty moves the argmax) and, in row 0, an id past the head's vocabulary (ignored by HF)."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ))
    ids[:, SEQ // 2:] = ids[:, :SEQ - SEQ // 2]  # every early token repeats
    ids[:, 5] = np.argmax(scores, axis=-1)
    ids[0, 9] = VOCAB + 3
    return ids.astype(np.int64)


def _left_padded(ids: np.ndarray):
    """Rows 1 and 3 left-padded with pad id 0 (absent elsewhere): the penalty must skip it."""
    ids = np.where(ids == 0, 1, ids)
    mask = np.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :3] = 0
    ids = np.where(mask == 0, 0, ids)
    return ids, mask


# generation_config fields; unset fields take generate()'s defaults (note top_k=50).
SETTINGS = [
    {},                                                  # greedy, nothing to do
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"do_sample": False, "temperature": 0.7, "top_k": 5, "top_p": 0.5, "min_p": 0.2,
     "repetition_penalty": 1.3},                         # greedy: the warpers are skipped
    {"do_sample": True},                                 # the default top-50
    {"do_sample": True, "top_k": 0},                     # nothing at all
    {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "min_p": 0.0},  # no-ops
    {"do_sample": True, "top_k": 0, "temperature": 0.7},
    {"do_sample": True, "top_k": 0, "temperature": 1.3},
    {"do_sample": True, "top_k": 1},
    {"do_sample": True, "top_k": 5},
    {"do_sample": True, "top_k": 50},
    {"do_sample": True, "top_k": 0, "top_p": 0.5},
    {"do_sample": True, "top_k": 0, "top_p": 0.9},
    {"do_sample": True, "top_k": 0, "min_p": 0.05},
    {"do_sample": True, "top_k": 0, "min_p": 0.2},
    {"do_sample": True, "top_k": 0, "repetition_penalty": 1.3},
    {"do_sample": True, "top_k": 0, "repetition_penalty": 0.8},
    {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9},
    {"do_sample": True, "temperature": 1.3, "top_k": 0, "top_p": 0.5, "min_p": 0.05},
    {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 0.8},
    {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.2,
     "repetition_penalty": 1.3},
    {"do_sample": True, "temperature": 0.7, "top_k": 1, "top_p": 0.5, "min_p": 0.2,
     "repetition_penalty": 1.3},
]


def _sid(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


# ---- transformers, built the way generate() builds it ----------------------------------------------

@pytest.fixture(scope="module")
def hf():
    """A callable (settings, scores, input_ids, attention_mask) -> (processed scores, processor
    names) that runs the LogitsProcessorList generate() would build, from a real (tiny) GLM-4."""
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch")
    transformers = pytest.importorskip("transformers", reason="the oracle needs transformers")
    config = transformers.Glm4Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, pad_token_id=0)
    model = transformers.Glm4ForCausalLM(config).eval()

    def run(settings, scores, input_ids, attention_mask=None):
        if attention_mask is None:  # what generate() makes when no mask (and no pad) is present
            attention_mask = np.ones_like(input_ids)
        ids = torch.from_numpy(input_ids)
        with warnings.catch_warnings():  # greedy + sampling flags warns; that is the point here
            warnings.simplefilter("ignore")
            generation_config, _ = model._prepare_generation_config(
                transformers.GenerationConfig(**settings))
            processors = model._get_logits_processor(
                generation_config=generation_config, input_ids_seq_length=ids.shape[1],
                encoder_input_ids=ids, device="cpu",
                model_kwargs={"attention_mask": torch.from_numpy(attention_mask)})
        out = processors(ids, torch.from_numpy(scores.copy()))
        return out.numpy(), [type(p).__name__ for p in processors]

    return run


def _assert_same_scores(ours, theirs, tie_swaps_allowed=False):
    """Same -inf positions and finite values to 1e-6 relative.

    With ``tie_swaps_allowed`` a row may differ in WHICH tokens of one group of equal scores were
    removed (torch's unstable sort orders ties arbitrarily at the top-p cut), provided it removed
    as many."""
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    assert ours.shape == theirs.shape
    assert not np.isnan(ours).any() and not np.isnan(theirs).any()
    ours_out, theirs_out = np.isneginf(ours), np.isneginf(theirs)
    for row in np.flatnonzero((ours_out != theirs_out).any(axis=-1)):
        assert tie_swaps_allowed, f"row {row}: -inf at different tokens " \
            f"{np.flatnonzero(ours_out[row] != theirs_out[row])[:10]}"
        assert ours_out[row].sum() == theirs_out[row].sum(), f"row {row}: kept counts differ"
        swapped = np.concatenate([ours[row][theirs_out[row] & ~ours_out[row]],
                                  theirs[row][ours_out[row] & ~theirs_out[row]]])
        assert np.all(swapped == swapped[0]), f"row {row}: swapped tokens are not tied: {swapped}"
    both = ~ours_out & ~theirs_out
    np.testing.assert_allclose(ours[both], theirs[both], rtol=1e-6, atol=0)


# ---- exactness against transformers ---------------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS, ids=_sid)
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_process_logits_matches_transformers(hf, case, settings):
    scores = _logits(case)
    ids = _input_ids(scores)
    params = SamplingParams.from_generation_config(settings)

    theirs, names = hf(settings, scores, ids)
    ours = process_logits(scores, ids, params)

    assert [name for name, _ in _processors(params)] == names
    # Only a top-p cut can fall inside a group of tied scores (top-k keeps all ties, min-p is a
    # plain threshold); only there may the two sorts pick different members of the group.
    _assert_same_scores(ours, theirs, tie_swaps_allowed=(case == "ties"
                                                         and "TopPLogitsWarper" in names))


@pytest.mark.parametrize("settings", [
    {"repetition_penalty": 1.3},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 0.8},
], ids=_sid)
def test_left_padding_is_not_penalised_like_transformers(hf, settings):
    scores = _logits("normal")
    ids, mask = _left_padded(_input_ids(scores))
    params = SamplingParams.from_generation_config(settings)

    theirs, _ = hf(settings, scores, ids, mask)
    ours = process_logits(scores, ids, params, attention_mask=mask)

    _assert_same_scores(ours, theirs)
    # The pad id 0 occurs only in the padding of rows 1 and 3: with the mask it escapes the penalty,
    # without it it would not.
    penalty = SamplingParams(repetition_penalty=params.repetition_penalty)
    masked = process_logits(scores, ids, penalty, attention_mask=mask)
    plain = process_logits(scores, ids, penalty)
    assert (masked[:, 0] == scores[:, 0]).all()
    assert (plain[[1, 3], 0] != scores[[1, 3], 0]).all()


@pytest.mark.parametrize("settings", [
    {"do_sample": True, "top_k": 0, "top_p": 0.5},
    {"do_sample": True, "temperature": 1.3, "top_k": 0, "top_p": 0.9, "min_p": 0.05},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3},
], ids=_sid)
def test_process_logits_matches_transformers_at_glm4_vocab_size(hf, settings):
    # 151552 tokens of nearly flat logits: thousands of tokens sit near the top-p cut, so the
    # float64 accumulation of torch's CPU cumsum (not a float32 cumsum) decides which survive.
    rng = np.random.default_rng(11)
    scores = (0.3 * rng.standard_normal((2, 151552))).astype(np.float32)
    ids = rng.integers(0, 151552, (2, 300)).astype(np.int64)
    params = SamplingParams.from_generation_config(settings)

    theirs, _ = hf(settings, scores, ids)
    _assert_same_scores(process_logits(scores, ids, params), theirs)


def test_processor_order_for_everything(hf):
    settings = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.2,
                "repetition_penalty": 1.3}
    scores = _logits("normal")
    _, names = hf(settings, scores, _input_ids(scores))
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper",
                     "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]


# ---- the sampler's distribution -------------------------------------------------------------------

N_DRAWS = 20000
STAT_SETTINGS = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9,
                 "repetition_penalty": 1.3}


def _softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _tv(p, q):
    return 0.5 * np.abs(p - q).sum()


def _tv_tolerance(k, n, failure=1e-6):
    """A TV bound a correct sampler exceeds with probability < ``failure``.

    For the empirical distribution of n draws over k outcomes, E|p̂_i - p_i| <= sqrt(p_i / n), so
    by Cauchy-Schwarz E[TV] <= 0.5 * sum_i sqrt(p_i / n) <= 0.5 * sqrt(k / n). One draw moves TV by
    at most 1/n, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2); t = sqrt(ln(1/failure)/(2n)).
    Here k = 18 kept tokens, n = 20000: 0.015 + 0.019 = 0.034 (the draws give 0.012)."""
    return 0.5 * math.sqrt(k / n) + math.sqrt(math.log(1.0 / failure) / (2.0 * n))


def _stat_inputs():
    rng = np.random.default_rng(1234)
    scores = (2.0 * rng.standard_normal((1, VOCAB))).astype(np.float32)  # [1, VOCAB]
    ids = rng.integers(0, VOCAB, (1, 32)).astype(np.int64)
    ids[0, 0] = np.argmax(scores)
    return scores, ids


def _empirical(processed: np.ndarray, params: SamplingParams, seed: int) -> np.ndarray:
    """Frequencies of N_DRAWS draws of select_next on the one-row ``processed``: [VOCAB]."""
    rng = np.random.default_rng(seed)
    chunk = 2000
    rows = np.repeat(processed, chunk, axis=0)  # [chunk, VOCAB]
    draws = np.concatenate([select_next(rows, params, rng) for _ in range(N_DRAWS // chunk)])
    return np.bincount(draws, minlength=VOCAB) / N_DRAWS


def test_sampling_follows_softmax_of_processed_scores():
    scores, ids = _stat_inputs()
    params = SamplingParams.from_generation_config(STAT_SETTINGS)
    processed = process_logits(scores, ids, params)  # [1, VOCAB]
    kept = np.isfinite(processed[0])
    k = int(kept.sum())
    assert 5 <= k <= 50

    freq = _empirical(processed, params, seed=0)
    target = _softmax64(processed)[0]
    tolerance = _tv_tolerance(k, N_DRAWS)

    assert freq[~kept].sum() == 0  # filtered tokens are never drawn
    assert _tv(freq, target) < tolerance
    # The test has power: the unprocessed distribution (the obvious bug) is far outside it.
    assert _tv(freq, _softmax64(scores)[0]) > 2 * tolerance


def test_sampling_distribution_matches_transformers(hf):
    scores, ids = _stat_inputs()
    params = SamplingParams.from_generation_config(STAT_SETTINGS)
    processed = process_logits(scores, ids, params)
    theirs, _ = hf(STAT_SETTINGS, scores, ids)
    hf_probs = _softmax64(theirs)[0]  # what torch.multinomial draws from in _sample

    np.testing.assert_allclose(_softmax64(processed)[0], hf_probs, rtol=1e-5, atol=1e-9)
    freq = _empirical(processed, params, seed=0)
    assert _tv(freq, hf_probs) < _tv_tolerance(int(np.isfinite(theirs).sum()), N_DRAWS)


# ---- the sampler's other promises -----------------------------------------------------------------

def test_top_k_1_sampling_equals_greedy():
    scores = _logits("normal")  # continuous values: no ties at the top
    ids = _input_ids(scores)
    sample = SamplingParams(do_sample=True, top_k=1, temperature=0.7, repetition_penalty=1.3)
    greedy = SamplingParams(do_sample=False, repetition_penalty=1.3)
    expected = select_next(process_logits(scores, ids, greedy), greedy)
    processed = process_logits(scores, ids, sample)
    assert (np.isfinite(processed).sum(axis=-1) == 1).all()
    for seed in range(20):
        np.testing.assert_array_equal(
            select_next(processed, sample, np.random.default_rng(seed)), expected)


def test_greedy_takes_the_first_maximum():
    scores = np.array([[1.0, 3.0, 3.0, 2.0], [-np.inf, -np.inf, 0.5, 0.5],
                       [-np.inf] * 4], dtype=np.float32)
    tokens = select_next(scores, SamplingParams())
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, [1, 2, 0])  # torch.argmax gives the same


def _decode(params, seed, steps=200):
    """Tokens of ``steps`` draws, each step on fresh logits, with one generator: [steps, BATCH]."""
    rng_logits = np.random.default_rng(99)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scores = (2.0 * rng_logits.standard_normal((BATCH, VOCAB))).astype(np.float32)
        ids = rng_logits.integers(0, VOCAB, (BATCH, 16))
        out.append(select_next(process_logits(scores, ids, params), params, rng))
    return np.stack(out)


def test_same_seed_same_tokens_different_seeds_differ():
    params = SamplingParams(do_sample=True, temperature=1.3, top_p=0.9)
    first = _decode(params, seed=5)
    np.testing.assert_array_equal(first, _decode(params, seed=5))
    others = [_decode(params, seed=s) for s in range(6, 12)]
    sequences = {first.tobytes()} | {o.tobytes() for o in others}
    assert len(sequences) == 7  # 800 draws over >= 2 tokens each: collisions are ~impossible


def test_filtered_tokens_are_never_sampled():
    params = SamplingParams(do_sample=True, temperature=1.3, top_k=5, top_p=0.9, min_p=0.05)
    scores = _logits("small")  # flat: the filters, not the shape, decide what survives
    processed = process_logits(scores, _input_ids(scores), params)
    rng = np.random.default_rng(3)
    rows = np.tile(processed, (500, 1))  # [500 * BATCH, VOCAB]
    for _ in range(10):
        tokens = select_next(rows, params, rng)
        assert np.isfinite(rows[np.arange(len(rows)), tokens]).all()


@pytest.mark.parametrize("survivor", [0, 417, VOCAB - 1])
def test_a_single_finite_token_is_always_chosen(survivor):
    scores = np.full((3, VOCAB), -np.inf, dtype=np.float32)
    scores[:, survivor] = [-1e30, 0.0, 88.0]
    params = SamplingParams(do_sample=True)
    rng = np.random.default_rng(0)
    for _ in range(200):
        np.testing.assert_array_equal(select_next(scores, params, rng), survivor)
    np.testing.assert_array_equal(select_next(scores, SamplingParams()), survivor)
    processed = process_logits(scores, np.zeros((3, 1), np.int64), SamplingParams(
        do_sample=True, temperature=0.5, top_p=0.5, min_p=0.9, repetition_penalty=1.2))
    np.testing.assert_array_equal(np.isfinite(processed), np.isfinite(scores))


def test_sampling_refuses_rows_without_a_finite_score():
    scores = np.zeros((2, 8), dtype=np.float32)
    scores[1] = -np.inf
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        select_next(scores, SamplingParams(do_sample=True), np.random.default_rng(0))
    scores[1] = 0.0
    scores[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        select_next(scores, SamplingParams(do_sample=True), np.random.default_rng(0))
    with pytest.raises(ValueError, match="Generator"):
        select_next(np.zeros((1, 8), np.float32), SamplingParams(do_sample=True), None)


def test_process_logits_leaves_its_input_alone_and_returns_float32():
    scores = _logits("normal").astype(np.float64)
    before = scores.copy()
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3)
    out = process_logits(scores, _input_ids(scores), params)
    assert out.dtype == np.float32 and out.shape == scores.shape
    np.testing.assert_array_equal(scores, before)
    # greedy with no penalty is the identity
    np.testing.assert_array_equal(process_logits(scores, _input_ids(scores), SamplingParams()),
                                  scores.astype(np.float32))


def test_repetition_penalty_semantics():
    scores = np.array([[2.0, -2.0, 0.0, 4.0, -np.inf]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 4, 0, 9]])  # 9 is past the vocabulary: ignored
    out = process_logits(scores, ids, SamplingParams(repetition_penalty=2.0))
    np.testing.assert_array_equal(out, [[1.0, -4.0, 0.0, 4.0, -np.inf]])


# ---- parameters and validation ---------------------------------------------------------------------

def test_defaults_are_generate_defaults():
    assert SamplingParams() == SamplingParams(do_sample=False, temperature=1.0, top_k=50,
                                              top_p=1.0, min_p=None, repetition_penalty=1.0)
    assert SamplingParams.from_generation_config({}) == SamplingParams()


def test_from_generation_config_reads_a_glm4_file():
    glm4_chat = {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
                 "do_sample": True, "temperature": 0.8, "max_length": 128000, "top_p": 0.8,
                 "top_k": None, "transformers_version": "4.44.0"}
    params = SamplingParams.from_generation_config(glm4_chat)
    assert params == SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.8)
    assert [name for name, _ in _processors(params)] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    # inactive values of unsupported features are fine
    SamplingParams.from_generation_config({"num_beams": 1, "typical_p": 1.0, "min_length": 0,
                                           "no_repeat_ngram_size": 0, "bad_words_ids": None})


@pytest.mark.parametrize("field", [{"num_beams": 4}, {"typical_p": 0.9},
                                   {"no_repeat_ngram_size": 3}, {"suppress_tokens": [1, 2]},
                                   {"min_new_tokens": 5}, {"epsilon_cutoff": 3e-4}])
def test_from_generation_config_refuses_what_it_cannot_do(field):
    with pytest.raises(ConfigError, match=next(iter(field))):
        SamplingParams.from_generation_config({"do_sample": True, **field})


@pytest.mark.parametrize("kwargs, message", [
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when do_sample"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.01), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=-1.3), "repetition_penalty"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k="5"), "top_k"),
    (dict(do_sample="yes"), "do_sample"),
    # strings are not parsed (float("0.7") used to let them through)
    (dict(temperature="0.7"), "temperature must be a number, got '0.7'"),
    (dict(do_sample=True, temperature=[1.0]), r"temperature must be a number, got \[1.0\]"),
    (dict(top_p="0.5"), r"top_p must be in \(0, 1\] \(1.0 disables it\), got '0.5'"),
    (dict(min_p="0.1"), "min_p must be in .* got '0.1'"),
    (dict(repetition_penalty="1.1"), "repetition_penalty must be > 0 .* got '1.1'"),
    (dict(repetition_penalty=True), "repetition_penalty must be > 0 .* got True"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_generation_config(kwargs)


def test_greedy_ignores_temperature():
    # generate() only warns about sampling flags in greedy mode; temperature 0 is common there.
    assert SamplingParams(do_sample=False, temperature=0.0).temperature == 0.0
    assert SamplingParams(top_k=5.0).top_k == 5


@pytest.mark.parametrize("bad", [
    dict(scores=np.zeros(8, np.float32), input_ids=np.zeros((1, 2), np.int64)),
    dict(scores=np.zeros((2, 8), np.float32), input_ids=np.zeros((1, 2), np.int64)),
    dict(scores=np.zeros((1, 8), np.float32), input_ids=np.zeros((1, 2), np.float32)),
    dict(scores=np.zeros((1, 8), np.float32), input_ids=-np.ones((1, 2), np.int64)),
    dict(scores=np.zeros((1, 8), np.float32), input_ids=np.zeros((1, 2), np.int64),
         attention_mask=np.ones((1, 3))),
])
def test_process_logits_checks_its_arguments(bad):
    with pytest.raises(ValueError):
        process_logits(params=SamplingParams(repetition_penalty=1.1), **bad)


def test_generation_defaults_are_transformers_defaults():
    """The one table of what an unset generation field means, against transformers itself."""
    from transformers import GenerationConfig

    from glm4rt.sampling import GENERATION_DEFAULTS

    theirs = GenerationConfig()._get_default_generation_params()
    assert GENERATION_DEFAULTS == {k: theirs.get(k) for k in GENERATION_DEFAULTS}
    assert "min_p" not in theirs  # transformers leaves min_p unset (None): no min-p filtering
