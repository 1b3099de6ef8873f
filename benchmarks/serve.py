"""Serving benchmark: ``glm4rt serve`` against llama.cpp's ``llama-server``, same weights, same run.

Random weights at the GLM-4-9B geometry (``--layers`` of them, synth.py), glm4rt int4 / int8 against
llama.cpp Q4_0 / Q8_0 of the same bf16 weights (equal bits per weight). Both servers are started
once per format with the same thread count and the same number of parallel slots, and every
measurement alternates between them (A B, then B A, ...), so that both see the same stretches of
the machine's drifting memory bandwidth. Clients stream completions of token-id prompts (no
tokenizer differences), greedy, ``ignore_eos``.

Measured:
- aggregate output tok/s with 1 / 2 / 4 / 8 concurrent streaming clients (prompt lengths from
  ``--prompt-lengths`` in turn), time to first token p50/p95 and inter-token latency p50/p95;
- the inter-token latency of 4 running streams while a ``--arrival-prompt``-token prompt arrives,
  against the same streams' latency before it;
- the time to first token of a chat's turn 2 (turn 1's prompt, an answer and a new message) with
  prefix reuse (``cache_prompt``, both servers' default) and without it;
- one stream's decode against the memory bandwidth: a probe (glm4rt's, the servers' thread count)
  runs right before each server's one-stream round, and the weights it reads per token (every
  tensor but the embedding table) times its tok/s is compared with it. One stream reads all the
  weights for every token, so no server can decode it faster than the bandwidth allows.

llama-server is built from the llama.cpp sources that the ``llama-cpp-python`` sdist vendors
(``--llama-server PATH`` uses another build), into ``benchmarks/cache/``.

    python benchmarks/serve.py                       # 8 layers, int4 and int8, 2 threads (~30 min)
    python benchmarks/serve.py --quick               # 1 layer, int4, 1 rep: a functional check
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, "cache")
sys.path.insert(0, HERE)
import llama_tools  # noqa: E402
import synth  # noqa: E402

LLAMA_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the servers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def safetensors_bytes(ckpt: str) -> int:
    """Bytes of every tensor of a safetensors checkpoint but the embedding table: what one decode
    step reads."""
    total = 0
    for name in os.listdir(ckpt):
        if name.endswith(".safetensors"):
            with open(os.path.join(ckpt, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items()
                         if k != "__metadata__" and k != "model.embed_tokens.weight")
    return total


class ServerCrashed(RuntimeError):
    """A server process died of SIGSEGV or SIGILL before it was ready."""


class Server:
    """A server subprocess on a loopback port."""

    def __init__(self, name: str, cmd: list[str], port: int, weight_bytes: int, env=None) -> None:
        self.name, self.port, self.weight_bytes = name, port, weight_bytes  # weights read per token
        self.log = open(os.path.join(CACHE, f"serve-{name.replace(' ', '_')}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                error = ServerCrashed if self.proc.returncode in (-signal.SIGSEGV, -signal.SIGILL) else RuntimeError
                raise error(f"{name} exited with {self.proc.returncode}: see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{name} did not become ready")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_completion(port: int, prompt: list[int], max_tokens: int, cache_prompt: bool = True) -> dict:
    """One streaming completion: send time, chunk arrival times, tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": cache_prompt, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    times, usage = [], None
    for line in r:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        if any(c.get("finish_reason") is None for c in chunk.get("choices", [])):
            times.append(time.perf_counter())
    conn.close()
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"t0": t0, "times": times, "tokens": tokens, "end": time.perf_counter()}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def prompt_ids(rng, n: int) -> list[int]:
    return [int(t) for t in rng.integers(256, 3000, n)]  # two-character text tokens of synth's vocabulary


# ---- the measurements ---------------------------------------------------------------------------

def concurrency_round(port: int, prompts: list[list[int]], max_tokens: int) -> dict:
    results = [None] * len(prompts)

    def run(i):
        results[i] = stream_completion(port, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    # Steady decode: while every stream has its first token and none has ended.
    w0, w1 = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    in_window = sum(w0 < t <= w1 for r in results for t in r["times"])
    decode = in_window / (w1 - w0) if w1 > w0 and in_window >= 2 * len(results) else float("nan")
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "decode_tok_s": decode, "ttft": ttft, "itl": itl}


