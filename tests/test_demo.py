"""The demo model shipped inside the package (``glm4rt.DEMO_MODEL``, made by tools/train_demo.py):
it loads from the installed package, is a real GLM-4 (the architecture's features on), tokenizes as
transformers does, generates what transformers generates, writes language rather than noise, and is
what the command line runs without ``--model``."""
import json
import os
import subprocess

import numpy as np
import pytest

import glm4rt
from helpers import glm4rt_command

DEMO = glm4rt.DEMO_MODEL
# Genesis 13:1-4 (King James Version), from a chapter held out of the demo's training text.
HELD_OUT = ("Genesis 13\nAnd Abram went up out of Egypt, he, and his wife, and all that he had, and Lot with him, "
            "into the south.\nAnd Abram was very rich in cattle, in silver, and in gold.\nAnd he went on his "
            "journeys from the south even to Bethel, unto the place where his tent had been at the beginning, "
            "between Bethel and Hai;\nUnto the place of the altar, which he had made there at the first: and "
            "there Abram called on the name of the LORD.\n")
PROMPTS = [("raw", "In the beginning"), ("chat", "John 3:16"), ("chat", "《静夜思》")]


def _ids(tok, kind, text):
    if kind == "raw":
        return tok.encode(text)
    return [int(i) for i in tok.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True)["input_ids"][0]]


def test_demo_model_is_a_checkpoint_inside_the_package():
    assert os.path.dirname(DEMO) == os.path.dirname(os.path.abspath(glm4rt.__file__))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training.json", "SOURCES.md"):
        assert os.path.isfile(os.path.join(DEMO, name)), name
    assert os.path.getsize(os.path.join(DEMO, "model.safetensors")) <= 15 * 2**20


def test_demo_config_has_the_glm4_features():
    c = glm4rt.Glm4Config.from_pretrained(DEMO)
    assert c.num_key_value_heads < c.num_attention_heads  # GQA
    assert c.partial_rotary_factor == 0.5 and c.rotary_dim == c.head_dim // 2
    assert c.attention_bias and not c.tie_word_embeddings
    assert c.intermediate_size % 256 != 0  # as GLM-4-9B's 13696: K-quant super-blocks do not tile it
    model = glm4rt.Glm4ForCausalLM.from_pretrained(DEMO)
    params = model.named_parameters()
    assert params["model.layers.0.post_self_attn_layernorm.weight"].shape == (c.hidden_size,)
    assert params["model.layers.0.post_mlp_layernorm.weight"].shape == (c.hidden_size,)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(DEMO)
    for special in ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"):
        assert tok.convert_tokens_to_ids(special) < c.vocab_size, special
    assert tok.encode("x")[:2] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])


def test_demo_tokenizer_and_template_match_transformers():
    transformers = pytest.importorskip("transformers", reason="the reference needs transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(DEMO)
    ours = glm4rt.Glm4Tokenizer.from_pretrained(DEMO)
    for text in (HELD_OUT, "床前明月光，疑是地上霜。", "Mixed 中文 and English, 1611 A.D.!"):
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "John 3:16"},
                {"role": "assistant", "content": "For God so loved the world"}, {"role": "user", "content": "《静夜思》"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_demo_greedy_generation_matches_transformers():
    torch = pytest.importorskip("torch", reason="the reference needs torch")
    transformers = pytest.importorskip("transformers", reason="the reference needs transformers")
    ref = transformers.Glm4ForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ours = glm4rt.Glm4ForCausalLM.from_pretrained(DEMO, dtype="float32")
    tok = glm4rt.Glm4Tokenizer.from_pretrained(DEMO)
    for kind, text in PROMPTS:
        ids = np.array([_ids(tok, kind, text)])
        with torch.no_grad():
            expected = ref.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False,
                                    pad_token_id=ref.config.pad_token_id).numpy()
        got = ours.generate(ids, max_new_tokens=32, do_sample=False)
        np.testing.assert_array_equal(got, expected, err_msg=f"{kind} {text!r}")


def test_demo_model_writes_language_not_noise():
    """Held-out text is far more likely under the model than the same words in a shuffled order."""
    model = glm4rt.Glm4ForCausalLM.from_pretrained(DEMO)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(DEMO)

    def perplexity(text):
        ids = np.array([tok.encode(text)])
        logits = model(ids).logits[0, :-1].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return float(np.exp(-logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()))

    words = HELD_OUT.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))
    real, noise = perplexity(HELD_OUT), perplexity(shuffled)
    reported = json.load(open(os.path.join(DEMO, "training.json")))["held_out_perplexity_english"]
    assert real < 2 * reported, (real, reported)
    assert noise > 5 * real, (real, noise)


def _cli(*args, cwd):
    return subprocess.run(glm4rt_command(*args), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_without_model_runs_the_demo(tmp_path):
    r = _cli("generate", "--raw", "--greedy", "--max-new-tokens", "12", "In the beginning", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "demo model" in r.stderr and "--model" in r.stderr
    assert len(r.stdout.split()) >= 3, r.stdout
    r = _cli("info", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(the demo model)" in r.stdout and "6 layers, hidden 256" in r.stdout
