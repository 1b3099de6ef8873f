"""Live comparison with transformers: fresh random checkpoints built and evaluated by transformers
in this run (other seeds than the committed fixtures), then checked with the same golden checks.
Needs torch==2.13.0 + transformers (pip install .[test]); .ci/run installs them."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the live oracle needs torch (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="the live oracle needs transformers")

import glm4rt  # noqa: E402
import hf_reference  # noqa: E402
from golden_checks import check_all, close  # noqa: E402


@pytest.mark.parametrize("name", sorted(hf_reference.GEOMETRIES))
def test_fresh_checkpoint_matches_transformers(tmp_path, name):
    seed = 100 + sorted(hf_reference.GEOMETRIES).index(name)
    hf_reference.build_checkpoint(str(tmp_path), name, seed=seed)
    g = hf_reference.goldens(str(tmp_path), name, seed=seed)
    check_all(str(tmp_path), hf_reference.GEOMETRIES[name]["head"], g)


def test_config_defaults_match_transformers():
    ours, theirs = glm4rt.Glm4Config(), transformers.Glm4Config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "attention_dropout", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "use_cache", "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
                "attention_bias", "num_labels", "id2label", "label2id", "problem_type"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"]


def test_transformers_reads_our_config(tmp_path):
    ours = glm4rt.Glm4Config(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                             rope_theta=321.0, partial_rotary_factor=0.25, id2label={0: "x", 1: "y", 2: "z"},
                             attention_bias=False, tie_word_embeddings=True)
    ours.save_pretrained(tmp_path)
    theirs = transformers.Glm4Config.from_pretrained(tmp_path)
    assert theirs.rope_parameters["rope_theta"] == 321.0
    assert theirs.rope_parameters["partial_rotary_factor"] == 0.25
    assert theirs.id2label == {0: "x", 1: "y", 2: "z"} and theirs.num_labels == 3
    assert theirs.attention_bias is False and theirs.tie_word_embeddings is True
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "glm4"


def test_long_prompt_and_decode_match_transformers(tmp_path):
    """60 tokens of prefill + decode to the 64-position limit, against transformers' cache path."""
    hf_reference.build_checkpoint(str(tmp_path), "gqa1_official", seed=7)
    ref = hf_reference.load_reference(str(tmp_path), "causal")
    ids = np.random.default_rng(7).integers(1, ref.config.vocab_size, size=(1, 64))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    model = glm4rt.Glm4ForCausalLM.from_pretrained(str(tmp_path), dtype="float32")
    out = model(ids[:, :60])
    steps = [out.logits]
    for t in range(60, 64):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    close(np.concatenate(steps, axis=1), expected, "60-token prefill + 4 decode steps")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids[:, :1], past_key_values=out.past_key_values)


def test_newly_initialised_head_statistics_follow_transformers(tmp_path):
    hf_reference.build_checkpoint(str(tmp_path), "gqa1_official", seed=3)
    with pytest.warns(UserWarning, match="score.weight"):
        ours = glm4rt.Glm4ForSequenceClassification.from_pretrained(str(tmp_path), num_labels=7, seed=0)
    theirs = transformers.Glm4ForSequenceClassification.from_pretrained(str(tmp_path), num_labels=7)
    assert ours.score.weight.shape == tuple(theirs.score.weight.shape)
    # Both draw normal(0, initializer_range): compare the spreads (not the values).
    assert abs(ours.score.weight.std() - theirs.score.weight.detach().numpy().std()) < 0.006


def test_fresh_checkpoint_greedy_generation_matches_transformers(tmp_path):
    hf_reference.build_checkpoint(str(tmp_path), "generation", seed=321)
    ref = hf_reference.load_reference(str(tmp_path), "causal")
    g = hf_reference.generation_goldens(ref, np.random.default_rng(321))
    model = glm4rt.Glm4ForCausalLM.from_pretrained(str(tmp_path), dtype="float32")
    np.testing.assert_array_equal(model.generate(g["gen_prompt"], max_new_tokens=64), g["gen_greedy"])
    np.testing.assert_array_equal(
        model.generate(g["gen_batch_ids"], attention_mask=g["gen_batch_mask"], max_new_tokens=64),
        g["gen_batch_out"])
    np.testing.assert_array_equal(
        model.generate(g["gen_batch_ids"], attention_mask=g["gen_batch_mask"], max_new_tokens=64,
                       eos_token_id=[int(g["gen_stop_id"])]), g["gen_stop_out"])


def test_repetition_penalty_on_left_padded_batch_matches_transformers(tmp_path):
    hf_reference.build_checkpoint(str(tmp_path), "generation", seed=322)
    ref = hf_reference.load_reference(str(tmp_path), "causal")
    ids, mask = hf_reference.padded_batch(np.random.default_rng(4), ref.config.vocab_size, [10, 6, 3], left=True)
    with torch.no_grad():
        expected = ref.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=32,
                                do_sample=False, repetition_penalty=1.3, pad_token_id=0, eos_token_id=[]).numpy()
    model = glm4rt.Glm4ForCausalLM.from_pretrained(str(tmp_path), dtype="float32")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=32, repetition_penalty=1.3, eos_token_id=[])
    np.testing.assert_array_equal(out, expected)
