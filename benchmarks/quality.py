#!/usr/bin/env python
"""Quantization quality: how far glm4rt's int8/int4 models and llama.cpp's Q8_0/Q4_0 (and BF16)
GGUFs move the logits away from the fp32 glm4rt model, on the random-weight checkpoint.

    python benchmarks/quality.py                      # 2 layers, 256 positions
    python benchmarks/quality.py --layers 8 --positions 512

The reference is glm4rt with dtype="float32" on the bf16 checkpoint (the exact stored weights,
fp32 arithmetic). Every candidate computes the logits of the same random token sequence at every
position (one forward; llama.cpp with logits_all=True), each in its own process. Reported per
candidate: relative RMS error of the logits (||c - r|| / ||r|| over all positions and the
vocabulary), mean and max KL(P_ref || P_cand) of the next-token distribution in nats, and greedy
top-1 agreement. transformers fp32 is included as a check of the reference itself.

The weights are scaled so the next-token distribution is peaked rather than uniform (see synth.py:
lm_head std 4/sqrt(hidden), i.e. logits with a standard deviation of ~4); the reference's entropy
and top probability are printed so the numbers can be judged. With random weights the gap between
the two best logits is that of the extremes of ~150k Gaussian samples (~0.2 of a standard
deviation), much smaller than in a trained model, so top-1 agreement here is a pessimistic figure.
Writes benchmarks/quality.md and quality.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import synth  # noqa: E402
from bench import LLAMA_TYPES, machine_info, run_child, say  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, cand: np.ndarray, chunk: int = 64) -> dict:
    """Logit relative RMS error, KL(P_ref || P_cand) per position (mean, max), top-1 agreement."""
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {cand.shape}")
    sq_err = sq_ref = 0.0
    kls, agree = [], 0
    for i in range(0, ref.shape[0], chunk):
        r, c = ref[i:i + chunk].astype(np.float64), cand[i:i + chunk].astype(np.float64)
        sq_err += float(((c - r) ** 2).sum())
        sq_ref += float((r ** 2).sum())
        lr, lc = log_softmax(r), log_softmax(c)
        kls.append((np.exp(lr) * (lr - lc)).sum(axis=-1))
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
    kl = np.concatenate(kls)
    return {"rel_rms": (sq_err / sq_ref) ** 0.5, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": agree / ref.shape[0], "finite": bool(np.isfinite(cand).all())}


def describe(ref: np.ndarray) -> dict:
    lp = log_softmax(ref)
    p = np.exp(lp)
    ent = -(p * lp).sum(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    return {"logit_std": float(ref.std(axis=-1).mean()), "entropy_mean_nats": float(ent.mean()),
            "uniform_entropy_nats": float(np.log(ref.shape[-1])), "top_prob_mean": float(p.max(-1).mean()),
            "top1_top2_gap_mean": float((top2[:, 1] - top2[:, 0]).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="int8,int4,q4k",
                   help="quantized formats (glm4rt int8/int4/q4k, llama.cpp Q8_0/Q4_0; q4k is glm4rt's only)")
    p.add_argument("--peers", default="llama,transformers", help="llama (GGUF logits), transformers (reference check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="quality")
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    peers = [x for x in args.peers.split(",") if x and x != "none"]
    g = synth.Geometry(num_hidden_layers=args.layers)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)]
                                   + (argv if argv is not None else sys.argv[1:]))
    timeout = 3 * 3600

    gguf_formats = ["bf16"] + [f for f in formats if f in LLAMA_TYPES] if "llama" in peers else []
    built = run_child({"task": "build", "geometry": g.__dict__, "seed": args.seed, "gguf_formats": gguf_formats}, timeout)
    if built.get("status") != "ok":
        say(f"could not build the checkpoint: {built.get('reason')}")
        return 1
    ckpt = built["checkpoint"]
    work = os.path.join(synth.CACHE, f"quality-{g.tag()}-s{args.seed}-{synth.SCHEME}-P{args.positions}")
    os.makedirs(work, exist_ok=True)

    base = {"task": "logits", "checkpoint": ckpt, "threads": [args.threads], "n_positions": args.positions,
            "n_ctx": max(512, -(-args.positions // 256) * 256 + 256)}
    candidates = [("glm4rt", "fp32", "glm4rt fp32 (reference)", None)]
    candidates += [("glm4rt", "bf16", "glm4rt bf16", None)]
    # On AMX CPUs a whole-sequence forward multiplies quantized weights as bf16 (csrc/ops.h): the
    # int8-activation kernels that decode uses are measured too, by forcing the avx512_bf16 set.
    import glm4rt

    amx = "amx" in glm4rt.supported_isas()
    candidates += [("glm4rt", f, f"glm4rt {f}" + (" (AMX: bf16 activations)" if amx else ""), None) for f in formats]
    if amx:
        candidates += [("glm4rt", f, f"glm4rt {f} (VNNI: int8 activations)", "avx512_bf16") for f in formats]
    if "llama" in peers:
        candidates += [("llama", f, f"llama.cpp {LLAMA_TYPES[f]}", None) for f in ["bf16"] + formats if f in built["gguf"]]
    if "transformers" in peers:
        candidates += [("transformers", "fp32", "transformers fp32 (reference check)", None)]

    runs = []
    for engine, fmt, label, isa in candidates:
        say(f"\n== {label}")
        out = os.path.join(work, f"{engine}-{fmt}{'-' + isa if isa else ''}.npy")
        spec = dict(base, engine=engine, format=fmt, out=out, isa=isa)
        if engine == "llama":  # without the AMX / repacked buffers: values, not speed (llama_tools.open_llama)
            spec.update(gguf=built["gguf"][fmt], flash_attn=True, no_extra_bufts=True)
        r = run_child(spec, timeout)
        r.update(engine=engine, format=fmt, label=label, path=out)
        if r.get("status") != "ok":
            say(f"    {r.get('status')}: {r.get('reason')}")
        runs.append(r)

    ref_run = runs[0]
    if ref_run.get("status") != "ok":
        say(f"the fp32 reference failed: {ref_run.get('reason')}")
        return 1
    ref = np.load(ref_run["path"])
    stats = describe(ref)
    for r in runs[1:]:
        if r.get("status") == "ok":
            r["metrics"] = compare(ref, np.load(r["path"]))
    ref_bytes = ref_run.get("weight_bytes")

    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
               "machine": machine_info(), "geometry": g.__dict__, "checkpoint": ckpt, "positions": args.positions,
               "reference_stats": stats, "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in runs]}
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)

    lines = ["# Quantization quality on the random-weight checkpoint\n",
             f"- Date: {results['date']}",
             f"- Command: `{command}`",
             f"- Model: GLM-4-9B-0414 geometry with {g.num_hidden_layers} layers, random weights (synth.py scheme "
             f"{synth.SCHEME}: matrices normal(0, 0.02), lm_head normal(0, 4/sqrt(hidden)), norms normal(1, 0.1), "
             f"q/k/v biases normal(0, 0.1)); {args.positions} positions of random ordinary tokens, logits at every position.",
             f"- Reference: glm4rt `dtype=\"float32\"` (the stored bf16 weights in fp32 arithmetic). Its next-token "
             f"distributions: logit std {stats['logit_std']:.2f}, mean entropy {stats['entropy_mean_nats']:.2f} nats "
             f"(uniform: {stats['uniform_entropy_nats']:.2f}), mean top probability {stats['top_prob_mean']:.3f}, "
             f"mean gap between the two best logits {stats['top1_top2_gap_mean']:.3f}.",
             "",
             "| candidate | weights GB/token (vs fp32 ref) | logit rel. RMS error | mean KL (nats) | max KL (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for r in runs[1:]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status')}: {r.get('reason', '')} | | | | |")
            continue
        mt = r["metrics"]
        wb = r.get("weight_bytes")
        size = f"{wb / 1e9:.3f} ({wb / ref_bytes:.2f}x)" if wb and ref_bytes else "n/a"
        lines.append(f"| {r['label']} | {size} | {mt['rel_rms']:.2e} | {mt['kl_mean']:.2e} | {mt['kl_max']:.2e} | "
                     f"{100 * mt['top1']:.1f}% |" + ("" if mt["finite"] else " (non-finite logits!)"))
    lines += ["",
              "Notes:",
              "- KL is KL(P_ref || P_candidate) per position, in nats; top-1 = share of positions whose argmax matches.",
              "- Weights GB/token excludes the embedding table (as in bench.py); llama.cpp's from the GGUF tensor sizes.",
              "- glm4rt bf16 and llama.cpp BF16 both round the activations to bf16 inside the matmuls (bf16 x bf16 "
              "products, fp32 sums); glm4rt int8/int4 and llama.cpp Q8_0/Q4_0 quantize them to 8 bits per block of 32"
              + (", except glm4rt's AMX rows: on this CPU a forward of 40 tokens or more multiplies bf16 activations "
                 "with the weights dequantized to bf16 (what its prompts compute); the VNNI rows force the int8-"
                 "activation kernels (what its decode steps compute)." if amx else "."),
              "- llama.cpp rows: `Llama(logits_all=True, flash_attn=True)`, f16 KV cache, without its AMX / repacked "
              "weight buffers (`use_extra_bufts=False`: its AMX buffer crashes on some Xeons). GGUF tensors are "
              "'pure' (token_embd and output in the named type as well).",
              "- glm4rt q4k: plain rounding (no calibration text: random weights have no meaningful one).",
              "- With random weights the two best logits are close (gap above), so top-1 agreement understates what a "
              "trained model with peaked distributions would show; rel. RMS error and KL are the steadier figures.",
              "- A random network amplifies weight errors on their way to the logits (8-bit blocks have ~0.5% RMS weight "
              "error, the logits here move by ~3%), so compare the rows with each other (glm4rt int8 vs Q8_0, int4 vs "
              "Q4_0 on the same weights) rather than with figures published for trained models.",
              ""]
    with open(os.path.join(HERE, args.out + ".md"), "w") as f:
        f.write("\n".join(lines))
    say("\n" + "\n".join(lines))
    say(f"wrote benchmarks/{args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
