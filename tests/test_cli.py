"""The glm4rt console script, end to end in a subprocess."""
import os
import shutil
import subprocess
import sys

from conftest import fixture_dir


def _glm4rt(*args, cwd):
    exe = shutil.which("glm4rt")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "glm4rt", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


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
