"""Triangulation with an independent float64 NumPy forward: it agrees with transformers' goldens
(so the goldens and the architecture notes say the same thing), and glm4rt agrees with it on
longer sequences up to max_position_embeddings, for every causal fixture."""
import numpy as np
import pytest

import glm4rt
from conftest import fixture_dir, golden
from numpy_reference import forward_logits, load_float64

CAUSAL = ["gqa1_official", "gqa2_nobias_tied_v5", "gqa8_bf16_sharded"]


@pytest.mark.parametrize("name", CAUSAL)
def test_reference_agrees_with_transformers(name):
    cfg = glm4rt.Glm4Config.from_pretrained(fixture_dir(name))
    g = golden(name)
    w = load_float64(fixture_dir(name))
    for b in range(g["ids"].shape[0]):
        np.testing.assert_allclose(forward_logits(w, cfg, g["ids"][b]), g["logits"][b], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(forward_logits(w, cfg, g["ids"][b], g["offset_pos"][b]),
                                   g["offset_logits"][b], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CAUSAL)
def test_glm4rt_agrees_with_reference_on_full_context(name):
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), dtype="float32")
    cfg = model.config
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=cfg.max_position_embeddings)
    expected = forward_logits(load_float64(fixture_dir(name)), cfg, ids)
    np.testing.assert_allclose(model(ids[None]).logits[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("n_tokens", [1, 7, 40])  # decode-sized, dot-form and panel-form matmuls
def test_bf16_weights_compute_with_bf16_activations(isa, dtype, n_tokens):
    """bf16 matrices multiply bf16-rounded activations (fp32 sums) on every ISA: glm4rt matches
    the reference that rounds every matmul input, and not the one that does not."""
    name = "gqa8_bf16_sharded"
    glm4rt.set_isa(isa)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), dtype=dtype)
    cfg = model.config
    ids = np.random.default_rng(n_tokens).integers(0, cfg.vocab_size, size=n_tokens)
    w = load_float64(fixture_dir(name))
    rounded, exact = forward_logits(w, cfg, ids, bf16_inputs=True), forward_logits(w, cfg, ids)
    ours = model(ids[None]).logits[0]
    scale = np.abs(exact).max()
    # Medians, not maxima: now and then an activation that glm4rt sums in fp32 and the reference
    # in float64 lies on the two sides of a bf16 rounding tie; that one flip (2^-8 of the value)
    # then spreads to the later tokens through attention (seen with 40 tokens on some seeds for
    # every bf16 ISA, up to a third of the logits off by 1e-3 of the scale). The bulk still agrees
    # to fp32 precision, 1e4 times closer than to the unrounded reference.
    err = np.abs(ours - rounded)
    assert np.median(err) < 2e-5 * scale
    assert np.median(np.abs(rounded - exact)) > 10 * 2e-5 * scale  # the test can tell the two apart
    if n_tokens < 40:  # too few roundings for a flip to be likely: every logit agrees
        np.testing.assert_allclose(ours, rounded, atol=2e-5 * scale, rtol=0)


def test_wrong_rotary_layouts_would_be_caught():
    """The fixtures distinguish interleaved from NeoX rotary and partial from full rotation."""
    import numpy_reference as ref

    name = "gqa1_official"
    cfg = glm4rt.Glm4Config.from_pretrained(fixture_dir(name))
    g, w = golden(name), load_float64(fixture_dir(name))
    good = ref.rotary_interleaved

    def neox(x, pos, rot_dim, theta):
        inv = 1.0 / theta ** (np.arange(0, rot_dim, 2) / rot_dim)
        ang = pos[:, None] * inv[None]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        y, half = x.copy(), rot_dim // 2
        a, b = x[..., :half], x[..., half:rot_dim]
        y[..., :half], y[..., half:rot_dim] = a * cos - b * sin, b * cos + a * sin
        return y

    try:
        for wrong in (neox, lambda x, pos, rot_dim, theta: good(x, pos, x.shape[-1], theta)):
            ref.rotary_interleaved = wrong
            assert np.abs(forward_logits(w, cfg, g["ids"][0]) - g["logits"][0]).max() > 1e-2
    finally:
        ref.rotary_interleaved = good
