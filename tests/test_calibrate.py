"""GPTQ rounding of q4k weights with calibration text (glm4rt.calibrate, `glm4rt quantize
--calibration`): the error it minimises (the product's, on the calibration inputs) against plain
rounding on the same grid, and on the demo model's text against the float model."""
import os
import subprocess

import numpy as np
import pytest

import glm4rt
from glm4rt import calibrate, ops
from glm4rt.quant import format_id, quantize_weight
from helpers import glm4rt_command

Q4K = format_id("q4k")
CALIBRATION = os.path.join(glm4rt.DEMO_MODEL, "calibration.txt")


def _correlated_inputs(rng, n_tokens, k):
    """Activations with correlated features and a few large ones, as a trained model's are."""
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((n_tokens, k)) @ mix * np.exp(rng.standard_normal(k))
    return x.astype(np.float32)


@pytest.mark.parametrize("n, k", [(48, 256), (37, 300)])
def test_gptq_lowers_the_product_error_on_the_same_grid(n, k):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = _correlated_inputs(rng, 2048, k)
    h = x.T.astype(np.float64) @ x / len(x)
    gptq = calibrate.gptq_q4k(w, h)
    rtn = quantize_weight(w, "q4k", np.diag(h).astype(np.float32))  # the grid GPTQ starts from
    for a, b in zip(calibrate.unpack_q4k_grid(gptq, n, k), calibrate.unpack_q4k_grid(rtn, n, k)):
        np.testing.assert_array_equal(a, b)
    err = {name: np.mean((x @ (ops.dequantize(p, Q4K, n, k) - w).T) ** 2) for name, p in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < 0.8 * err["rtn"], err  # measured 0.72 and 0.69


def test_gptq_edge_cases():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    x[:, 5] = 0.0  # a feature the calibration never saw
    out = ops.dequantize(calibrate.gptq_q4k(w, x.T @ x / 100), Q4K, 16, 64)
    assert np.isfinite(out).all() and np.abs(out - w).max() < 1.0
    bits = ops.f32_to_bf16(w)
    np.testing.assert_array_equal(calibrate.gptq_q4k(bits, x.T @ x / 100), calibrate.gptq_q4k(ops.bf16_to_f32(bits), x.T @ x / 100))
    with pytest.raises(ValueError, match="hessian"):
        calibrate.gptq_q4k(w, np.eye(63))
    with pytest.raises(ValueError, match="hessian"):
        calibrate.gptq_q4k(w, np.full((64, 64), np.nan))


def _kl_to_float(model, reference, windows):
    kl = n = 0
    for ids in windows:
        p = reference(ids).logits[0].astype(np.float64)
        q = model(ids).logits[0].astype(np.float64)
        lp = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
        lq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
        kl += (np.exp(lp) * (lp - lq)).sum()
        n += len(p)
    return kl / n


def test_demo_model_calibrated_q4k_beats_plain_rounding(tmp_path):
    """Calibrated on the first 12k tokens of the demo's calibration text, measured on its last 4k."""
    text = open(CALIBRATION, encoding="utf-8").read()
    tok = glm4rt.Glm4Tokenizer.from_pretrained(glm4rt.DEMO_MODEL)
    ids = tok.encode(text)
    held_out = [np.array([ids[i:i + 512]]) for i in range(len(ids) - 4096, len(ids) - 511, 512)]
    reference = glm4rt.Glm4ForCausalLM.from_pretrained(glm4rt.DEMO_MODEL, dtype="float32")
    gptq = calibrate.quantize_gptq(glm4rt.DEMO_MODEL, text, max_tokens=12288)
    rtn = glm4rt.Glm4ForCausalLM.from_pretrained(glm4rt.DEMO_MODEL, quantization="q4k")
    kl = {"gptq": _kl_to_float(gptq, reference, held_out), "rtn": _kl_to_float(rtn, reference, held_out)}
    assert kl["gptq"] < 0.7 * kl["rtn"], kl

    r = subprocess.run(glm4rt_command("quantize", glm4rt.DEMO_MODEL, str(tmp_path / "q"), "--format", "q4k",
                                      "--calibration", CALIBRATION, "--calibration-tokens", "12288"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "q4k" in r.stdout and "calibration: lm_head done" in r.stderr
    saved = glm4rt.Glm4ForCausalLM.from_pretrained(tmp_path / "q")
    assert saved.config.quantization_config["format"] == "q4k"
    assert _kl_to_float(saved, reference, held_out) < 0.7 * kl["rtn"]
    bad = subprocess.run(glm4rt_command("quantize", glm4rt.DEMO_MODEL, str(tmp_path / "r"), "--format", "int4",
                                        "--calibration", CALIBRATION), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--calibration rounds q4k" in bad.stderr and "Traceback" not in bad.stderr
