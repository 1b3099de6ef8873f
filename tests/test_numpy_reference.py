"""Triangulation with an independent float64 NumPy forward: it agrees with transformers' goldens
(so the goldens and the architecture notes say the same thing), and glm4rt agrees with it on
longer sequences up to max_position_embeddings, for every causal fixture."""
import numpy as np
import pytest

import glm4rt
from conftest import fixture_dir, golden
from golden_checks import close
from numpy_reference import forward_logits, load_float64

CAUSAL = ["gqa1_official", "gqa2_nobias_tied_v5", "gqa8_bf16_sharded"]


@pytest.mark.parametrize("name", CAUSAL)
def test_reference_agrees_with_transformers(name):
    cfg = glm4rt.Glm4Config.from_pretrained(fixture_dir(name))
    g = golden(name)
    w = load_float64(fixture_dir(name))
    for b in range(g["ids"].shape[0]):
        close(forward_logits(w, cfg, g["ids"][b]), g["logits"][b], f"row {b}")
        close(forward_logits(w, cfg, g["ids"][b], g["offset_pos"][b]), g["offset_logits"][b], f"row {b}, offset")


@pytest.mark.parametrize("name", CAUSAL)
def test_glm4rt_agrees_with_reference_on_full_context(name):
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir(name), dtype="float32")
    cfg = model.config
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=cfg.max_position_embeddings)
    expected = forward_logits(load_float64(fixture_dir(name)), cfg, ids)
    close(model(ids[None]).logits[0], expected)


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
    # to fp32 precision, 1e5 times closer than to the unrounded reference (measured on every ISA:
    # medians <= 7e-9 of the scale, maxima <= 1.4e-7; the unrounded reference is 6e-4 away).
    err = np.abs(ours - rounded)
    assert np.median(err) < 1e-7 * scale
    assert np.median(np.abs(rounded - exact)) > 1e-4 * scale  # the test can tell the two apart
    if n_tokens < 40:  # too few roundings for a flip to be likely: every logit agrees
        close(ours, rounded, atol=1e-6 * scale)


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


def _long_context_checkpoint(directory) -> None:
    """A random GLM-4 (every parameter random, norms and biases too) whose heads are long enough
    for the AMX attention tiles (head_dim 64, 4 query heads per kv head), written with NumPy."""
    import json
    import os

    from safetensors.numpy import save_file

    with open(os.path.join(fixture_dir("gqa1_official"), "config.json")) as f:
        cfg = json.load(f)
    cfg.update(head_dim=64, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=1, max_position_embeddings=256, num_hidden_layers=2)
    H, I, V, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    rng = np.random.default_rng(21)

    def rand(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.embed_tokens.weight": rand(V, H, scale=1.0), "model.norm.weight": 1 + rand(H),
         "lm_head.weight": rand(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", 4 * d), ("k_proj", d), ("v_proj", d)):
            t[p + f"self_attn.{name}.weight"] = rand(rows, H, scale=0.3)  # peaked softmaxes
            t[p + f"self_attn.{name}.bias"] = rand(rows)
        t[p + "self_attn.o_proj.weight"] = rand(H, 4 * d)
        t[p + "mlp.gate_up_proj.weight"] = rand(2 * I, H)
        t[p + "mlp.down_proj.weight"] = rand(H, I)
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                     "post_mlp_layernorm"):
            t[p + norm + ".weight"] = 1 + rand(H)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(t, os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
def test_long_prompts_and_chunked_prefill_agree_with_reference(isa, tmp_path):
    """200-token prompts, whole and in chunks over a cache (150 + 50 tokens): on AMX CPUs both
    run the split-product attention tiles (>= 16 queries, >= 128 keys, head_dim 64)."""
    _long_context_checkpoint(tmp_path)
    glm4rt.set_isa(isa)
    model = glm4rt.Glm4ForCausalLM.from_pretrained(str(tmp_path), dtype="float32")
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, size=200)
    expected = forward_logits(load_float64(str(tmp_path)), model.config, ids)
    close(model(ids[None]).logits[0], expected)
    cache = glm4rt.Glm4Cache.for_config(model.config, 1, 256)
    first = model(ids[None, :150], past_key_values=cache, use_cache=True).logits[0]
    rest = model(ids[None, 150:], past_key_values=cache, use_cache=True).logits[0]
    close(np.concatenate([first, rest]), expected, "150 + 50 tokens over a cache")
