"""The usage examples of transformers' Glm4 docs, adapted to NumPy (token ids stand in for the
tokenizer, which arrives with the generation issue). Each loss is checked against the formula
computed here, independently, from the returned logits."""
import numpy as np
import pytest

from conftest import fixture_dir, golden
from glm4rt import (Glm4Config, Glm4ForCausalLM, Glm4ForSequenceClassification,
                    Glm4ForTokenClassification, Glm4Model)


def _log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_config_to_model():
    # >>> configuration = Glm4Config()  (a small one: the default geometry is the 9B model)
    configuration = Glm4Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Glm4Model(configuration)
    assert model.config is configuration
    params = model.named_parameters()
    assert params["model.layers.0.self_attn.q_proj.weight"].std() == pytest.approx(0.02, rel=0.1)
    assert np.all(params["model.norm.weight"] == 1.0)
    assert np.all(params["model.layers.1.self_attn.k_proj.bias"] == 0.0)
    out = model(np.array([[1, 2, 3]]))
    assert out.last_hidden_state.shape == (1, 3, 64)
    assert np.all(np.isfinite(out.last_hidden_state))


def test_causal_lm_example():
    model = Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"))
    ids = golden("gqa1_official")["ids"][:1]
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outputs = model(**inputs, labels=inputs["input_ids"])
    logits = outputs.logits
    logp = _log_softmax(logits[0, :-1])
    expected = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
    assert outputs.loss == pytest.approx(expected, rel=1e-5)


def test_single_label_sequence_classification_example():
    ckpt = fixture_dir("seqcls")
    model = Glm4ForSequenceClassification.from_pretrained(ckpt)
    inputs = {"input_ids": golden("seqcls")["ids"][:1]}
    logits = model(**inputs).logits
    predicted_class_id = int(logits.argmax())
    assert model.config.id2label[predicted_class_id] == f"LABEL_{predicted_class_id}"
    num_labels = len(model.config.id2label)
    model = Glm4ForSequenceClassification.from_pretrained(ckpt, num_labels=num_labels)
    labels = np.array([1])
    loss = model(**inputs, labels=labels).loss
    assert model.config.problem_type == "single_label_classification"  # inferred, as transformers does
    assert loss == pytest.approx(-_log_softmax(logits[0])[1], rel=1e-5)


def test_multi_label_sequence_classification_example():
    ckpt = fixture_dir("seqcls")
    model = Glm4ForSequenceClassification.from_pretrained(ckpt, problem_type="multi_label_classification")
    inputs = {"input_ids": golden("seqcls")["ids"][:1]}
    logits = model(**inputs).logits
    predicted_class_ids = np.arange(logits.shape[-1])[1 / (1 + np.exp(-logits[0])) > 0.5]
    num_labels = len(model.config.id2label)
    model = Glm4ForSequenceClassification.from_pretrained(
        ckpt, num_labels=num_labels, problem_type="multi_label_classification")
    labels = np.eye(num_labels)[predicted_class_ids].sum(0, keepdims=True).astype(np.float32)
    loss = model(**inputs, labels=labels).loss
    z = logits.astype(np.float64)
    expected = np.mean(np.log1p(np.exp(z)) - z * labels)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_token_classification_example():
    model = Glm4ForTokenClassification.from_pretrained(fixture_dir("tokcls"))
    inputs = {"input_ids": golden("tokcls")["ids"][:1]}
    logits = model(**inputs).logits
    predicted_token_class_ids = logits.argmax(-1)
    predicted_tokens_classes = [model.config.id2label[int(t)] for t in predicted_token_class_ids[0]]
    assert len(predicted_tokens_classes) == inputs["input_ids"].shape[1]
    labels = predicted_token_class_ids
    loss = model(**inputs, labels=labels).loss
    logp = _log_softmax(logits[0])
    assert loss == pytest.approx(-logp[np.arange(logp.shape[0]), labels[0]].mean(), rel=1e-5)
