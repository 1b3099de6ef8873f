#!/usr/bin/env python
"""glm4rt speed benchmark against llama.cpp (llama-cpp-python) and transformers, on random weights
at the GLM-4-9B-0414 geometry with a configurable layer count.

    python benchmarks/bench.py                      # 8 layers, threads 1,2, 4 reps, all formats/peers
    python benchmarks/bench.py --layers 40          # the full 9B model (needs ~19 GB disk per format)
    python benchmarks/bench.py --quick              # 1 layer, 2 reps, no depth-4096: a functional check
    python benchmarks/bench.py --load idle,busy     # each thread count also with one core kept busy
    python benchmarks/bench.py --baseline DIR       # also glm4rt of another commit, built in DIR

What it does:
  1. builds (once, cached in benchmarks/cache/) a bf16 sharded safetensors checkpoint with random
     weights (see synth.py for the scheme) and GGUF files of the same weights (BF16, Q8_0, Q4_0);
  2. per format, loads glm4rt and its peers each in its own process (workers.py --serve; each peak
     RSS is that engine's alone) and keeps them all loaded;
  3. measures, at each thread count: prefill tok/s for 128- and 512-token prompts, decode tok/s over
     64 greedy tokens at context depth 0 and 4096; each repetition runs on every engine of the
     format in turn (A B C, C B A, ...) right after a memory-bandwidth probe, so that the engines
     compared meet the same machine state (this machine's bandwidth drifts by up to 2x within
     minutes); a decode repetition is itself cut into slices of 8 tokens taken in turn. Speeds
     are medians over the repetitions; ratios are medians of the per-repetition ratios; decode's
     share of the bandwidth limit uses the probe read next to each repetition;
     With --load idle,busy every thread count is measured twice: idle, then while another process
     keeps one core busy (a pure-Python loop, as a browser or an IDE next to the model would);
  4. prints the tables and writes benchmarks/results.md and results.json (--quick: results-quick.*).

Format names: bf16 (glm4rt bf16 / llama.cpp BF16 / transformers bf16), int8 (glm4rt int8 /
llama.cpp Q8_0), int4 (glm4rt int4 / llama.cpp Q4_0), fp32 (glm4rt and transformers float32), q4k
(glm4rt only; in the int4 group when both are run: "glm4rt q4k / glm4rt int4").
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import synth  # noqa: E402

LLAMA_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
ENGINE_LABEL = {"glm4rt": "glm4rt", "glm4rt-base": "glm4rt base", "llama": "llama.cpp",
                "transformers": "transformers"}


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- machine description ------------------------------------------------------------------------

def machine_info() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "f16c"))
        cores = {(line.split(":")[1].strip()) for line in cpuinfo.splitlines() if line.startswith("core id")}
        info["physical_cores_seen"] = len(cores) or None
    except OSError:
        info["cpu_model"] = platform.processor()
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    mem = meminfo()
    info["ram_total_gib"] = round(mem.get("MemTotal", 0) / 2**30, 1)
    info["ram_available_gib_at_start"] = round(mem.get("MemAvailable", 0) / 2**30, 1)
    try:
        import glm4rt

        info["glm4rt_isa"] = glm4rt.cpu_isa()
        info["glm4rt_supported_isas"] = glm4rt.supported_isas()
    except Exception as e:  # noqa: BLE001
        info["glm4rt_isa"] = f"unavailable ({e})"
    versions = {}
    for pkg in ("glm4rt", "numpy", "llama_cpp_python", "gguf", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    # What the installed llama.cpp was compiled for (e.g. whether its AMX backend is in: README).
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        features = [f.split("=")[0].strip() for f in probe.stdout.split("|") if f.strip().endswith("= 1")]
        info["llama_cpp_cpu_features"] = [f.removeprefix("CPU :").strip() for f in features]
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        info["git"] = commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


# ---- running children ----------------------------------------------------------------------------

def run_child(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="glm4rt-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TRANSFORMERS_VERBOSITY="error")
        try:
            proc = subprocess.run([sys.executable, os.path.join(HERE, "workers.py"), spec_path, out_path],
                                  timeout=timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
        if not os.path.isfile(out_path):
            return {"status": "error", "reason": f"worker exited with code {proc.returncode} and no result "
                                                 "(killed? out of memory? a native abort?)"}
        with open(out_path) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - t0
        return result


def estimate_rss_bytes(engine: str, fmt: str, g: synth.Geometry) -> int:
    """A rough resident-size estimate used to skip runs that cannot fit in memory."""
    n_params = sum(math.prod(s) for _, s, *_ in synth.tensor_plan(g))
    per = {"fp32": 4, "bf16": 2, "int8": 1.1, "int4": 0.6, "q4k": 0.62}[fmt]
    if engine == "transformers" and fmt == "fp32":
        per = 4.2  # loading reads the bf16 file too
    return int(n_params * per) + 2 * 2**30


class Server:
    """A workers.py --serve child: one engine x format, loaded once, answering timing commands."""

    def __init__(self, spec: dict, timeout: float) -> None:
        self.timeout = timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="glm4rt-bench-")
        spec_path = os.path.join(self.tmp.name, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TRANSFORMERS_VERBOSITY="error")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "workers.py"), "--serve", spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            why = f"no answer in {self.timeout:.0f} s" if not ready else \
                f"worker exited with code {self.proc.returncode} (killed? out of memory? a native abort?)"
            return {"status": "error", "reason": why}
        return json.loads(line)

    def hello(self) -> dict:
        """The load report (status, load_s, weight_bytes, ...)."""
        return self._read()

    def call(self, **cmd) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return {"status": "error", "reason": "worker is gone"}
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()
        self.tmp.cleanup()


def probe_bandwidth(threads, size_mib: int) -> float:
    """Memory read bandwidth (GB/s) with ``threads`` threads ("auto": every CPU), read right before a
    repetition."""
    import glm4rt
    from glm4rt import ops

    glm4rt.set_num_threads(None if threads == "auto" else threads)
    return ops.memory_read_bandwidth(size_mib=size_mib, repeats=3)


def split_steps(steps: int, slices: int) -> list[int]:
    """``steps`` shared out over ``slices`` consecutive calls, the first ones taking the remainder."""
    return [steps // slices + (i < steps % slices) for i in range(slices)]


class BusyCore:
    """While active, a process that keeps one core busy (a pure-Python loop: no memory traffic to
    speak of), the competing load of --load busy. It ends by itself after ``limit_s`` in any case."""

    def __init__(self, active: bool, limit_s: float) -> None:
        self.active, self.limit_s, self.proc = active, limit_s, None

    def __enter__(self) -> "BusyCore":
        if self.active:
            code = f"import time\nend = time.monotonic() + {self.limit_s}\nwhile time.monotonic() < end: pass"
            self.proc = subprocess.Popen([sys.executable, "-c", code])
            time.sleep(0.5)  # running before the first measurement
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def setting_label(threads, load: str) -> str:
    """The key of one measured setting in a run's results: "2", or "2 busy" under load."""
    return str(threads) if load == "idle" else f"{threads} {load}"


