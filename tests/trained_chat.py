"""A tiny GLM-4 trained (with transformers + torch, seconds) to answer a few chat prompts exactly: a
tool call and the answer after the tool's result (GLM-4-0414 template), and a thinking reply
(GLM-Z1 template). The server tests need a model that really emits these formats: a random one
never writes ``get_weather\\n{...}``. The replies are learnt by heart; greedy decoding in glm4rt
then reproduces them, which the tests check before relying on it."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from glm_tokenizer import build_glm_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ARGUMENTS = '{"location": "Paris"}'
CALL_TEXT = "get_weather\n" + CALL_ARGUMENTS
TOOL_RESULT = "sunny, 21 C"
AFTER_RESULT = QUESTION + [{"role": "assistant", "metadata": "get_weather", "content": CALL_ARGUMENTS},
                           {"role": "observation", "content": TOOL_RESULT}]
ANSWER = "It is sunny in Paris."
GREETING = [{"role": "user", "content": "Hi"}]
THINKING, REPLY = "The user greets me.", "Hello there!"
EOS = {"observation": 151338, "user": 151336}


def _examples(tok_glm4, tok_z1) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) pairs."""
    def prompt(tok, messages, tools=None):
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def target(tok, text, eos):
        return tok.encode(text, add_special_tokens=False) + [EOS[eos]]

    return [
        (prompt(tok_glm4, QUESTION, [WEATHER_TOOL]), target(tok_glm4, CALL_TEXT, "observation")),
        (prompt(tok_glm4, AFTER_RESULT, [WEATHER_TOOL]), target(tok_glm4, ANSWER, "user")),
        (prompt(tok_z1, GREETING), target(tok_z1, f"{THINKING}</think>\n{REPLY}", "user")),
    ]


def cached_trained_chat_models() -> dict[str, str]:
    """``build_trained_chat_models`` in a directory of the system's temporary folder named after
    this file's contents, built once: the suite runs three times in CI (natively, then as Haswell
    and as Nehalem under QEMU, where torch trains for many minutes). Written to a private folder
    and renamed into place, so a run that dies halfway leaves nothing behind."""
    import hashlib
    import tempfile

    with open(__file__, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), f"glm4rt-trained-chat-{key}")
    dirs = {name: os.path.join(root, name) for name in ("glm4", "z1")}
    if not os.path.isdir(root):
        work = tempfile.mkdtemp(prefix="glm4rt-trained-chat-")
        build_trained_chat_models(work)
        try:
            os.rename(work, root)
        except OSError:  # another run put it there first
            shutil.rmtree(work, ignore_errors=True)
    return dirs


def build_trained_chat_models(directory: str, seed: int = 0) -> dict[str, str]:
    """Train the model and save it twice, with the GLM-4-0414 and the GLM-Z1 tokenizer.

    Returns:
        ``{"glm4": dir, "z1": dir}``.
    """
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    import glm4rt

    dirs = {name: os.path.join(directory, name) for name in ("glm4", "z1")}
    for name, d in dirs.items():
        build_glm_tokenizer(d, template=name)
    toks = {name: glm4rt.Glm4Tokenizer.from_pretrained(d) for name, d in dirs.items()}
    examples = _examples(toks["glm4"], toks["z1"])

    torch.manual_seed(seed)
    config = Glm4Config(vocab_size=151552, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                        rms_norm_eps=1e-5, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])
    model = Glm4ForCausalLM(config)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    width = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), width), 151329, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(examples):
        seq = p + t
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(t)  # only the replies are learnt
    # Logits only where a reply token is predicted: the 151552-way lm_head over every position
    # would cost most of the training.
    rows = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[:, 1:][rows]
    for step in range(600):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1][rows]  # [n_targets, H]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if loss.item() < 2e-3:
            break
    model.save_pretrained(dirs["glm4"], safe_serialization=True)
    for f in os.listdir(dirs["glm4"]):
        if f.endswith(".safetensors") or f == "config.json":
            shutil.copy(os.path.join(dirs["glm4"], f), dirs["z1"])
    for d in dirs.values():
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "do_sample": False}, f)
    return dirs


def learnt_replies(model, tok_glm4, tok_z1) -> list[bool]:
    """Whether glm4rt's greedy decoding gives each learnt reply."""
    ok = []
    for p, t in _examples(tok_glm4, tok_z1):
        out = model.generate(np.array([p]), max_new_tokens=len(t), do_sample=False)
        ok.append(out[0, len(p):].tolist() == t)
    return ok
