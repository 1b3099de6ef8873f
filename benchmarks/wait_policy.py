#!/usr/bin/env python
"""How libgomp's wait policy and the thread count set glm4rt's speed, idle and with another
process keeping one core busy: the measurement behind the GOMP_SPINCOUNT that glm4rt/ops.py sets.

    python benchmarks/wait_policy.py                 # decode (1 token) and a 64-token prompt, idle and busy
    python benchmarks/wait_policy.py --tokens 1 --rounds 12

Each setting (an environment for libgomp x a thread count) runs in its own worker process, since
libgomp reads its policy once as it loads. The workers hold the same int4 matrices (4 GLM-4-9B
layers: q/k/v, o, gate_up, down; ~460 MB, well past any cache) and take turns, round by round
(A B C ..., then ... C B A), so they share the machine's bandwidth as it drifts; each turn pushes
``--tokens`` rows through every matrix ``--reps`` times. The busy process is bench.BusyCore.
Prints the median tok/s per setting and writes benchmarks/wait_policy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402

WORKER = r'''
import sys, time
import numpy as np
import glm4rt
from glm4rt.quant import QuantLinear, quantize_weight
tokens, threads = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
layers = []
for _ in range(4):
    for n, k in [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]:
        w = rng.standard_normal((n, k), dtype=np.float32)
        layers.append((QuantLinear(quantize_weight(w, "int4"), "int4", n, k), np.ones((tokens, k), np.float32)))
glm4rt.set_num_threads(threads)
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    for _ in range(int(line)):
        for lin, x in layers:
            lin(x)
    print(time.perf_counter() - t0, flush=True)
'''

# (label, environment for libgomp): glm4rt's choice, libgomp's own default, and both ends.
POLICIES = [("glm4rt (GOMP_SPINCOUNT=1000)", {}),
            ("libgomp default (300000)", {"GOMP_SPINCOUNT": "300000"}),
            ("OMP_WAIT_POLICY=passive", {"OMP_WAIT_POLICY": "passive"}),
            ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"})]


def measure(tokens: int, busy: bool, rounds: int, reps: int) -> list[dict]:
    """Median tok/s of every (policy, 2 threads) worker and of one thread, taken in lockstep."""
    settings = [(label, env, 2) for label, env in POLICIES] + [("1 thread", {}, 1)]
    workers = []
    for _, env, threads in settings:
        full = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tokens), str(threads)], text=True,
                                        env=dict(full, **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    for w in workers:
        if w.stdout.readline().strip() != "ready":
            raise RuntimeError("a worker failed to start")
    times = [[] for _ in workers]
    with bench.BusyCore(busy, limit_s=3600):
        for r in range(rounds):
            order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
            for i in order:
                time.sleep(0.1)  # the previous worker's threads go to sleep
                workers[i].stdin.write(f"{reps}\n")
                workers[i].stdin.flush()
                times[i].append(float(workers[i].stdout.readline()))
    for w in workers:
        w.stdin.close()
        w.wait()
    return [{"setting": label, "threads": threads, "tokens": tokens, "busy": busy,
             "tok_s": reps * tokens / statistics.median(t), "seconds": t}
            for (label, _, threads), t in zip(settings, times)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,64", help="rows per matmul, comma-separated (default 1,64)")
    p.add_argument("--rounds", type=int, default=8, help="turns per worker (default 8)")
    p.add_argument("--out", default="wait_policy", help="writes benchmarks/NAME.json")
    args = p.parse_args(argv)
    info = bench.machine_info()
    print(f"machine: {info.get('cpu_model')}, {info.get('usable_cpus')} CPUs")
    results = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for busy in (False, True):
            rows = measure(tokens, busy, args.rounds, reps=10 if tokens == 1 else 1)
            results += rows
            print(f"\n{tokens} token(s), {'one core busy' if busy else 'idle'}:")
            for row in rows:
                print(f"  {row['setting']:<30} {row['threads']} thr  {row['tok_s']:8.1f} tok/s")
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
