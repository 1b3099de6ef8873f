"""The worker process both fuzzers run their cases in (fuzz_checkpoints.py, fuzz_inputs.py): a
crash or a hang costs the case that caused it, is reported as such, and a fresh worker takes the
next case."""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

TESTS = os.path.dirname(os.path.abspath(__file__))
# Address space of a worker: a runaway allocation is a MemoryError, not the OOM killer.
WORKER_MEMORY = 4 * 2**30


def serve(handle: Callable[[str], dict]) -> None:
    """The worker's loop: one request per line of stdin, one JSON report per line on a private
    copy of stdout (whatever the library prints goes to stderr, never into the reports)."""
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        reports.write(json.dumps(handle(line.rstrip("\n"))) + "\n")


class Worker:
    """One worker process running ``python argv...`` (which calls ``serve``), restarted after it
    crashes or hangs. Its stderr goes to a file in ``log_dir``, whose tail a crash report quotes."""

    def __init__(self, argv: list[str], log_dir: str) -> None:
        self.argv, self.log_dir, self.proc, self.buffer, self.log = argv, log_dir, None, b"", None

    def _start(self) -> None:
        self.log = tempfile.TemporaryFile(dir=self.log_dir)
        env = dict(os.environ, GLM4RT_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, *self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=TESTS)
        self.buffer = b""

    def request(self, line: str, timeout: float) -> dict:
        """The worker's report on one request, or ``{"failure": "crash" | "hang", "message": ...}``."""
        if self.proc is None:
            self._start()
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.close()
                return {"failure": "hang", "message": f"no report in {timeout:.0f} s"}
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return self._died()
            self.buffer += chunk
        report, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(report)

    def _died(self) -> dict:
        code = self.proc.wait()
        self.log.seek(0)
        tail = self.log.read()[-1500:].decode(errors="replace")
        self.proc, self.log = None, None
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return {"failure": "crash", "message": f"{how}: {tail}"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options both fuzzers take: which cases of which seed, and how long."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=300, help="cases 0 .. N-1 (default 300)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop starting cases after this long")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take: longer is a hang")
    return parser
