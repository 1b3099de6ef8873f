#!/usr/bin/env python
"""Idle decode: glm4rt's default (load-following) thread count against a fixed count of every CPU,
in one process on an idle machine, alternating blocks of 32 decode steps (so both meet the same
memory-bandwidth state). On an idle machine the default must cost nothing: its load meter reads
idle and no probe runs.

    python benchmarks/threads_idle.py [--blocks 24] [--format int4]

Uses the cached 8-layer GLM-4-9B-geometry checkpoint of bench.py (run bench.py once first).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=24, help="blocks of 32 steps, alternating settings")
    p.add_argument("--format", default="int4", choices=["int4", "int8", "bf16"])
    p.add_argument("--checkpoint", default=os.path.join(HERE, "cache", "glm4-9b-L8-s0-v1"))
    args = p.parse_args()
    import glm4rt
    from glm4rt import autothreads, ops

    n = os.cpu_count() or 1
    kwargs = {"dtype": "bfloat16"} if args.format == "bf16" else {"quantization": args.format}
    model = glm4rt.Glm4ForCausalLM.from_pretrained(args.checkpoint, progress=False, **kwargs)
    cache = glm4rt.Glm4Cache.for_config(model.config, 1, 2048)
    speeds: dict[str, list[float]] = {f"{n} fixed": [], "default": []}
    tok = 5
    for block in range(args.blocks):
        setting = f"{n} fixed" if block % 2 == 0 else "default"
        glm4rt.set_num_threads(n if setting != "default" else None)
        if cache.get_seq_length() > 1500:
            cache.crop(0)
        t0 = time.perf_counter()
        for _ in range(32):
            tok = int(model(np.array([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
        speeds[setting].append(32 / (time.perf_counter() - t0))
    for setting, v in speeds.items():
        print(f"{setting:>10}: median {np.median(v):.2f} tok/s  ({', '.join(f'{x:.1f}' for x in v)})")
    pairs = [d / f for f, d in zip(speeds[f"{n} fixed"], speeds["default"])]
    tuner = getattr(autothreads._local, "tuner", None)
    print(f"default / {n} fixed, median of block pairs: {np.median(pairs):.3f}; the default ran "
          f"{tuner.current if tuner else ops.get_num_threads()} threads, the meter read "
          f"{'idle' if tuner and tuner.idle else 'load'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
