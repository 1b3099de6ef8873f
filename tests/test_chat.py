"""Chat sessions (cache reuse across turns), text streaming, stop strings and the CLI end to end,
on a tiny random checkpoint at the real vocab size with the GLM-style test tokenizer."""
import os
import select
import signal
import subprocess
import time

import numpy as np
import pytest

import glm4rt
from chat_model import build_chat_checkpoint
from glm4rt import ChatSession, ContextFullError
from helpers import glm4rt_command


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("chat_glm4")), template="glm4")


@pytest.fixture(scope="module")
def z1_ckpt(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("chat_z1")), template="z1", seed=1)


@pytest.fixture(scope="module")
def model(ckpt):
    return glm4rt.Glm4ForCausalLM.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(ckpt):
    return glm4rt.Glm4Tokenizer.from_pretrained(ckpt)


def _fresh_reply_ids(model, prompt_ids, n):
    out = model.generate(np.array([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_second_turn_prefills_only_new_tokens_and_matches_fresh_prefill(model, tok):
    session = ChatSession(model, tok, system="You are terse.", max_new_tokens=12)
    session.ask("Hello there")
    first_history = list(session.history_ids)
    assert session.cache.get_seq_length() == len(first_history) - 1  # the last reply token was never fed
    reply2 = session.ask("你好吗? 🙂")
    prompt2 = session.history_ids[:session.last_prompt_len]
    assert prompt2[:len(first_history)] == first_history  # turn 2 extends turn 1's tokens as generated
    new_tokens = len(prompt2) - len(first_history)
    assert session.last_prefill == new_tokens + 1  # the new message, plus turn 1's last reply token
    assert session.last_prefill < len(prompt2) // 2
    generated2 = session.history_ids[len(prompt2):]
    assert len(generated2) == 12
    assert generated2 == _fresh_reply_ids(model, prompt2, 12)
    assert reply2 == tok.decode(generated2, skip_special_tokens=True)
    # the rendered conversation (re-tokenized from text) is what the session holds
    rendered = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(prompt2, skip_special_tokens=False) == rendered


def test_z1_history_rewrite_still_matches_fresh_prefill(z1_ckpt):
    model = glm4rt.Glm4ForCausalLM.from_pretrained(z1_ckpt)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(z1_ckpt)
    session = ChatSession(model, tok, max_new_tokens=10)
    session.messages.append({"role": "assistant", "content": "<think>plan</think> Hi!"})
    session.messages.insert(0, {"role": "user", "content": "Hi"})
    session.ask("Weather?")
    prompt = session.history_ids[:session.last_prompt_len]
    text = tok.decode(prompt, skip_special_tokens=False)
    assert text.endswith("<|user|>\nWeather?<|assistant|>\n<think>") and "plan" not in text
    session.ask("And tomorrow?")
    prompt2 = session.history_ids[:session.last_prompt_len]
    assert session.history_ids[len(prompt2):] == _fresh_reply_ids(model, prompt2, 10)


def test_split_thinking():
    assert glm4rt.split_thinking("<think>a plan\n</think>\n\nThe answer.") == ("a plan", "The answer.")
    assert glm4rt.split_thinking("No thinking here") == ("", "No thinking here")


def test_context_full_is_a_clear_error_and_reset_recovers(model, tok):
    session = ChatSession(model, tok, max_context=60, max_new_tokens=20)
    with pytest.raises(ContextFullError, match="context"):
        for _ in range(10):
            session.ask("tell me more about it please")
    turns = len(session.messages)
    session.reset()
    assert session.messages == [] and session.cache.get_seq_length() == 0
    assert session.ask("hi") and turns > 1


@pytest.mark.parametrize("send, error, message", [
    (dict(content="hi", role="tool"), ValueError, "message 2 has role 'tool', which the chat template does not render"),
    (dict(content=None), TypeError, "content must be a string, got NoneType"),
    (dict(content=7), TypeError, "content must be a string, got int"),
    (dict(content=b"hi"), TypeError, "content must be a string, got bytes"),
    (dict(content="hi", max_new_tokens=2.5), ValueError, "max_new_tokens must be a whole number >= 0, got 2.5"),
    (dict(content="hi", max_new_tokens="3"), TypeError, r"max_new_tokens must be an integer, got '3' \(str\)"),
    (dict(content="hi", top_p=3), ValueError, r"top_p must be in \(0, 1\]"),
])
def test_chat_bad_message_is_refused_and_the_conversation_goes_on(model, tok, send, error, message):
    session = ChatSession(model, tok, max_new_tokens=4)
    first = session.ask("Hello")
    before = [dict(m) for m in session.messages]
    with pytest.raises(error, match=message):
        session.ask(**send)
    assert session.messages == before
    second = session.ask("Hello again")
    assert session.messages == before + [{"role": "user", "content": "Hello again"},
                                         {"role": "assistant", "content": second}]


def test_chat_max_new_tokens_zero_is_an_empty_reply(model, tok):
    # "max_new_tokens or room" made 0 mean "as long as the context allows"
    session = ChatSession(model, tok)
    assert session.ask("Hello", max_new_tokens=0) == ""
    assert session.messages[-1] == {"role": "assistant", "content": ""}


def test_chat_session_checks_system_and_max_context(model, tok):
    with pytest.raises(TypeError, match="system must be a string, got int"):
        ChatSession(model, tok, system=5)
    with pytest.raises(ValueError, match="max_context must be a whole number >= 1, got 0"):
        ChatSession(model, tok, max_context=0)
    with pytest.raises(TypeError, match=r"max_context must be an integer, got '60' \(str\)"):
        ChatSession(model, tok, max_context="60")


def test_chat_reply_leaves_out_ids_the_tokenizer_lacks(model, tok):
    # The model has 151552 rows, the tokenizer 869 tokens: a sampled id in a gap has no text
    session = ChatSession(model, tok, max_new_tokens=30, do_sample=True, top_k=0, temperature=50.0, seed=0)
    reply = session.ask("Hello")
    generated = session.history_ids[session.last_prompt_len:]
    assert any(tok.convert_ids_to_tokens(i) is None for i in generated)  # drew unknown ids
    assert reply == tok.decode([i for i in generated if tok.convert_ids_to_tokens(i) is not None],
                               skip_special_tokens=True)
    session.ask("And?")  # the history with those ids renders and extends as before


def test_stream_text_pieces_are_whole_characters(model, tok):
    ids = np.array([tok.encode("写一首关于猫的诗 🐱", add_special_tokens=True)])
    pieces = list(model.stream(tok, ids, max_new_tokens=40))
    out = model.generate(ids, max_new_tokens=40)
    assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    # A random model emits arbitrary byte tokens, some invalid UTF-8 for good; but mid-stream a
    # piece never ends in a replacement character (an incomplete character is held back).
    assert len(pieces) > 1 and not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_stop_strings(model, tok):
    ids = np.array([tok.encode("Hello", add_special_tokens=True)])
    full = model.generate(ids, max_new_tokens=20)[0, 1:].tolist()
    new = full[ids.shape[1] - 1:]
    target = tok.decode(new[:6])  # stop once the text generated so far ends with these characters
    stop = target[-2:] if len(target) >= 2 else target
    out = model.generate(ids, max_new_tokens=20, stop_strings=[stop], tokenizer=tok)
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    assert text.endswith(stop) and len(out[0]) <= ids.shape[1] + 6


# ---- CLI -----------------------------------------------------------------------------------------

def _cli(args, cwd, stdin=None, timeout=120):
    return subprocess.run(glm4rt_command(*args), input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_cli_generate_prints_the_reply(ckpt, model, tok, tmp_path):
    r = _cli(["generate", "--model", ckpt, "--greedy", "--max-new-tokens", "9", "Hello there"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = ChatSession(model, tok, max_new_tokens=9).ask("Hello there")
    assert r.stdout == expected + "\n"


def test_cli_chat_with_piped_stdin(ckpt, model, tok, tmp_path):
    r = _cli(["chat", "--model", ckpt, "--greedy", "--max-new-tokens", "7", "--system", "Be brief."],
             cwd=tmp_path, stdin="Hi!\nWhat about 猫?\n/reset\nHi!\n")
    assert r.returncode == 0, r.stderr
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=7)
    a, b = session.ask("Hi!"), session.ask("What about 猫?")
    assert r.stdout == f"{a}\n{b}\n{a}\n"  # after /reset the first answer comes again
    assert "conversation cleared" in r.stderr


def test_cli_chat_shows_z1_thinking_apart(z1_ckpt, tmp_path):
    r = _cli(["chat", "--model", z1_ckpt, "--greedy", "--max-new-tokens", "5"], cwd=tmp_path, stdin="Hi\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[thinking]\n")  # the Z1 prompt opens <think>; the reply is thinking


def test_cli_ctrl_c_stops_the_reply_not_the_session(ckpt, tmp_path):
    # The child must get Ctrl-C's default disposition: a shell runs background jobs (a CI launched
    # with `&`) with SIGINT ignored, which children inherit and Python then keeps. So the parent
    # handles SIGINT while it starts the child (a handled signal is reset to the default by exec).
    # Not preexec_fn: Python code between fork and exec can deadlock in a process with threads, and
    # did under qemu-user (.ci/emulate hung here with no timeout).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(glm4rt_command("chat", "--model", ckpt, "--greedy", "--max-new-tokens", "3000"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        proc.stdin.write(b"first question\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # wait until the reply streams
        assert ready and os.read(proc.stdout.fileno(), 1), "no reply started"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        out, err = proc.communicate(b"/exit\n", timeout=60)
        err = err.decode()
        assert proc.returncode == 0, err
        assert "(stopped)" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_errors_are_clear(tmp_path):
    r = _cli(["generate", "--model", str(tmp_path / "nope"), "hi"], cwd=tmp_path)
    assert r.returncode == 2 and "no such checkpoint directory" in r.stderr and "Traceback" not in r.stderr