def setting_order(label: str) -> tuple:
    """Idle settings first, then those under load, each by thread count ("auto" last)."""
    threads, _, load = label.partition(" ")
    return (load, 1, 0) if threads == "auto" else (load, 0, int(threads))


def merge_slices(answers: list[dict]) -> dict:
    """One repetition's answer from its slices: their times summed, their tokens concatenated."""
    if len(answers) == 1:
        return answers[0]
    return {"status": "ok", "s": sum(a["s"] for a in answers),
            "tokens": [tok for a in answers for tok in a.get("tokens", [])]}


def per_rep_ratios(a: list, b: list) -> list:
    """Speed ratios A/B of repetitions run back to back (times in seconds: B's time / A's time)."""
    return [tb / ta for ta, tb in zip(a, b) if ta and tb]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- report --------------------------------------------------------------------------------------

def fmt_num(x, digits=1, suffix=""):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}{suffix}"
    return f"{x:.{digits}f}{suffix}"


def tok_per_s(key: str, times: list, decode_steps: int) -> float:
    """Median speed of a measurement ("prefill N": N tokens, "decode D": decode_steps tokens)."""
    kind, n = key.split()
    return (int(n) if kind == "prefill" else decode_steps) / median(times)


def fmt_ratio(a, b):
    if a is None or b is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def bw_fraction(run: dict, t: str, depth, steps: int) -> float | None:
    """Median over repetitions of decode speed / (probe bandwidth right before it / weight bytes)."""
    r = run["threads"][t]
    times, probes = r["decode_s"].get(str(depth)), r.get("probe_gb_s", {}).get(f"decode {depth}")
    if not times or not probes or not run.get("weight_bytes"):
        return None
    return median([(steps / dt) * run["weight_bytes"] / (bw * 1e9) for dt, bw in zip(times, probes)])


def build_rows(results: dict) -> list[dict]:
    """One row per (run, thread count) with every number the tables show."""
    rows = []
    depth, steps = results["settings"]["depth"], results["settings"]["decode_steps"]
    for run in results["runs"]:
        if run.get("status") != "ok":
            rows.append({"engine": run["engine"], "format": run["format"], "threads": None, "status": run.get("status"),
                         "reason": run.get("reason", "")})
            continue
        for t, r in run["threads"].items():
            d0 = r["decode_tok_s"].get("0")
            dd = r["decode_tok_s"].get(str(depth)) if depth else None
            bw = median(r.get("probe_gb_s", {}).get("decode 0", []))
            limit = (bw * 1e9 / run["weight_bytes"]) if bw and run.get("weight_bytes") else None
            rows.append({
                "engine": run["engine"], "format": run["format"], "label": run["label"], "threads": t,
                "status": "ok", "load_s": run["load_s"], "first_call_s": run.get("first_call_s"),
                "peak_rss_gib": run["peak_rss_bytes"] / 2**30,
                "weight_gb": run["weight_bytes"] / 1e9,
                "prefill": {n: v for n, v in r["prefill_tok_s"].items()},
                "decode0": d0, "decode_depth": dd,
                "depth_ratio": (dd / d0) if (dd and d0) else None,
                "probe_gb_s": bw,
                "group": run.get("group"),
                "times": {**{f"prefill {n}": v for n, v in r["prefill_s"].items()},
                          **{f"decode {d}": v for d, v in r["decode_s"].items()}},
                "probes": r.get("probe_gb_s", {}),
                "bw_limit_tok_s": limit,
                "bw_fraction": bw_fraction(run, t, 0, steps),
                "bw_fraction_depth": bw_fraction(run, t, depth, steps) if depth else None,
            })
    return rows


def decode_slices_text(settings: dict) -> str:
    """How a decode repetition was cut into slices that the engines ran in turn (older results: none)."""
    slices, steps = settings.get("decode_slices", 1), settings["decode_steps"]
    if slices <= 1:
        return ""
    sizes = split_steps(steps, slices)
    size = f"{sizes[0]}" if len(set(sizes)) == 1 else f"{min(sizes)}-{max(sizes)}"
    return (f"; each decode repetition runs in {slices} slices of {size} steps, the engines taking turns slice "
            "by slice (A B C, C B A, ...; each slice goes on from the engine's previous one), so that they "
            "share the machine's bandwidth even when it changes within a repetition; an engine's time is the "
            "sum of its slices")