def scaling_round(port: int, rng, n: int, max_tokens: int) -> float:
    """Aggregate decode tok/s of n streams with short prompts (16 tokens), in the window where
    all of them decode: what batching n streams into each step gives."""
    return concurrency_round(port, [prompt_ids(rng, 16) for _ in range(n)], max_tokens)["decode_tok_s"]


def arrival_round(port: int, rng, n_streams: int, arrival_len: int, max_tokens: int) -> dict:
    """n_streams decode; once each has 8 tokens, a long prompt arrives. Inter-token gaps of the
    streams before the arrival vs while it is prefilled (until its first token)."""
    streams = [None] * n_streams
    marks: dict = {}

    def run(i):
        streams[i] = stream_completion(port, prompt_ids(rng, 32), max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    # wait until the streams decode: give them a few seconds, proportional to a decode step
    warm = stream_completion(port, prompt_ids(rng, 8), 4)  # a short request: one step's length
    step = (warm["times"][-1] - warm["times"][0]) / max(1, len(warm["times"]) - 1)
    time.sleep(max(1.0, 12 * step))
    marks["arrive"] = time.perf_counter()
    big = stream_completion(port, prompt_ids(rng, arrival_len), 4)
    marks["first"] = big["times"][0] if big["times"] else big["end"]
    for t in threads:
        t.join()
    before, during = [], []
    for s in streams:
        for a, b in zip(s["times"], s["times"][1:]):
            if b <= marks["arrive"] and a >= marks["arrive"] - 10 * max(step, 0.01):
                before.append(b - a)
            elif a >= marks["arrive"] and b <= marks["first"] + step:
                during.append(b - a)
    return {"before": before, "during": during, "arrival_ttft": marks["first"] - marks["arrive"]}


def prefix_round(port: int, rng, turn1_len: int, answer_len: int, new_len: int) -> dict:
    """A chat's turn 2: with the cache of turn 1 (reuse) and without (cache_prompt false)."""
    p1 = prompt_ids(rng, turn1_len)
    stream_completion(port, p1, answer_len)
    p2 = p1 + prompt_ids(rng, answer_len) + prompt_ids(rng, new_len)
    warm = stream_completion(port, p2, 1)
    cold = stream_completion(port, p1[:1] + p2[1:], 1, cache_prompt=False)  # (another first token)
    return {"reuse": warm["times"][0] - warm["t0"], "cold": cold["times"][0] - cold["t0"],
            "prompt": len(p2)}


# ---- driver ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--formats", default="int4,int8")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt-lengths", default="32,128,256,64")
    p.add_argument("--arrival-prompt", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=None, help="glm4rt serve --prefill-chunk (default: its own)")
    p.add_argument("--ctx", type=int, default=1024, help="positions per slot, both servers")
    p.add_argument("--peers", default="llama", help="llama or none")
    p.add_argument("--llama-server", default=None, help="a llama-server binary (default: build one)")
    p.add_argument("--quick", action="store_true", help="1 layer, int4, clients 1,4, 1 rep")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.formats, args.clients, args.reps = 1, "int4", "1,4", 1
    args.formats = args.formats.split(",")
    args.clients = [int(c) for c in args.clients.split(",")]
    args.prompt_lengths = [int(n) for n in args.prompt_lengths.split(",")]
    args.out = args.out or ("serve-quick" if args.quick else "serve")
    return args


def start_servers(args, fmt: str, ckpt: str, notes: list[str]) -> list[Server]:
    n = max(args.clients + [4]) + 2  # the arrival measurement adds 2 requests to 4 streams
    servers = []
    qdir = os.path.join(CACHE, os.path.basename(ckpt) + f"-{fmt}")
    if not os.path.isfile(os.path.join(qdir, "config.json")):
        say(f"writing the {fmt} checkpoint {qdir}")
        subprocess.run([sys.executable, "-m", "glm4rt", "quantize", ckpt, qdir, "--format", fmt], check=True)
        synth.ensure_tokenizer(qdir, synth.Geometry().vocab_size)
    port = free_port()
    cmd = [sys.executable, "-m", "glm4rt", "--threads", str(args.threads), "serve", "--model", qdir,
           "--port", str(port), "--parallel", str(n), "--ctx", str(args.ctx)]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    servers.append(Server(f"glm4rt {fmt}", cmd, port, safetensors_bytes(qdir)))
    if args.peers == "llama":
        binary = args.llama_server or llama_tools.build_program("llama-server")
        gguf = synth.ensure_gguf(ckpt, fmt, log=say)
        port = free_port()
        env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(binary))
        cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(n), "-c", str(n * args.ctx), "-cb", "--no-webui",
               "-b", "2048", "-ub", "512"]
        weight_bytes = sum(v for k, v in synth.gguf_tensor_bytes(gguf).items() if k != "token_embd.weight")
        name = f"llama.cpp {LLAMA_TYPES[fmt]}"
        try:
            servers.append(Server(name, cmd, port, weight_bytes, env=env))
        except ServerCrashed:
            # On Xeons with AMX, llama.cpp's AMX weight buffer (one of its "repacked" layouts) crashes
            # at the first evaluation (SIGSEGV, or SIGILL: seen both on one machine); --no-repack is
            # what its users have to pass there.
            say(f"{name} crashed at start; again with --no-repack")
            notes.append(f"{name} crashed (SIGSEGV / SIGILL) at start with its default weight repacking on this "
                         "CPU and ran with `--no-repack`")
            servers.append(Server(name, cmd + ["--no-repack"], port, weight_bytes, env=env))
    for s in servers:  # the first request pages the memory-mapped weights in: not measured
        stream_completion(s.port, list(range(300, 316)), 4)
    return servers


