#!/usr/bin/env python
"""Quantization quality on real text: the demo model (glm4rt.DEMO_MODEL, trained by
tools/train_demo.py) on its held-out text, glm4rt's formats next to llama.cpp's, same token ids.

    apt-get install bible-kjv fortunes-zh          # the held-out text (as in training)
    python benchmarks/quality_text.py               # ~5 min on 2 cores

The reference is glm4rt ``dtype="float32"`` on the demo model (its stored bf16 weights in fp32
arithmetic). Candidates: glm4rt bf16 (default) / int8 / int4 / q4k, quantized on load, and q4k rounded by
GPTQ on the demo's calibration text (``glm4rt.calibrate``); llama.cpp F32
(a check of the conversion), Q8_0, Q4_0, Q4_K_M and IQ4_NL, made from the same weights by
llama.cpp's converter and ``llama-quantize`` (benchmarks/llama_tools.py) and run by
llama-cpp-python. Every candidate computes the logits at every position of the same windows of the
held-out documents (48 Bible chapters and 16 poems, up to 1024 tokens each, each window from its
document's start or where the last one ended). Reported per candidate: bits per weight of the
matrices a token reads (every tensor but the embedding table, from the files), held-out perplexity
and its difference from the reference's, mean KL(P_ref || P_cand) per position in nats, and top-1
agreement with the reference. Writes benchmarks/quality-text.md and .json.
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
sys.path.insert(0, os.path.join(ROOT, "tools"))

import llama_tools  # noqa: E402
from bench import machine_info, say  # noqa: E402
from quality import log_softmax  # noqa: E402

WINDOW = 1024  # the demo model's context (it was trained on windows of this length)
LLAMA_QUANTS = ["Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL"]


def held_out_windows(tokenizer) -> list[list[int]]:
    """The demo's held-out documents as token ids ([gMASK]<sop> first, as in training), cut into
    windows of at most WINDOW tokens."""
    import train_demo

    _, chapters = train_demo.split(train_demo.bible_chapters())
    _, poems = train_demo.split(train_demo.poems())
    texts = [train_demo.chapter_text(c) for c in chapters] + [train_demo.poem_text(p) for p in poems]
    windows = []
    for t in texts:
        ids = tokenizer.encode(t)
        windows += [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i:i + WINDOW]) > 1]
    return windows


def glm4rt_logits(windows, model=None, **load) -> tuple[list[np.ndarray], float]:
    import glm4rt

    if model is None:
        model = glm4rt.Glm4ForCausalLM.from_pretrained(glm4rt.DEMO_MODEL, **load)
    params = model.named_parameters()
    skip = "model.embed_tokens.weight"
    nbytes = sum(a.nbytes for k, a in params.items() if k != skip)
    n_weights = sum(int(np.prod(s.shape)) for k, s in glm4rt.Glm4ForCausalLM.tensor_specs(model.config).items()
                    if k != skip)
    return [model(np.array([w])).logits[0] for w in windows], 8 * nbytes / n_weights


def llama_logits(path: str, windows, threads: int) -> tuple[list[np.ndarray], float]:
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(path).tensors if t.name != "token_embd.weight"]
    bpw = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    llm = llama_tools.open_llama(path, n_ctx=WINDOW, n_batch=512, n_threads=threads, logits_all=True, verbose=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        out.append(np.array(llm.scores[:len(w)], dtype=np.float32))
    del llm
    return out, bpw


def metrics(ref: list[np.ndarray], cand: list[np.ndarray], windows) -> dict:
    nll_ref = nll = kl = 0.0
    agree = n = 0
    for r, c, w in zip(ref, cand, windows):
        lr, lc = log_softmax(r[:-1]), log_softmax(c[:-1])  # predictions of tokens 1..
        target = np.array(w[1:])
        rows = np.arange(len(target))
        nll_ref -= lr[rows, target].sum()
        nll -= lc[rows, target].sum()
        kl += (np.exp(lr) * (lr - lc)).sum()
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        n += len(target)
    return {"ppl": float(np.exp(nll / n)), "ppl_ref": float(np.exp(nll_ref / n)), "kl_mean": kl / n,
            "top1": agree / n, "positions": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="bf16,int8,int4,q4k,q4k+calibration", help="glm4rt formats")
    p.add_argument("--llama", default=",".join(LLAMA_QUANTS), help="llama.cpp types ('' for none)")
    p.add_argument("--out", default="quality-text")
    args = p.parse_args(argv)
    import glm4rt

    glm4rt.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/quality_text.py"]
                                   + (argv if argv is not None else sys.argv[1:]))
    tok = glm4rt.Glm4Tokenizer.from_pretrained(glm4rt.DEMO_MODEL)
    windows = held_out_windows(tok)
    say(f"{len(windows)} windows, {sum(map(len, windows))} tokens")

    ref, ref_bpw = glm4rt_logits(windows, dtype="float32")
    rows = []
    for fmt in [f for f in args.formats.split(",") if f]:
        model = None
        if fmt == "q4k+calibration":  # GPTQ on the demo's calibration text (its training split)
            from glm4rt import calibrate

            with open(os.path.join(glm4rt.DEMO_MODEL, "calibration.txt"), encoding="utf-8") as f:
                model = calibrate.quantize_gptq(glm4rt.DEMO_MODEL, f.read(), max_tokens=40000, window=WINDOW)
        load = {"quantization": fmt} if fmt in ("int8", "int4", "q4k") else {}
        logits, bpw = glm4rt_logits(windows, model, **load)
        rows.append({"candidate": f"glm4rt {fmt}", "bpw": bpw, **metrics(ref, logits, windows)})
        say(json.dumps(rows[-1]))
    quants = [q for q in args.llama.split(",") if q]
    if quants:
        work = os.path.join(llama_tools.CACHE, "demo-gguf")
        os.makedirs(work, exist_ok=True)
        f32 = os.path.join(work, "demo-F32.gguf")
        if not os.path.isfile(f32):
            llama_tools.convert(glm4rt.DEMO_MODEL, f32, "f32")
        for q in ["F32"] + quants:
            path = f32 if q == "F32" else os.path.join(work, f"demo-{q}.gguf")
            if not os.path.isfile(path):
                llama_tools.quantize(f32, path, q)
            logits, bpw = llama_logits(path, windows, args.threads)
            rows.append({"candidate": f"llama.cpp {q}" + (" (conversion check)" if q == "F32" else ""), "bpw": bpw,
                         **metrics(ref, logits, windows)})
            say(json.dumps(rows[-1]))
            if q != "F32":  # the same file read by glm4rt (glm4rt.gguf_io)
                logits, bpw = glm4rt_logits(windows, glm4rt.Glm4ForCausalLM.from_pretrained(path))
                rows.append({"candidate": f"glm4rt reading llama.cpp's {q} GGUF", "bpw": bpw,
                             **metrics(ref, logits, windows)})
                say(json.dumps(rows[-1]))

    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
               "machine": machine_info(), "training": json.load(open(os.path.join(glm4rt.DEMO_MODEL, "training.json")))
               ["settings"], "positions": rows[0]["positions"] if rows else 0, "reference_bpw": ref_bpw, "rows": rows}
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    ppl_ref = rows[0]["ppl_ref"] if rows else float("nan")
    lines = ["# Quantization quality on real text (the demo model)", "",
             f"- Date: {results['date']}", f"- Command: `{command}`",
             f"- Machine: {results['machine'].get('cpu_model', '')}, {', '.join(results['machine'].get('cpu_flags_of_note', []))}",
             f"- Model: glm4rt's demo model (7.4M parameters, bf16; `glm4rt/demo_model`), its held-out text: "
             f"{len(windows)} windows of up to {WINDOW} tokens, {results['positions']} predicted positions.",
             f"- Reference: glm4rt `dtype=\"float32\"` (the bf16 weights in fp32 arithmetic), held-out perplexity "
             f"{ppl_ref:.3f}.", "",
             "| candidate | bits/weight (all but the embedding) | perplexity | delta vs reference | mean KL (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['bpw']:.2f} | {r['ppl']:.3f} | {r['ppl'] - r['ppl_ref']:+.3f} | "
                     f"{r['kl_mean']:.2e} | {100 * r['top1']:.2f}% |")
    lines += ["", "Notes:",
              "- KL is KL(P_ref || P_candidate) of the next-token distribution, averaged over every position.",
              "- llama.cpp's types are made by `llama-quantize` from the F32 GGUF of llama.cpp's converter, with its own "
              "per-tensor choices (Q4_K_M: Q6_K for the output and some ffn_down / attn_v; the demo's ffn_down has 704 "
              "columns, not a multiple of 256, so K-quants fall back to Q5_0 / Q8_0 there). Bits per weight count "
              "those choices.",
              "- \"glm4rt reading llama.cpp's X GGUF\": the llama.cpp file loaded by glm4rt: Q8_0 / Q4_0 / Q4_K "
              "tensors become int8 / int4 / q4k without rounding again; other types (Q6_K, Q5_0, IQ4_NL ...) are "
              "quantized again to int8 (their bits/weight count glm4rt's int8).",
              "- llama.cpp runs without its AMX / repacked weight buffers (`use_extra_bufts=False`): on a Xeon with "
              "AMX its AMX buffer crashes the process on these files (benchmarks/llama_tools.py, open_llama).",
              "- glm4rt int8 / int4: blocks of 32 with an fp16 scale (as Q8_0 / Q4_0); q4k: blocks of 32 with an 8-bit "
              "scale and minimum, fp16 D and M per 256 (Q4_K's structure), rounded to the nearest code (quantize on "
              "load), or with `+calibration` by GPTQ on `glm4rt/demo_model/calibration.txt` (40k tokens of the "
              "training split; `glm4rt quantize --format q4k --calibration`). Every glm4rt format quantizes every "
              "projection and the lm_head alike.", ""]
    with open(os.path.join(HERE, args.out + ".md"), "w") as f:
        f.write("\n".join(lines))
    say("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
