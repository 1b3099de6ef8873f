"""Decode's matrix-vector products alone: GB/s of weights each engine streams, next to the memory
read bandwidth measured in the same rounds.

Decode reads every weight once per token, so an engine's decode speed is bounded by how fast its
one-token matmuls (GEMVs) stream weights. This isolates those GEMVs from the rest of a forward:
the matrices of GLM-4-9B's decoder layers (q/k/v fused 4608 x 4096, o 4096 x 4096, gate_up
27392 x 4096, down 4096 x 13696; random values) for ``--layers`` layers (far beyond the caches),
one token at a time, for

  glm4rt bf16 / int8 / int4   (what Glm4ForCausalLM runs for those formats)
  torch bf16                   (torch.nn.functional.linear on bfloat16 tensors: what transformers
                               bf16 decode runs; optional, needs torch)

Every round runs each engine once over all the matrices, right after a bandwidth probe (as
bench.py does), with the engines' order reversed every round; medians over ``--reps`` rounds.

    python benchmarks/gemv.py [--layers 4] [--threads 1,2] [--reps 9] [--out gemv-NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from glm4rt import ops
from glm4rt.quant import quantize_weight, QuantLinear

import bench  # benchmarks/bench.py and synth.py, next to this file
import synth

HERE = os.path.dirname(os.path.abspath(__file__))
# GLM-4-9B-0414 decoder layer, [out, in]
SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]


def _bf16_matrices(layers: int, seed: int) -> list[np.ndarray]:
    """Random bf16 bit patterns of normal(0, 0.02) values (the benchmark checkpoint's generator):
    exponents like real weights'."""
    shapes = [shape for _ in range(layers) for shape in SHAPES]
    return [np.concatenate(list(synth._generate_bf16(shape, 0.0, 0.02, seed, i))).reshape(shape)
            for i, shape in enumerate(shapes)]


def _inputs() -> dict[int, np.ndarray]:
    """The one-token activation ``[1, k]`` for each input width k of SHAPES."""
    return {k: np.random.default_rng(1).standard_normal((1, k), dtype=np.float32) for _, k in SHAPES}


def _engines(bf16: list[np.ndarray], with_torch: bool) -> dict[str, tuple[int, callable]]:
    """name -> (weight bytes per pass, one pass over all matrices returning their outputs)."""
    xs = _inputs()
    outs = [np.empty((1, w.shape[0]), dtype=np.float32) for w in bf16]

    def run_bf16():
        for w, y in zip(bf16, outs):
            ops.linear(xs[w.shape[1]], w, None, y)
        return outs

    engines = {"glm4rt bf16": (sum(w.nbytes for w in bf16), run_bf16)}
    for fmt in ("int8", "int4"):
        layers = [QuantLinear(quantize_weight(w, fmt), fmt, *w.shape) for w in bf16]

        def run_q(layers=layers):
            for q, y in zip(layers, outs):
                q(xs[q.in_features], y)
            return outs

        engines[f"glm4rt {fmt}"] = (sum(q.packed.nbytes for q in layers), run_q)
    if with_torch:
        import torch

        tw = [torch.from_numpy(w).view(torch.bfloat16) for w in bf16]  # the same memory, no copy
        txs = {k: torch.from_numpy(x).to(torch.bfloat16) for k, x in xs.items()}

        def run_torch():
            with torch.inference_mode():
                return [torch.nn.functional.linear(txs[w.shape[1]], w) for w in tw]

        engines["torch bf16"] = (sum(w.nbytes for w in bf16), run_torch)
    return engines


def _set_threads(n: int, with_torch: bool) -> None:
    ops.set_num_threads(n)
    if with_torch:
        import torch

        torch.set_num_threads(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-torch", action="store_true", help="leave torch out")
    ap.add_argument("--out", default=None, help="also write benchmarks/OUT.md and OUT.json")
    args = ap.parse_args()
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: torch bf16 left out", file=sys.stderr)
            with_torch = False

    bf16 = _bf16_matrices(args.layers, seed=0)
    engines = _engines(bf16, with_torch)
    names = list(engines)
    results = {}
    for threads in (int(t) for t in args.threads.split(",")):
        _set_threads(threads, with_torch)
        for _, run in engines.values():  # warm up: pages touched, threads started
            run()
        probes, speeds = [], {n: [] for n in names}
        for rep in range(args.reps):
            probes.append(bench.probe_bandwidth(threads, size_mib=256))
            for name in (names if rep % 2 == 0 else names[::-1]):
                nbytes, run = engines[name]
                t0 = time.perf_counter()
                run()
                speeds[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
        probe = float(np.median(probes))
        results[threads] = {"probe_gbs": probe, "probes": probes,
                            "engines": {n: {"gbs": float(np.median(v)),
                                            "pct_of_probe": float(np.median(np.array(v) / np.array(probes))) * 100,
                                            "reps": v} for n, v in speeds.items()}}

    info = bench.machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v and k in ("glm4rt", "numpy", "torch"))
    lines = ["# Decode GEMVs alone: GB/s of weights streamed", "",
             f"- Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs; glm4rt ISA {info['glm4rt_isa']}",
             f"- Software: {versions}; glm4rt git {info.get('git', 'unknown')}",
             f"- Command: python benchmarks/gemv.py {' '.join(sys.argv[1:])}", "",
             f"GLM-4-9B layer matrices x {args.layers} layers, one token; medians of {args.reps} rounds, each "
             "right after a bandwidth probe (256 MiB read 3 times); % of probe = median of the per-round ratios.",
             "", "| threads | probe GB/s | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for threads, r in results.items():
        cells = [f"{r['engines'][n]['gbs']:.1f} ({r['engines'][n]['pct_of_probe']:.0f}%)" for n in names]
        lines.append(f"| {threads} | {r['probe_gbs']:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(os.path.join(HERE, args.out + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(HERE, args.out + ".json"), "w") as f:
            json.dump({"layers": args.layers, "machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