def main(argv=None) -> int:
    import numpy as np

    from glm4rt import ops

    args = parse_args(argv)
    ops.set_num_threads(args.threads)  # the bandwidth probe's
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/serve.py"] + (argv or sys.argv[1:]))
    g = synth.Geometry(num_hidden_layers=args.layers)
    ckpt = synth.ensure_checkpoint(g, log=say)
    synth.ensure_tokenizer(ckpt, g.vocab_size)
    results = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": os.popen("lscpu | grep 'Model name'").read().strip(), "settings": vars(args), "formats": {},
               "notes": []}
    for fmt in args.formats:
        servers = start_servers(args, fmt, ckpt, results["notes"])
        res = {s.name: {"concurrency": {}, "arrival": [], "prefix": [], "one_stream": [],
                        "weight_gb": s.weight_bytes / 1e9} for s in servers}
        try:
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else servers[::-1]
                for n in args.clients:
                    rng = np.random.default_rng(1000 * rep + n)
                    prompts = [prompt_ids(rng, args.prompt_lengths[i % len(args.prompt_lengths)]) for i in range(n)]
                    for s in order:
                        r = concurrency_round(s.port, prompts, args.max_tokens)
                        res[s.name]["concurrency"].setdefault(str(n), []).append(r)
                        say(f"{fmt} rep {rep} {n} clients {s.name}: {r['tok_s']:.1f} tok/s")
                for n in sorted(set(args.clients) | {1, 4}):
                    for s in order:
                        probe = ops.memory_read_bandwidth(256, 3) if n == 1 else None
                        d = scaling_round(s.port, np.random.default_rng(500 + n + rep), n, 2 * args.max_tokens)
                        res[s.name].setdefault("scaling", {}).setdefault(str(n), []).append(d)
                        if probe:
                            res[s.name]["one_stream"].append({"probe_gb_s": probe, "tok_s": d})
                        say(f"{fmt} rep {rep} decode {n} streams {s.name}: {d:.1f} tok/s")
                for s in order:
                    rng = np.random.default_rng(7 + rep)
                    a = arrival_round(s.port, rng, 4, args.arrival_prompt, 6 * args.max_tokens)
                    res[s.name]["arrival"].append(a)
                    say(f"{fmt} rep {rep} arrival {s.name}: p95 ITL {percentile(a['before'], .95) * 1e3:.0f} -> "
                        f"{percentile(a['during'], .95) * 1e3:.0f} ms")
                    rng = np.random.default_rng(70 + rep)
                    pr = prefix_round(s.port, rng, 512, 32, 32)
                    res[s.name]["prefix"].append(pr)
                    say(f"{fmt} rep {rep} turn 2 {s.name}: {pr['reuse'] * 1e3:.0f} ms reuse, {pr['cold'] * 1e3:.0f} ms cold")
        finally:
            for s in servers:
                s.close()
        results["formats"][fmt] = res
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(HERE, args.out + ".md"), "w") as f:
        f.write(render(results))
    print(render(results))
    return 0


