"""Glm4Config: transformers' fields and defaults, both config.json dialects, round trips, and
clear errors for settings glm4rt does not compute."""
import json
import os
import re

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


# ---- every field type- and range-checked (issue 18) -------------------------------------------

GLM4_9B_0414 = {  # zai-org/GLM-4-9B-0414 config.json (GLM-Z1-9B-0414 has the same fields)
    "architectures": ["Glm4ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 32768,
    "model_type": "glm4", "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2,
    "pad_token_id": 151329, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
    "use_cache": True, "vocab_size": 151552}
GLM4_32B_0414 = dict(GLM4_9B_0414, hidden_size=6144, intermediate_size=23040, num_attention_heads=48,
                     num_hidden_layers=61)
GLM4_V5 = {k: v for k, v in GLM4_9B_0414.items() if k not in ("rope_theta", "partial_rotary_factor", "torch_dtype")}
GLM4_V5.update(dtype="bfloat16", transformers_version="5.24.0", max_position_embeddings=131072,
               rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"})


@pytest.mark.parametrize("data", [
    GLM4_9B_0414, GLM4_32B_0414, GLM4_V5,
    dict(GLM4_9B_0414, tie_word_embeddings=True, pad_token_id=None, eos_token_id=151329,
         bos_token_id=None, rope_scaling=None, head_dim=None),
    dict(GLM4_9B_0414, num_labels=3, problem_type="single_label_classification", rope_theta=10000,
         partial_rotary_factor=1, rms_norm_eps=0, attention_dropout=0.1),
], ids=["9b", "32b", "v5", "tied_lists", "classifier_ints"])
def test_real_configs_are_accepted(tmp_path, data):
    c = Glm4Config.from_pretrained(_write(tmp_path, data))
    assert c.vocab_size == 151552 and c.head_dim == 128 and c.rotary_dim in (64, 128)
    assert c.num_hidden_layers == data["num_hidden_layers"]


FIELD_CASES = [
    # the issue's examples
    ("rope_theta", float("nan")), ("rope_theta", 0), ("rope_theta", 1e-300), ("rope_theta", float("inf")),
    ("rope_theta", 0.5), ("rope_theta", 1e39), ("rope_theta", "10000"), ("rope_theta", None),
    ("rms_norm_eps", float("inf")), ("rms_norm_eps", 1e308), ("rms_norm_eps", -1e-5), ("rms_norm_eps", float("nan")),
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", [1e-5]),
    ("num_hidden_layers", 10**12), ("hidden_size", "48"), ("hidden_size", None), ("hidden_size", [48]),
    ("hidden_size", 48.0), ("hidden_size", True), ("vocab_size", -1), ("intermediate_size", 2**30),
    ("num_attention_heads", {}), ("num_key_value_heads", 0), ("head_dim", 0), ("head_dim", "128"),
    ("max_position_embeddings", 1.5),
    ("partial_rotary_factor", 0), ("partial_rotary_factor", 1.5), ("partial_rotary_factor", "0.5"),
    ("partial_rotary_factor", float("nan")),
    ("attention_dropout", 2.0), ("initializer_range", -0.02), ("initializer_range", "0.02"),
    ("use_cache", "yes"), ("tie_word_embeddings", 1), ("attention_bias", None),
    ("pad_token_id", "0"), ("pad_token_id", -1), ("pad_token_id", 1.0), ("pad_token_id", [1, 2]),
    ("bos_token_id", [1]), ("eos_token_id", [1, "2"]),
    ("eos_token_id", 2**31), ("bos_token_id", {"id": 1}),
    ("hidden_act", None), ("hidden_act", ["silu"]), ("problem_type", 3), ("dtype", 16), ("architectures", "Glm4"),
    ("rope_parameters", [10000.0]), ("rope_parameters", "default"), ("rope_scaling", "yarn"),
    ("rope_scaling", 4.0), ("quantization_config", "int4"), ("quantization_config", {"quant_method": "glm4rt"}),
    ("num_labels", "3"), ("num_labels", 0), ("num_labels", 10**12), ("id2label", [1, 2]), ("id2label", {"a": "x"}),
    ("id2label", {"0": 1}), ("label2id", ["a"]), ("label2id", {"a": "0"}),
    ("to_dict", 1), ("rotary_dim", 64),
]


@pytest.mark.parametrize("field, value", FIELD_CASES, ids=[f"{f}={v!r:.20}" for f, v in FIELD_CASES])
def test_bad_field_is_a_config_error_naming_it(tmp_path, field, value):
    data = dict(GLM4_9B_0414, **{field: value})
    with pytest.raises(ConfigError, match=re.escape(field)):
        Glm4Config(**data)
    path = _write(tmp_path, data) / "config.json"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + ".*" + re.escape(field)):
        Glm4Config.from_pretrained(tmp_path)


def test_nested_rope_values_are_checked():
    with pytest.raises(ConfigError, match=r"rope_theta must be a finite number in \[1, .*\], got nan"):
        Glm4Config(rope_parameters={"rope_theta": float("nan")})
    with pytest.raises(ConfigError, match=r"partial_rotary_factor must be a finite number in \(0, 1\], got 2"):
        Glm4Config.from_dict({"rope_parameters": {"partial_rotary_factor": 0.5}}, partial_rotary_factor=2)
    with pytest.raises(ConfigError, match="rope_parameters must be an object or null"):
        Glm4Config.from_dict({"rope_parameters": "x"}, rope_theta=5.0)


def test_num_labels_setter_is_checked():
    c = Glm4Config()
    with pytest.raises(ConfigError, match="num_labels"):
        c.num_labels = 10**12
    assert c.num_labels == 2


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_config_names_the_field(tmp_path, depth):
    text = '{"model_type": "glm4", "hidden_size": 64, "weird\\"key": ' + "[" * depth + "]" * depth + "}"
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f'{tmp_path / "config.json"}: field "weird\\"key" nests more '
                                                    "than 32 levels deep")):
        Glm4Config.from_pretrained(tmp_path)


def test_nesting_inside_strings_does_not_count(tmp_path):
    brackets = "[{" * 100
    _write(tmp_path, {"model_type": "glm4", "note": brackets, "deep": [[[[1]]]]})
    c = Glm4Config.from_pretrained(tmp_path)
    assert c.note == brackets and c.deep == [[[[1]]]]


@pytest.mark.parametrize("text, message", [
    ('{"hidden_size": ' + "9" * 5000 + "}", "is not valid JSON"),  # past Python's int digit limit
    ("\xff\xfe{}", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_unreadable_config_json(tmp_path, text, message):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}") + ".*" + message):
        Glm4Config.from_pretrained(tmp_path)
