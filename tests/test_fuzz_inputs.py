"""The tokenizer / chat input fuzzer (tests/fuzz_inputs.py) in its CI size, and its judge and
worker on made-up outcomes. The long local run: python tests/fuzz_inputs.py --cases 20000 --seconds 900"""
import os
import signal

import pytest

import fuzz_inputs
from chat_model import build_chat_checkpoint


def test_fuzz_inputs():
    seed = int(os.environ.get("GLM4RT_FUZZ_SEED", "0"))
    report = fuzz_inputs.run(seed=seed, cases=1000, seconds=60)
    print(report.line())
    assert len(report.results) >= 300, report.line()  # a slow machine still runs a few hundred
    assert not report.failures, report.details()


def _args(*damaged):
    args = fuzz_inputs.Args(fuzz_inputs.random.Random(0))
    args.damaged(*damaged)
    return args


def _raises(error):
    def run():
        raise error
    return run


@pytest.mark.parametrize("args, run, outcome", [
    (_args("max_new_tokens"), _raises(ValueError("max_new_tokens must be a whole number >= 0, got 2.5")), "ok"),
    (_args("token id"), _raises(TypeError("token ids must be integers, got '3' (str) at position 0")), "ok"),
    (_args("max_new_tokens"), _raises(TypeError("'<' not supported between instances of 'str' and 'int'")), "unclear"),
    (_args(), _raises(ValueError("top_p must be in (0, 1]")), "unclear"),  # an error on valid input
    (_args("token id"), _raises(OverflowError("out of range integral type conversion attempted")), "unclear"),
    (_args("text"), _raises(UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")), "unclear"),
    (_args(), _raises(fuzz_inputs.Broken("decoded ids the vocabulary lacks")), "unclear"),
    (_args(), lambda: "fine", "ok"),
])
def test_judge(args, run, outcome):
    assert fuzz_inputs.judge(args, run)[0] == outcome


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("fuzz_chat")), template="glm4")


@pytest.mark.parametrize("sig, outcome", [(signal.SIGSEGV, "crash"), (signal.SIGSTOP, "hang")])
def test_a_dead_or_stuck_worker_loses_one_case(checkpoint, tmp_path, sig, outcome):
    worker = fuzz_inputs.Worker(checkpoint, str(tmp_path))
    try:
        reported = ("ok", "unclear")  # whatever the case, the worker judged it
        assert worker.run(0, 0, timeout=60)["outcome"] in reported
        os.kill(worker.proc.pid, sig)
        report = worker.run(0, 1, timeout=2)
        assert report["outcome"] == outcome, report
        if outcome == "crash":
            assert "SIGSEGV" in report["why"]
        assert worker.run(0, 2, timeout=60)["outcome"] in reported  # a fresh worker takes the next case
    finally:
        worker.close()
