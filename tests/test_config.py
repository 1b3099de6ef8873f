"""Glm4Config: transformers' fields and defaults, both config.json dialects, round trips, and
clear errors for settings glm4rt does not compute."""
import json
import os

import pytest

import glm4rt
from conftest import fixture_dir
from glm4rt import ConfigError, Glm4Config

ISSUE_DEFAULTS = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
    num_attention_heads=32, num_key_value_heads=2, partial_rotary_factor=0.5, head_dim=128,
    hidden_act="silu", attention_dropout=0.0, max_position_embeddings=131072, initializer_range=0.02,
    rms_norm_eps=1.5625e-07, use_cache=True, tie_word_embeddings=False, rope_theta=10000.0,
    pad_token_id=151329, eos_token_id=[151329, 151336, 151338], bos_token_id=None, attention_bias=True)


def test_defaults():
    c = Glm4Config()
    for key, value in ISSUE_DEFAULTS.items():
        assert getattr(c, key) == value, key
    assert c.num_labels == 2 and c.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1} and c.problem_type is None
    assert c.rotary_dim == 64


def _write(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_both_dialects_load_identically(tmp_path):
    official = {"model_type": "glm4", "hidden_size": 64, "rope_theta": 2500.0,
                "partial_rotary_factor": 0.75, "torch_dtype": "bfloat16", "head_dim": 16,
                "num_attention_heads": 4, "num_key_value_heads": 2}
    v5 = {"model_type": "glm4", "hidden_size": 64, "head_dim": 16, "num_attention_heads": 4,
          "num_key_value_heads": 2, "dtype": "bfloat16",
          "rope_parameters": {"rope_theta": 2500.0, "partial_rotary_factor": 0.75, "rope_type": "default"}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Glm4Config.from_pretrained(_write(tmp_path / "a", official))
    b = Glm4Config.from_pretrained(_write(tmp_path / "b", v5))
    assert a.rope_theta == b.rope_theta == 2500.0
    assert a.partial_rotary_factor == b.partial_rotary_factor == 0.75
    assert a.dtype == b.dtype == "bfloat16"
    assert a.to_dict() == b.to_dict()


def test_missing_partial_rotary_factor_means_half(tmp_path):
    c = Glm4Config.from_pretrained(_write(tmp_path, {"model_type": "glm4", "rope_theta": 10000.0}))
    assert c.partial_rotary_factor == 0.5


def test_fixture_configs():
    official = Glm4Config.from_pretrained(fixture_dir("gqa8_bf16_sharded"))
    assert official.rope_theta == 2500.0 and official.dtype == "bfloat16"
    v5 = Glm4Config.from_pretrained(fixture_dir("gqa2_nobias_tied_v5"))
    assert v5.partial_rotary_factor == 0.75 and v5.rope_theta == 500.0 and v5.rotary_dim == 18
    assert v5.tie_word_embeddings is True and v5.attention_bias is False


def test_round_trip(tmp_path):
    c = Glm4Config(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=1,
                   rope_theta=123.0, partial_rotary_factor=0.25, id2label={0: "neg", 1: "neu", 2: "pos"},
                   problem_type="single_label_classification", custom_field=[1, 2])
    path = c.save_pretrained(tmp_path)
    assert os.path.basename(path) == "config.json"
    data = json.loads(open(path).read())
    assert data["rope_parameters"] == {"rope_theta": 123.0, "partial_rotary_factor": 0.25, "rope_type": "default"}
    assert data["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    back = Glm4Config.from_pretrained(tmp_path)
    assert back == c and back.num_labels == 3 and back.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert back.custom_field == [1, 2]


def test_overrides(tmp_path):
    Glm4Config(id2label={0: "a", 1: "b"}).save_pretrained(tmp_path)
    c = Glm4Config.from_pretrained(tmp_path, num_labels=4, problem_type="multi_label_classification")
    assert c.num_labels == 4 and c.id2label[3] == "LABEL_3"
    assert c.problem_type == "multi_label_classification"
    c = Glm4Config.from_pretrained(tmp_path, rope_theta=99.0)
    assert c.rope_theta == 99.0
    c.num_labels = 1
    assert c.id2label == {0: "LABEL_0"} and c.label2id == {"LABEL_0": 0}


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}), "linear"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple"),
    (dict(head_dim=10, partial_rotary_factor=0.3), "even"),
    (dict(head_dim=512), "head_dim=512 is larger than 256"),
    (dict(problem_type="ranking"), "problem_type"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_unsupported_settings_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Glm4Config(**kwargs)


def test_rope_scaling_none_or_default_is_fine():
    assert Glm4Config(rope_scaling=None).rope_theta == 10000.0
    assert Glm4Config(rope_scaling={"rope_type": "default"}).rope_theta == 10000.0


def test_wrong_model_type_and_bad_json(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="chatglm"):
        Glm4Config.from_pretrained(_write(tmp_path / "a", {"model_type": "chatglm"}))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Glm4Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Glm4Config.from_pretrained(tmp_path / "nowhere")


def test_public_api_exports():
    for name in ("Glm4Config", "Glm4Model", "Glm4ForCausalLM", "Glm4ForSequenceClassification",
                 "Glm4ForTokenClassification", "Glm4Cache", "cpu_isa", "set_num_threads"):
        assert hasattr(glm4rt, name)
    assert glm4rt.cpu_isa() in glm4rt.supported_isas()
