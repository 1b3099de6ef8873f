"""The glm4rt console script, end to end in a subprocess."""
import os
import shutil
import subprocess

import pytest

import glm4rt
from chat_model import build_chat_checkpoint
from conftest import fixture_dir
from helpers import glm4rt_command


def _glm4rt(*args, cwd, stdin=None):
    return subprocess.run(glm4rt_command(*args), input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_info_describes_checkpoint_and_runs_it(tmp_path):
    r = _glm4rt("--threads", "1", "info", "--model", fixture_dir("gqa8_bf16_sharded"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2 layers, hidden 64, intermediate 96, heads 8/1 kv, head_dim 8 (rotary 4), vocab 256" in out
    # 256*64 embed + lm_head, per layer 4 norms + q/k/v (+bias) + o + gate_up + down, final norm
    per_layer = 4 * 64 + (64 * 64 + 64) + 2 * (8 * 64 + 8) + 64 * 64 + 192 * 64 + 64 * 96
    n_params = 2 * 256 * 64 + 2 * per_layer + 64
    assert f"parameters      {n_params:,} " in out
    assert "bf16" in out and "1 threads" in out
    assert "KV cache 0.1 KiB/token" in out  # 2 layers * 2 (k, v) * 1 kv head * 8 dims * 4 bytes
    assert "smoke test" in out


def test_info_bad_path_is_a_clear_error(tmp_path):
    r = _glm4rt("info", "--model", os.path.join(str(tmp_path), "missing"), cwd=tmp_path)
    assert r.returncode == 2
    assert "no such checkpoint directory" in r.stderr and "Traceback" not in r.stderr


# ---- bad input on the command line (issue 18) ---------------------------------------------------

@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("cli_chat")), template="glm4")


def _run_bytes(*args, cwd, stdin=b"", env=None):
    """The console script with raw bytes in argv and on stdin."""
    return subprocess.run(glm4rt_command(*args), input=stdin, capture_output=True, timeout=120, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _replies(ckpt, *messages, max_new_tokens):
    model, tok = glm4rt.Glm4ForCausalLM.from_pretrained(ckpt), glm4rt.Glm4Tokenizer.from_pretrained(ckpt)
    session = glm4rt.ChatSession(model, tok, max_new_tokens=max_new_tokens, do_sample=False)
    return [session.ask(m) for m in messages]


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])  # stdin decodes strictly / with surrogateescape
def test_cli_chat_invalid_utf8_line_is_replaced_and_the_chat_goes_on(chat_ckpt, tmp_path, locale):
    # was: a TypeError traceback from tokenizers, and the session ended
    r = _run_bytes("chat", "--model", chat_ckpt, "--greedy", "--max-new-tokens", "5", cwd=tmp_path,
                   stdin=b"hi \xff\xfe\nHello\n", env={"LC_ALL": locale})
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert err.count("glm4rt: warning: an input line is not valid utf-8; undecodable bytes were replaced "
                     "with U+FFFD") == 1
    a, b = _replies(chat_ckpt, "hi \ufffd\ufffd", "Hello", max_new_tokens=5)
    assert r.stdout.decode() == f"{a}\n{b}\n"


def test_cli_generate_invalid_utf8_argument_is_replaced(chat_ckpt, tmp_path):
    r = _run_bytes("generate", "--model", chat_ckpt, "--greedy", "--max-new-tokens", "5", b"hi \xff", cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "glm4rt: warning: the prompt is not valid utf-8; undecodable bytes were replaced with U+FFFD" in err
    assert r.stdout.decode() == _replies(chat_ckpt, "hi \ufffd", max_new_tokens=5)[0] + "\n"


def test_cli_chat_refused_line_keeps_the_session(chat_ckpt, tmp_path):
    r = _glm4rt("chat", "--model", chat_ckpt, "--greedy", "--max-new-tokens", "3", "--max-context", "40",
                cwd=tmp_path, stdin="Hi\n" + "word " * 50 + "\n/reset\nHi\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "context holds 40: start a new conversation (reset)" in r.stderr
    a, = _replies(chat_ckpt, "Hi", max_new_tokens=3)
    assert r.stdout == f"{a}\n{a}\n"


@pytest.mark.parametrize("args, message", [
    (["--threads", "1000"], "glm4rt: error: number of threads must be <= "),
    (["--threads", "0"], "glm4rt: error: number of threads must be >= 1, got 0"),
])
def test_cli_bad_thread_count_is_a_clear_error(tmp_path, args, message):
    r = _glm4rt(*args, "info", "--model", fixture_dir("gqa8_bf16_sharded"), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_dtype_help_does_not_claim_fp32_compute(tmp_path):
    r = _glm4rt("generate", "--help", cwd=tmp_path)
    text = " ".join(r.stdout.split())
    assert "compute is always fp32" not in text and "bf16 weights multiply bf16-rounded activations" in text


# ---- quantize ---------------------------------------------------------------------------------------

def test_quantize_refuses_a_non_empty_output_directory(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    r = _glm4rt("quantize", fixture_dir("gqa8_bf16_sharded"), str(dst), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"output directory '{dst}' is not empty (1 entries): pass --force" in r.stderr
    assert sorted(os.listdir(dst)) == ["notes.txt"]


def test_quantize_force_replaces_a_stale_checkpoint(tmp_path):
    # a sharded checkpoint left in the output would be loaded instead of the new model.safetensors
    dst = tmp_path / "out"
    shutil.copytree(fixture_dir("gqa8_bf16_sharded"), dst)
    (dst / "notes.txt").write_text("mine")
    r = _glm4rt("quantize", fixture_dir("gqa8_bf16_sharded"), str(dst), "--format", "int8", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dst)) == ["config.json", "generation_config.json", "golden.npz", "model.safetensors",
                                       "notes.txt"]
    assert glm4rt.Glm4ForCausalLM.from_pretrained(str(dst)).config.quantization_config["format"] == "int8"


def test_quantize_refuses_to_write_over_its_source(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixture_dir("gqa8_bf16_sharded"), src)
    r = _glm4rt("quantize", str(src), str(src), "--force", cwd=tmp_path)
    assert r.returncode == 2 and "is the source checkpoint: quantize into another directory" in r.stderr


def test_quantize_draws_no_progress_bar_off_a_terminal(tmp_path):
    r = _glm4rt("quantize", fixture_dir("gqa8_bf16_sharded"), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("quantized ")


def test_info_into_a_closed_pipe_stops_quietly(tmp_path):
    # `glm4rt info ... | head`: the reader is gone before glm4rt writes. No traceback, no error line.
    p = subprocess.Popen([*glm4rt_command(), "--threads", "1", "info", "--model", fixture_dir("gqa8_bf16_sharded")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert err == "", err