def render(results: dict) -> str:
    lines = [f"# Serving benchmark ({results['date']})", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}", ""]
    lines += [f"Note: {n}." for n in results.get("notes", [])] + ([""] if results.get("notes") else [])
    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    for fmt, res in results["formats"].items():
        names = list(res)
        lines += [f"## {fmt}", "", "Aggregate output tok/s over each round (prompts included) and while every "
                  "stream decodes (medians of reps); time to first token and inter-token latency p50 / p95 in ms "
                  "(all requests of all reps); ratios are medians of per-rep ratios:", "",
                  "| clients | " + " | ".join(f"{n} tok/s | {n} decode tok/s | {n} TTFT | {n} ITL" for n in names)
                  + (" | glm4rt / llama.cpp tok/s | decode |" if len(names) > 1 else " |"),
                  "|---" * (1 + 4 * len(names) + 2 * (len(names) > 1)) + "|"]
        for c in res[names[0]]["concurrency"]:
            row = [c]
            for n in names:
                rounds = res[n]["concurrency"][c]
                tok_s = statistics.median(r["tok_s"] for r in rounds)
                ttft = [x for r in rounds for x in r["ttft"]]
                itl = [x for r in rounds for x in r["itl"]]
                decode = statistics.median(r.get("decode_tok_s", float("nan")) for r in rounds)
                row += [f"{tok_s:.1f}", f"{decode:.1f}" if decode == decode else "n/a", f"{ms(percentile(ttft, .5))} / {ms(percentile(ttft, .95))}",
                        f"{ms(percentile(itl, .5))} / {ms(percentile(itl, .95))}"]
            if len(names) > 1:
                for key in ("tok_s", "decode_tok_s"):
                    ratios = [a.get(key, float("nan")) / b.get(key, float("nan"))
                              for a, b in zip(res[names[0]]["concurrency"][c], res[names[1]]["concurrency"][c])]
                    row.append(f"{statistics.median(ratios):.2f}x")
            lines.append("| " + " | ".join(row) + " |")
        if res[names[0]].get("scaling"):
            lines += ["", "Decode alone: aggregate tok/s of n streams with 16-token prompts while all of them "
                      "decode (medians of reps), and n streams / 1 stream:", "",
                      "| streams | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
            for k in sorted(res[names[0]]["scaling"], key=int):
                cells = []
                for n in names:
                    sc = res[n]["scaling"]
                    v, one = statistics.median(sc[k]), statistics.median(sc["1"])
                    cells.append(f"{v:.1f} ({v / one:.2f}x)")
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
        if res[names[0]].get("one_stream"):
            lines += ["", "One stream against the memory bandwidth: weights read per token (all but the embedding), "
                      "the bandwidth probe right before each server's one-stream round (median), and the decode's "
                      "tok/s x bytes per token as a share of it (median of the per-rep shares):", ""]
            for n in names:
                one = res[n]["one_stream"]
                shares = [r["tok_s"] * res[n]["weight_gb"] / r["probe_gb_s"] for r in one]
                lines.append(f"- {n}: {res[n]['weight_gb']:.2f} GB/token, probe "
                             f"{statistics.median(r['probe_gb_s'] for r in one):.1f} GB/s, decode at "
                             f"{statistics.median(shares):.0%} of it ({', '.join(f'{x:.0%}' for x in shares)})")
        lines += ["", "4 running streams while a long prompt arrives: p95 inter-token latency before -> during "
                  "its prefill (ms), and the new prompt's time to first token:", ""]
        for n in names:
            a = res[n]["arrival"]
            before = [x for r in a for x in r["before"]]
            during = [x for r in a for x in r["during"]]
            ratio = percentile(during, .95) / percentile(before, .95) if before and during else float("nan")
            lines.append(f"- {n}: {ms(percentile(before, .95))} -> {ms(percentile(during, .95))} ms "
                         f"({ratio:.2f}x); arrival TTFT {ms(statistics.median(r['arrival_ttft'] for r in a))} ms")
        lines += ["", "Chat turn 2 (turn 1: 512 tokens, then a 32-token answer and a 32-token message): time to "
                  "first token with prefix reuse / without (median ms):", ""]
        for n in names:
            p = res[n]["prefix"]
            reuse, cold = statistics.median(r["reuse"] for r in p), statistics.median(r["cold"] for r in p)
            lines.append(f"- {n}: {ms(reuse)} / {ms(cold)} ({reuse / cold:.1%})")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
