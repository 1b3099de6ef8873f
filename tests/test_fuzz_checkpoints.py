"""The checkpoint fuzzer (tests/fuzz_checkpoints.py) at its CI size: a few hundred seeded cases,
each loaded in a worker process, within about a minute on 2 cores. Its long mode is the module's
command line (``python tests/fuzz_checkpoints.py --cases 5000 --seconds 600``). The fuzzer's own
parts are tested here too: a crashed or hung worker costs one case, and each outcome is judged
as the module's docstring says."""
import os
import shutil
import signal

import pytest

import fuzz_checkpoints as fuzz
from conftest import fixture_dir

CI_SEED, CI_CASES, CI_SECONDS = 18, 600, 50


def test_fuzz_checkpoints(tmp_path):
    report = fuzz.run(seed=CI_SEED, cases=CI_CASES, seconds=CI_SECONDS, workdir=str(tmp_path))
    print(report.details())
    # A slow machine may stop early; too few cases would mean the fuzzer itself broke.
    assert len(report.results) >= 100, report.details()
    assert not report.failures, report.details()
    kinds = {r.why for r in report.results}
    assert {"loaded", "CheckpointError", "ConfigError"} <= kinds, kinds  # it reaches every stage


def test_a_crashed_worker_costs_one_case(tmp_path):
    worker = fuzz.Worker(str(tmp_path))
    ckpt = fixture_dir("gqa1_official")
    try:
        assert worker.run(ckpt, timeout=60)["status"] == "loaded"
        os.kill(worker.proc.pid, signal.SIGSEGV)
        report = worker.run(ckpt, timeout=60)
        assert report["status"] == "crash" and report["message"].startswith("signal SIGSEGV"), report
        assert worker.run(ckpt, timeout=60)["status"] == "loaded"  # a fresh worker takes the next case
    finally:
        worker.close()


def test_a_hung_worker_costs_one_case(tmp_path):
    worker = fuzz.Worker(str(tmp_path))
    ckpt = fixture_dir("gqa1_official")
    try:
        assert worker.run(ckpt, timeout=0.001) == {"status": "hang"}  # importing glm4rt alone takes longer
        assert worker.proc is None
        assert worker.run(ckpt, timeout=60)["status"] == "loaded"
    finally:
        worker.close()


BASE = fuzz.Base("b", "/b", ["model.safetensors"], {}, False, sha="abc")
LOADED = {"status": "loaded", "finite": True, "sha": "abc"}


def _error(kind, message):
    return {"status": "error", "type": kind, "message": message}


@pytest.mark.parametrize("report, mutation, rejected, outcome", [
    (LOADED, fuzz.Mutation("neutral", invalid=False, neutral=True), [], "ok"),
    (LOADED, fuzz.Mutation("bad value", invalid=True), [], "silent"),
    (LOADED, fuzz.Mutation("header bytes"), ["/c/model.safetensors"], "silent"),
    (dict(LOADED, sha="other"), fuzz.Mutation("neutral", invalid=False, neutral=True), [], "silent"),
    (dict(LOADED, finite=False), fuzz.Mutation("config value", invalid=False), [], "silent"),
    (dict(LOADED, finite=False), fuzz.Mutation("data bytes", invalid=False, reinterprets=True), [], "ok"),
    (_error("CheckpointError", "/c/model.safetensors: bad"), fuzz.Mutation("x"), ["/c/model.safetensors"], "ok"),
    (_error("CheckpointError", "something"), fuzz.Mutation("x", names=("rope_theta",)), [], "unclear"),
    (_error("TypeError", "rope_theta"), fuzz.Mutation("x", names=("rope_theta",)), [], "unclear"),
    (_error("ConfigError", "rope_theta"), fuzz.Mutation("x", invalid=False, neutral=True, names=("rope_theta",)),
     [], "refused"),
    ({"status": "crash", "message": "signal SIGSEGV"}, fuzz.Mutation("x"), [], "crash"),
    ({"status": "hang"}, fuzz.Mutation("x"), [], "hang"),
])
def test_judge(report, mutation, rejected, outcome):
    assert fuzz.judge(report, [mutation], rejected, BASE)[0] == outcome


def test_cases_are_reproducible(tmp_path):
    bases = fuzz.make_bases(str(tmp_path))
    case_dir = tmp_path / "case"

    def make(number):
        base, mutations = fuzz.make_case(CI_SEED, number, bases, str(case_dir))
        files = {name: (case_dir / name).read_bytes() for name in sorted(os.listdir(case_dir))}
        shutil.rmtree(case_dir)
        return base.name, [m.desc for m in mutations], files

    for number in range(30):
        assert make(number) == make(number), number