def render_markdown(results: dict) -> str:
    s = results["settings"]
    m = results["machine"]
    rows = build_rows(results)
    ok = [r for r in rows if r["status"] == "ok"]
    prompts = [str(n) for n in s["prompt_lengths"]]
    depth = s["depth"]
    out = []
    out.append(f"# glm4rt benchmark{' (quick)' if s['quick'] else ''}\n")
    out.append(f"- Date: {results['date']}")
    out.append(f"- Command: `{results['command']}`")
    out.append(f"- Machine: {m.get('cpu_model')}; {m.get('usable_cpus', m.get('logical_cpus'))} usable CPUs "
               f"({m.get('logical_cpus')} logical); {m.get('ram_total_gib')} GiB RAM; glm4rt ISA: {m.get('glm4rt_isa')}; "
               f"flags: {' '.join(m.get('cpu_flags_of_note', []))}")
    out.append("- Software: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
               + (f"; glm4rt git {m['git']}" if m.get("git") else "")
               + (f"; llama.cpp built for {' '.join(m['llama_cpp_cpu_features'])}" if m.get("llama_cpp_cpu_features") else ""))
    g = s["geometry"]
    out.append(f"- Model: random weights at the GLM-4-9B-0414 geometry with {g['num_hidden_layers']} of 40 layers "
               f"(hidden {g['hidden_size']}, intermediate {g['intermediate_size']}, {g['num_attention_heads']} heads / "
               f"{g['num_key_value_heads']} KV heads x {g['head_dim']}, vocab {g['vocab_size']}, untied lm_head), "
               f"bf16 safetensors `{os.path.relpath(s['checkpoint'], ROOT)}`")
    out.append(f"- Protocol: per format, glm4rt and its peers are loaded together (each in its own process) and "
               f"every measurement's {s['reps']} repetitions run on each engine in turn (A B C, then C B A, ...), each "
               f"round of engines right after a memory-bandwidth probe ({s.get('probe_mib', 256)} MiB read 3 times with the "
               "thread count of the run), so that the engines compared meet the same state of a machine whose "
               "bandwidth drifts. Speeds are medians over the repetitions; ratios are medians of the per-repetition "
               "ratios. Prefill = one forward over a fresh cache returning the last position's logits; decode = "
               f"{s['decode_steps']} greedy single-token steps (argmax fed back)"
               f"{f', at depth 0 and after a {depth}-token prefill (run once per engine and thread count, in turn; reported as prefill {depth})' if depth else ' at depth 0'}"
               f"{decode_slices_text(s)}. "
               "Peak RSS = the engine process's VmHWM (memory-mapped weight pages included). Load = "
               "constructor/from_pretrained wall time with a warm page cache; 1st call = the first forward after "
               "it (a 32-token prefill, where memory-mapped weights are paged in).")
    probes = {t: [x for run in results["runs"] if run.get("status") == "ok" and t in run.get("threads", {})
                  for key, v in run["threads"][t].get("probe_gb_s", {}).items() for x in v]
              for t in sorted({t for run in results["runs"] for t in run.get("threads", {})}, key=setting_order)}
    if any(probes.values()):
        out.append("- Memory read bandwidth probed before the repetitions (glm4rt.ops.memory_read_bandwidth; "
                   "min / median / max GB/s): " + ", ".join(
                       f"{t} (threads): {min(v):.1f} / {median(v):.1f} / {max(v):.1f}"
                       for t, v in probes.items() if v))
    out.append("")

    # main table
    head = ["engine", "format", "thr", "load s", "1st call s", "peak RSS GiB", "weights GB/tok"] \
        + [f"prefill {n} tok/s" for n in prompts] + ([f"prefill {depth} tok/s (1 run)"] if depth else []) \
        + ["decode d0 tok/s"]
    if depth:
        head += [f"decode d{depth} tok/s", f"d{depth}/d0"]
    head += ["probe GB/s", "BW-limit tok/s", "decode % of limit"]
    out.append("## Results\n")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in ok:
        cells = [ENGINE_LABEL[r["engine"]], r["label"], str(r["threads"]), fmt_num(r["load_s"], 2),
                 fmt_num(r["first_call_s"], 2), fmt_num(r["peak_rss_gib"], 2), fmt_num(r["weight_gb"], 2)]
        cells += [fmt_num(r["prefill"].get(n)) for n in prompts + ([str(depth)] if depth else [])]
        cells += [fmt_num(r["decode0"], 2)]
        if depth:
            cells += [fmt_num(r["decode_depth"], 2), fmt_num(r["depth_ratio"], 2)]
        cells += [fmt_num(r["probe_gb_s"], 1), fmt_num(r["bw_limit_tok_s"], 2),
                  fmt_num(100 * r["bw_fraction"] if r["bw_fraction"] else None, 0, "%")]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")

    def find(engine, fmt, t):
        for r in ok:
            if r["engine"] == engine and r["format"] == fmt and r["threads"] == t:
                return r
        return None

    metrics = [(f"prefill {n}", f"prefill {n}") for n in prompts]
    if depth:  # the long prompt that sets up the depth-4096 decode: one run per engine, in turn
        metrics.append((f"prefill {depth} (1 run)", f"prefill {depth}"))
    metrics.append(("decode d0", "decode 0"))
    if depth:
        metrics.append((f"decode d{depth}", f"decode {depth}"))
    threads = sorted({r["threads"] for r in ok}, key=setting_order)

    def speed_ratio(a, b, key):
        """glm4rt/peer: the median of per-repetition ratios when both ran in lockstep, else the
        ratio of the medians (marked)."""
        if a is None or b is None or key not in a["times"] or key not in b["times"]:
            return "n/a"
        ta, tb = a["times"][key], b["times"][key]
        if a["group"] is not None and a["group"] == b["group"] and len(ta) == len(tb):
            return f"{median(per_rep_ratios(ta, tb)):.2f}x"
        return f"{median(tb) / median(ta):.2f}x (not paired)"

    comp = []
    if s.get("baseline"):
        comp += [("glm4rt-base", fmt, fmt, f"glm4rt {fmt} / glm4rt base {fmt}") for fmt in s["formats"]]
    for fmt in s["formats"]:
        if fmt in LLAMA_TYPES:
            comp.append(("llama", fmt, fmt, f"glm4rt {fmt} / llama.cpp {LLAMA_TYPES[fmt]}"))
    if "q4k" in s["formats"] and "int4" in s["formats"]:
        comp.append(("glm4rt", "q4k", "int4", "glm4rt q4k / glm4rt int4"))
    for fmt in s["tf_formats"]:
        ours = fmt if fmt in s["formats"] else "bf16"
        if ours in s["formats"]:
            comp.append(("transformers", ours, fmt, f"glm4rt {ours} / transformers {fmt}"))
    if comp:
        out.append("## Speed ratios (glm4rt / peer; > 1 means glm4rt is faster)\n")
        out.append("Medians of the ratios of repetitions run back to back (see Protocol).\n")
        head = ["comparison", "thr"] + [name for name, _ in metrics] + ["peak RSS (peer/glm4rt)", "load time (peer/glm4rt)"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for peer, ours_fmt, peer_fmt, label in comp:
            for t in threads:
                a, b = find("glm4rt", ours_fmt, t), find(peer, peer_fmt, t)
                if a is None and b is None:
                    continue
                cells = [label, str(t)] + [speed_ratio(a, b, key) for _, key in metrics]
                cells.append(fmt_ratio(b["peak_rss_gib"] if b else None, a["peak_rss_gib"] if a else None))
                cells.append(fmt_ratio(b["load_s"] if b else None, a["load_s"] if a else None))
                out.append("| " + " | ".join(cells) + " |")
        out.append("")

    out += load_table(ok, metrics, s)

    # every decode repetition next to its probe: how each engine follows the machine's bandwidth
    for d in ([0] + ([depth] if depth else [])):
        key = f"decode {d}"
        lines = []
        for t in threads:
            for grp in sorted({r["group"] for r in ok if r["group"] is not None}):
                members = [r for r in ok if r["group"] == grp and r["threads"] == t and key in r["times"]]
                if not members:
                    continue
                probes = members[0]["probes"].get(key, [])
                for i, bw in enumerate(probes):
                    cells = [str(t), members[0]["label"] if members[0]["engine"] == "glm4rt" else members[0]["format"],
                             str(i + 1), f"{bw:.1f}"]
                    cells.append(", ".join(
                        f"{ENGINE_LABEL[r['engine']]} {r['label']} {s['decode_steps'] / r['times'][key][i]:.2f}"
                        f" ({100 * (s['decode_steps'] / r['times'][key][i]) * r['weight_gb'] / bw:.0f}%)"
                        for r in members if i < len(r["times"][key])))
                    lines.append("| " + " | ".join(cells) + " |")
        if lines:
            out.append(f"## Decode repetitions at depth {d} (tok/s, and % of the bandwidth the probe read just before)\n")
            out.append("| thr | format | rep | probe GB/s | tok/s (% of the probe's bandwidth) |")
            out.append("|---|---|---|---|---|")
            out += lines
            out.append("")

    if depth:
        out.append(f"## Long-context decode loss (decode tok/s at depth {depth} / at depth 0)\n")
        out.append("| engine | format | " + " | ".join(f"{t} thr" for t in threads) + " |")
        out.append("|" + "---|" * (2 + len(threads)))
        seen = []
        for r in ok:
            key = (r["engine"], r["format"])
            if key in seen:
                continue
            seen.append(key)
            cells = [ENGINE_LABEL[r["engine"]], r["label"]]
            for t in threads:
                x = find(r["engine"], r["format"], t)
                cells.append(fmt_num(x["depth_ratio"], 2) if x else "n/a")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    saved = [(run["format"], run["saved_checkpoint"]) for run in results["runs"]
             if run.get("engine") == "glm4rt" and run.get("saved_checkpoint")]
    if saved:
        out.append("## glm4rt quantized checkpoints (save_pretrained, then from_pretrained on the saved directory)\n")
        out.append("| format | status | size on disk GB | save s | load s | max abs logit diff vs quantize-at-load |")
        out.append("|---|---|---|---|---|---|")
        for fmt, sv in saved:
            out.append(f"| {fmt} | {sv.get('status')}{(': ' + sv['reason']) if sv.get('reason') else ''} | "
                       f"{fmt_num(sv['bytes_on_disk'] / 1e9, 2) if sv.get('bytes_on_disk') else 'n/a'} | "
                       f"{fmt_num(sv.get('save_s'), 2)} | {fmt_num(sv.get('load_s'), 2)} | "
                       f"{fmt_num(sv.get('max_abs_logit_diff_vs_original'), 6) if sv.get('max_abs_logit_diff_vs_original') is not None else 'n/a'} |")
        out.append("")

    sanity = consistency_lines(results)
    if sanity:
        out.append("## Sanity checks\n")
        out += sanity
        out.append("")

    over = [r for r in ok if (r["bw_fraction"] or 0) > 1.0]
    if over:
        out.append("Decode above 100% of the limit (" + ", ".join(
            f"{ENGINE_LABEL[r['engine']]} {r['label']} x{r['threads']}" for r in over)
            + ") means the bandwidth probe read less than that engine streamed: the probe is a lower bound "
            "(other load on the machine while it ran, or a probe that does not saturate the memory system).\n")

    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        out.append("## Not measured\n")
        for r in bad:
            out.append(f"- {ENGINE_LABEL[r['engine']]} {r['format']}: **{r['status']}** — {r['reason']}")
        out.append("")

    out.append("## Notes\n")
    out.append("- `BW-limit tok/s` = measured read bandwidth / bytes of weights read per token (every layer "
               "matrix, norm and bias plus lm_head in the engine's stored format; the embedding table is excluded "
               "because decode reads one row of it). glm4rt's bytes come from the arrays the model holds, "
               "llama.cpp's from the GGUF tensor sizes, transformers' from its parameters. KV-cache reads are "
               "not counted (small next to the weights at these depths).")
    out.append("- llama.cpp: llama-cpp-python `Llama(n_batch=512, n_ubatch=512, logits_all=False, "
               f"flash_attn={s['llama_flash_attn']})`, threads set with `llama_set_n_threads(ctx, t, t)`; prefill = "
               "`llm.eval(tokens)` after rewinding `n_tokens`; decode = `eval([token])` + argmax of "
               "`llama_get_logits_ith(ctx, -1)`; wall-clock time around those calls (the same Python-side timing "
               "as the other engines, so its Python binding overhead — a few µs per call — is included). GGUF "
               "tensors are 'pure': every matrix, token_embd and output in the named type (llama-quantize's "
               "Q4_0 default would keep output.weight in Q6_K); llama.cpp repacks Q4_0/Q8_0 for AVX-512 at load "
               "(part of its load time and RSS). Its KV cache is f16, glm4rt's fp32.")
    out.append("- transformers: `Glm4ForCausalLM.from_pretrained(dtype=...)`, `torch.set_num_threads(t)`, "
               "`torch.inference_mode()`, a `DynamicCache` passed as `cache=`, default attention (sdpa).")
    out.append("- glm4rt: `Glm4ForCausalLM.from_pretrained(dir, dtype='bfloat16')` (or `quantization=`), "
               "`glm4rt.set_num_threads(t)` (`None` for auto), a `Glm4Cache` allocated once for the longest run "
               "(`Glm4Cache.for_config(config, 1, capacity)`) and rewound with `crop()`; prefill with "
               "`logits_to_keep=1`.")
    return "\n".join(out) + "\n"


def load_table(ok: list[dict], metrics: list[tuple[str, str]], s: dict) -> list[str]:
    """With --load idle,busy: each engine's speed idle and under load at every thread count, and
    how its most threads under load compare with its best thread count under the same load."""
    if "busy" not in s.get("load", ["idle"]):
        return []
    counts = sorted(s["threads"], key=lambda t: setting_order(str(t)))
    fixed = [t for t in counts if t != "auto"]
    default = counts[-1]  # "auto" when measured, else the most threads
    labels = [setting_label(t, load) for load in s["load"] for t in counts]
    head = ["engine", "format", "metric"] + [f"{x} thr tok/s" for x in labels] + \
        [f"busy: {default} thr / best fixed"]
    out = ["## Under load (another process keeps one core busy)\n",
           f"tok/s per setting; the last column divides the speed with {default} threads under load by the best "
           "speed of any fixed thread count under the same load (>= 1: the default is right). \"auto\" is "
           "glm4rt's default thread count (`set_num_threads(None)`: every CPU, decode steps following the "
           "machine's load); the peers run it with as many threads as CPUs.\n",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    engines = []
    for r in ok:
        if (r["engine"], r["format"], r["label"]) not in engines:
            engines.append((r["engine"], r["format"], r["label"]))
    for engine, fmt, label in engines:
        by_setting = {r["threads"]: r for r in ok if (r["engine"], r["format"]) == (engine, fmt)}
        for name, key in metrics:
            def tok_s(setting):
                r = by_setting.get(setting)
                if r is None or key not in r["times"]:
                    return None
                return tok_per_s(key, r["times"][key], s["decode_steps"])
            cells = [ENGINE_LABEL[engine], label, name] + [fmt_num(tok_s(x), 2) for x in labels]
            busy = [tok_s(setting_label(t, "busy")) for t in fixed]
            mine = tok_s(setting_label(default, "busy"))
            cells.append(fmt_ratio(mine, max(busy)) if mine and busy and all(busy) else "n/a")
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def consistency_lines(results: dict) -> list[str]:
    """Greedy decode tokens: the same in every repetition (cache rewinding works), and how long
    each engine's sequence follows glm4rt bf16's (random weights have close top-2 logits, so
    rounding differences make sequences part after a while; 0 would point at a broken run)."""
    lines = []
    ref = None
    for run in results["runs"]:
        if run.get("status") == "ok" and run["engine"] == "glm4rt" and run["format"] == "bf16":
            ref = run
    for run in results["runs"]:
        if run.get("status") != "ok":
            continue
        parts = []
        for t, r in run["threads"].items():
            for depth, toks in r.get("decode_tokens", {}).items():
                same = r.get("decode_reps_identical", {}).get(depth)
                text = f"{t} thr d{depth}: reps {'identical' if same else 'DIFFER'}"
                if ref is not None and run is not ref:
                    rt = ref["threads"].get(t, {}).get("decode_tokens", {}).get(depth)
                    if rt:
                        n = next((i for i, (a, b) in enumerate(zip(toks, rt)) if a != b), min(len(toks), len(rt)))
                        text += f", first {n}/{len(toks)} generated tokens = glm4rt bf16's"
                parts.append(text)
        if parts:
            lines.append(f"- {ENGINE_LABEL[run['engine']]} {run['label']}: " + "; ".join(parts))
    return lines


def print_summary(results: dict) -> None:
    rows = build_rows(results)
    depth = results["settings"]["depth"]
    prompts = [str(n) for n in results["settings"]["prompt_lengths"]]
    head = f"{'engine':<13}{'format':<7}{'thr':>7}{'load s':>8}{'RSS GiB':>9}" + "".join(f"{'pf' + n:>9}" for n in prompts) \
        + f"{'dec d0':>9}" + (f"{'dec d' + str(depth):>11}" if depth else "") + f"{'%BW':>6}"
    say("\n" + head)
    for r in rows:
        if r["status"] != "ok":
            say(f"{ENGINE_LABEL[r['engine']]:<13}{r['format']:<7}  {r['status']}: {r['reason'][:100]}")
            continue
        line = f"{ENGINE_LABEL[r['engine']]:<13}{r['label']:<7}{r['threads']:>7}{r['load_s']:>8.2f}{r['peak_rss_gib']:>9.2f}"
        line += "".join(f"{(r['prefill'].get(n) or 0):>9.1f}" for n in prompts)
        line += f"{(r['decode0'] or 0):>9.2f}"
        if depth:
            line += f"{(r['decode_depth'] or 0):>11.2f}"
        line += f"{(100 * r['bw_fraction'] if r['bw_fraction'] else 0):>5.0f}%"
        say(line)


# ---- lockstep runs -------------------------------------------------------------------------------

def plan_groups(args) -> list[list[tuple[str, str, str]]]:
    """Engines measured together, (engine, format, label) each: glm4rt and its peers at one format."""
    groups = []
    for fmt in args.formats:
        if fmt == "q4k" and "int4" in args.formats:
            continue  # measured in the int4 group, in lockstep with glm4rt int4
        group = [("glm4rt", fmt, fmt)]
        if fmt == "int4" and "q4k" in args.formats:
            group.append(("glm4rt", "q4k", "q4k"))
        if args.baseline:
            group.append(("glm4rt-base", fmt, fmt))
        if "llama" in args.peers and fmt in LLAMA_TYPES:
            group.append(("llama", fmt, LLAMA_TYPES[fmt]))
        if "transformers" in args.peers and fmt in args.tf_formats:
            group.append(("transformers", fmt, fmt))
        groups.append(group)
    if "transformers" in args.peers:  # transformers dtypes without a glm4rt run of that format
        groups += [[("transformers", f, f)] for f in args.tf_formats if f not in args.formats]
    return groups


def run_group(index: int, group, args, g, base: dict, ggufs: dict, n_ctx: int) -> list[dict]:
    """Load every engine of ``group`` in its own process, then run each measurement's repetitions
    in turn across the engines (A B C, then C B A, ...), with a bandwidth probe before each
    repetition: all engines of a group meet the same machine state, whatever it drifts to."""
    runs, servers = [], []
    for engine, fmt, label in group:
        say(f"\n== {ENGINE_LABEL[engine]} {label}: loading")
        run = {"engine": engine, "format": fmt, "label": label, "group": index}
        runs.append(run)
        spec = dict(base, engine=engine, format=fmt)
        if engine == "glm4rt-base":  # the same worker code, importing glm4rt from another tree
            spec.update(engine="glm4rt", glm4rt_root=args.baseline)
        need, avail = estimate_rss_bytes(engine, fmt, g), meminfo().get("MemAvailable", 0)
        if avail and need > avail:
            run.update(status="n/a", reason=f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available "
                                             "(with the other engines of its group loaded)")
            say(f"    skipped: {run['reason']}")
            continue
        if engine == "llama":
            if fmt not in ggufs:
                run.update(status="n/a", reason="no GGUF (gguf package missing)")
                continue
            spec.update(gguf=ggufs[fmt], n_ctx=n_ctx, flash_attn=args.llama_flash_attn == "on")
        if engine == "glm4rt" and fmt in ("int8", "int4", "q4k"):
            spec["saved_dir"] = os.path.join(synth.CACHE, f"saved-{g.tag()}-{fmt}.tmp")
        server = Server(spec, args.child_timeout)
        run.update(server.hello())
        if run.get("status") != "ok":
            say(f"    {run.get('status')}: {run.get('reason')}")
            server.close()
            continue
        run["threads"] = {}
        servers.append((run, server))

    def alive():
        return [(r, s) for r, s in servers if r.get("status") == "ok"]

    def fail(run, server, answer):
        run.update(status="error", reason=answer.get("reason"), traceback=answer.get("traceback"))
        say(f"    {ENGINE_LABEL[run['engine']]} {run['label']}: error: {answer.get('reason')}")
        server.close()

    def lockstep(t: int, setting: str, key: str, op: dict, store, slices: int = 1) -> None:
        """args.reps repetitions of ``op`` on every engine, alternating the order. With ``slices``
        > 1 (decode) a repetition is cut into that many calls, op's steps shared out and each later
        call resuming where the previous one stopped, and the engines take turns slice by slice: they
        meet the same bandwidth even when it changes within a repetition. An engine's time for the
        repetition is the sum of its slices, its tokens their concatenation."""
        probes = []
        slice_steps = split_steps(op["steps"], slices) if slices > 1 else None
        for rep in range(args.reps):
            probes.append(probe_bandwidth(t, args.bandwidth_mib))
            answers = {id(run): [] for run, _ in alive()}
            for sl in range(slices):
                order = alive() if (rep + sl) % 2 == 0 else alive()[::-1]
                for run, server in order:
                    time.sleep(0.2)  # let the previous engine's worker threads stop spinning
                    call = dict(op, steps=slice_steps[sl], resume=sl > 0) if slice_steps else op
                    answer = server.call(**call)
                    if answer.get("status") != "ok":
                        fail(run, server, answer)
                        continue
                    answers[id(run)].append(answer)
            for run, _ in alive():
                store(run["threads"][setting], merge_slices(answers[id(run)]))
        for run, _ in alive():
            run["threads"][setting].setdefault("probe_gb_s", {})[key] = probes
        line = ", ".join(f"{ENGINE_LABEL[r['engine']]} {r['label']} {summary(r['threads'][setting], key)}"
                         for r, _ in alive())
        say(f"    threads {setting}, {key}: {line}; probe {median(probes):.1f} GB/s")

    def summary(r: dict, key: str) -> str:
        kind, n = key.split()
        return f"{tok_per_s(key, r['prefill_s' if kind == 'prefill' else 'decode_s'][n], args.decode_steps):.2f} tok/s"

    depths = [0] + ([args.depth] if args.depth else [])

    def measure_setting(t: int, setting: str) -> None:
        """Prefill and decode at every length and depth with t threads, stored under ``setting``."""
        for run, _ in alive():
            run["threads"][setting] = {"prefill_s": {}, "decode_s": {}, "decode_tokens": {}}
        for n in args.prompt_lengths:
            lockstep(t, setting, f"prefill {n}", {"op": "prefill", "n": n},
                     lambda r, a, n=n: r["prefill_s"].setdefault(str(n), []).append(a["s"]))
        for d in depths:
            if d:
                for run, server in alive():
                    answer = server.call(op="prepare_depth", depth=d)
                    if answer.get("status") != "ok":
                        fail(run, server, answer)
                        continue
                    r = run["threads"][setting]
                    r["prefill_s"][str(d)] = [answer["s"]]
                    r.setdefault("depth_first_token", {})[str(d)] = answer["first"]
                    say(f"    {ENGINE_LABEL[run['engine']]} {run['label']}: prefill {d} (once, for the depth-{d} "
                        f"decode) {d / answer['s']:.1f} tok/s")

            def store(r, a, d=d):
                r["decode_s"].setdefault(str(d), []).append(a["s"])
                first = [r["depth_first_token"][str(d)]] if d else []
                seqs = r.setdefault("_seqs", {}).setdefault(str(d), [])
                seqs.append(first + a["tokens"])
            lockstep(t, setting, f"decode {d}", {"op": "decode", "depth": d, "steps": args.decode_steps}, store,
                     slices=args.decode_slices)
        for run, _ in alive():
            r = run["threads"][setting]
            r["prefill_tok_s"] = {n: int(n) / median(v) for n, v in r["prefill_s"].items()}
            r["decode_tok_s"] = {d: args.decode_steps / median(v) for d, v in r["decode_s"].items()}
            seqs = r.pop("_seqs", {})
            # generated greedy tokens of the first repetition (at depth > 0 the prefill's argmax
            # first), and whether every repetition produced the same ones (checks the cache rewind)
            r["decode_tokens"] = {d: v[0] for d, v in seqs.items()}
            r["decode_reps_identical"] = {d: all(x == v[0] for x in v) for d, v in seqs.items()}

    for t in args.threads:
        for run, server in alive():
            answer = server.call(op="threads", n=t)
            if answer.get("status") != "ok":
                fail(run, server, answer)
                continue
            if answer["first_call"]:
                run["first_call_s"] = answer["warmup_s"]
        for load in args.load:
            with BusyCore(load == "busy", args.child_timeout):
                measure_setting(t, setting_label(t, load))

    for run, server in alive():
        answer = server.call(op="finish")
        if answer.get("status") == "ok":
            run["peak_rss_bytes"] = answer["peak_rss_bytes"]
            if answer.get("saved_checkpoint"):
                run["saved_checkpoint"] = answer["saved_checkpoint"]
        else:
            fail(run, server, answer)
        server.close()
    return runs


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; 40 = full 9B; --quick: 1)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts and 'auto' (glm4rt's default, load-following "
                   "decode threads; the peers get one thread per CPU) (default 1,2)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per measurement, taken in turn across the engines of a format (default 4; --quick: 2)")
    p.add_argument("--formats", default="bf16,int8,int4",
                   help="glm4rt formats and the matching llama.cpp GGUF types: bf16 (BF16), int8 (Q8_0), "
                        "int4 (Q4_0), fp32 and q4k (glm4rt only; q4k runs in lockstep with int4 when both "
                        "are given) (default bf16,int8,int4)")
    p.add_argument("--peers", default="llama,transformers", help="peers to run: llama, transformers, or none")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run glm4rt from this source tree (another commit, built in place: e.g. "
                        "`git worktree add DIR REV` and its extension built into DIR/glm4rt), in lockstep "
                        "with the current one: before/after ratios in the same run")
    p.add_argument("--tf-formats", default="bf16,fp32", help="transformers dtypes (default bf16,fp32)")
    p.add_argument("--depth", type=int, default=None, help="context depth for the long decode (default 4096; "
                   "0 skips it; --quick: 0)")
    p.add_argument("--prompt-lengths", default="128,512", help="prefill prompt lengths (default 128,512)")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--decode-slices", type=int, default=8,
                   help="each decode repetition runs in this many slices, the engines taking turns slice by "
                        "slice (default 8: 8 tokens each; 1 = each engine decodes all its steps in one go)")
    p.add_argument("--llama-flash-attn", choices=("on", "off"), default="on",
                   help="llama.cpp flash attention (default on: llama.cpp's own 'auto' picks it on CPU; "
                        "llama-cpp-python would otherwise disable it)")
    p.add_argument("--load", default="idle",
                   help="machine load per thread count: idle, busy (another process keeps one core busy) or "
                        "idle,busy (both, one after the other; default idle)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the synthetic checkpoint")
    p.add_argument("--quick", action="store_true", help="1 layer, 2 reps, no depth-4096 run: a functional check")
    p.add_argument("--out", default=None, help="output name prefix in benchmarks/ (default results, "
                   "--quick: results-quick)")
    p.add_argument("--child-timeout", type=float, default=3600,
                   help="seconds an engine process may take to load or to answer one command")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the bandwidth probe")
    a = p.parse_args(argv)
    a.layers = a.layers if a.layers is not None else (1 if a.quick else 8)
    a.reps = a.reps if a.reps is not None else (2 if a.quick else 4)
    a.depth = a.depth if a.depth is not None else (0 if a.quick else 4096)
    a.out = a.out or ("results-quick" if a.quick else "results")
    if not 1 <= a.decode_slices <= a.decode_steps:
        p.error(f"--decode-slices must be between 1 and --decode-steps ({a.decode_steps})")
    try:
        a.threads = [t if t == "auto" else int(t) for t in a.threads.split(",") if t]
    except ValueError:
        p.error(f"--threads takes thread counts and 'auto', got {a.threads!r}")
    a.load = [x for x in a.load.split(",") if x]
    if not a.load or any(x not in ("idle", "busy") for x in a.load):
        p.error(f"--load takes idle, busy or idle,busy, got {','.join(a.load)!r}")
    a.formats = [f for f in a.formats.split(",") if f]
    a.tf_formats = [f for f in a.tf_formats.split(",") if f]
    a.prompt_lengths = [int(n) for n in a.prompt_lengths.split(",") if n]
    a.peers = [x for x in a.peers.split(",") if x and x != "none"]
    if a.baseline:
        a.baseline = os.path.abspath(a.baseline)
        if not glob.glob(os.path.join(a.baseline, "glm4rt", "_C*")):
            p.error(f"--baseline {a.baseline}: no glm4rt/_C* extension built in place there")
    for f in a.formats:
        if f not in ("bf16", "int8", "int4", "q4k", "fp32"):
            p.error(f"unknown format {f!r}")
    for x in a.peers:
        if x not in ("llama", "transformers"):
            p.error(f"unknown peer {x!r}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    g = synth.Geometry(num_hidden_layers=args.layers)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:]))
    say(f"glm4rt benchmark: {g.tag()}, threads {args.threads}, reps {args.reps}, formats {args.formats}, "
        f"peers {args.peers or 'none'}, depth {args.depth or 'skipped'}")
    machine = machine_info()
    say(f"machine: {machine.get('cpu_model')}, {machine.get('usable_cpus')} CPUs, {machine.get('ram_total_gib')} GiB, "
        f"glm4rt ISA {machine.get('glm4rt_isa')}")

    # Built in a child process, so this (parent) process stays small.
    built = run_child({"task": "build", "geometry": g.__dict__, "seed": args.seed,
                       "gguf_formats": [f for f in args.formats if f in LLAMA_TYPES] if "llama" in args.peers else []},
                      args.child_timeout)
    if built.get("status") != "ok":
        say(f"could not build the checkpoint: {built.get('reason')}\n{built.get('traceback', '')}")
        return 1
    ckpt, ggufs = built["checkpoint"], built["gguf"]
    if built.get("gguf_missing"):
        say(f"{built['gguf_missing']}: llama.cpp runs will be n/a")

    depths = [0] + ([args.depth] if args.depth else [])
    cap = max(max(args.prompt_lengths), max(depths) + args.decode_steps) + 64
    n_ctx = -(-cap // 256) * 256
    base = {"checkpoint": ckpt, "threads": args.threads[:1], "capacity": cap,
            "n_ids": max(max(args.prompt_lengths), max(depths), 32)}
    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command, "machine": machine,
        "settings": {"geometry": g.__dict__, "checkpoint": ckpt, "threads": args.threads, "load": args.load,
                     "reps": args.reps,
                     "probe_mib": args.bandwidth_mib,
                     "formats": args.formats, "peers": args.peers, "tf_formats": args.tf_formats,
                     "prompt_lengths": args.prompt_lengths, "depth": args.depth,
                     "decode_steps": args.decode_steps, "decode_slices": args.decode_slices,
                     "quick": args.quick, "seed": args.seed,
                     "llama_n_ctx": n_ctx, "llama_flash_attn": args.llama_flash_attn == "on",
                     "gguf": ggufs, "baseline": args.baseline},
        "runs": [],
    }

    for index, group in enumerate(plan_groups(args)):
        results["runs"] += run_group(index, group, args, g, base, ggufs, n_ctx)

    print_summary(results)
    md = render_markdown(results)
    with open(os.path.join(HERE, args.out + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    say(f"\nwrote {os.path.join('benchmarks', args.out + '.md')} and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
