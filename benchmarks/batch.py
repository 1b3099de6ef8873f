"""Batch classification throughput: ``glm4rt.batch`` in this process against Ray Data actors.

One job, the same in every mode: N short texts (``--texts``, default 512; 20-80 tokens each, cut
from the demo model's calibration text with a fixed seed) in a Parquet file, classified into 4
labels by a sequence-classification head on the random-weight GLM-4-9B geometry (``--layers``,
default 8; int4, built and cached by synth.py like serve.py's checkpoints). The checkpoint is a
causal one: ``Glm4ForSequenceClassification.from_pretrained`` creates the missing ``score.weight``
from ``seed`` 0, the same in every process. Each mode runs ``glm4rt.batch.run_job`` on it
(``--block-rows``, default 64 rows a block):

- ``in-process``: ``run_blocks=None``, a ``BatchPredictor`` in this process with 2 kernel threads;
- ``ray 1x2``: ``block_runner(actors=1, cpus_per_actor=2)`` (one actor, 2 kernel threads);
- ``ray 2x1``: ``block_runner(actors=2, cpus_per_actor=1)`` (two actors of 1 thread each),

on one local Ray instance (``ray.init(num_cpus=2, include_dashboard=False)``, loopback only), which
is up for every mode (the in-process one too, so all see the same idle Ray processes). The page cache
holds the checkpoint before the first mode (it is read once first).

Measured per mode: wall seconds of ``run_job`` end to end (model load / actor start included) and
texts/s over it; the start-up: the wall seconds of the same job on one one-row block per model, run
just before (model load, Ray Data's actor pool, one tiny forward); the steady texts/s: the texts over
the end-to-end time less the start-up; the time to the first block handed back; and the texts/s
after the first round: the rows of the blocks handed back after the first ``k`` (k = the number of
actors, 1 in process) over the time from the k-th block to the last, as the driver sees them (Ray
Data hands the blocks back in bursts, so with few blocks this overstates the Ray modes: the steady
figure above does not depend on when blocks come back). Memory: peak ``Pss`` / ``Rss``
(and the other ``smaps_rollup`` fields) of each process that holds a model, sampled every 0.5 s:
this process in ``in-process`` (with its values before and after the job), the Ray Data actor
processes (``/proc/PID/cmdline`` holds ``MapWorker``; descendants of this process, so not another
Ray instance's) in the Ray modes. The weights are
memory-mapped read-only, so two actors share their pages: each actor's PSS counts half of the
shared pages it maps. The outputs of all modes (and repeats) must be equal (``pyarrow.Table.equals``):
results are batch-invariant by design.

    python benchmarks/batch.py                  # 8 layers, 512 texts, 1 repeat (~10 min on 2 cores)
    python benchmarks/batch.py --repeats 3      # medians of 3
    python benchmarks/batch.py --quick          # 1 layer, 64 texts, 16-row blocks: a functional check

Writes ``benchmarks/OUT.json`` and ``OUT.md`` (``--out``, default ``batch``, ``batch-quick`` with
``--quick``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, "cache")
sys.path.insert(0, HERE)
import synth  # noqa: E402

CORPUS = os.path.join(ROOT, "glm4rt", "demo_model", "calibration.txt")
GIB = 2**30
# (name, actors, cpus per actor); actors 0: in this process
MODES = [("in-process", 0, 2), ("ray 1x2", 1, 2), ("ray 2x1", 2, 1)]
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Shared_Dirty", "Private_Clean",
                "Private_Dirty", "Anonymous")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the checkpoint and the texts -------------------------------------------------------------

def ensure_int4(layers: int) -> str:
    """The cached int4 checkpoint of the 9B geometry with ``layers`` layers (as serve.py builds it)."""
    g = synth.Geometry(num_hidden_layers=layers)
    qdir = synth.checkpoint_dir(g) + "-int4"
    if not os.path.isfile(os.path.join(qdir, "config.json")):
        ckpt = synth.ensure_checkpoint(g, log=say)
        synth.ensure_tokenizer(ckpt, g.vocab_size)
        say(f"writing the int4 checkpoint {qdir}")
        subprocess.run([sys.executable, "-m", "glm4rt", "quantize", ckpt, qdir, "--format", "int4"], check=True)
    synth.ensure_tokenizer(qdir, g.vocab_size)
    return qdir


def safetensors_sizes(ckpt: str) -> dict[str, int]:
    """Bytes of each tensor in the checkpoint's safetensors files."""
    sizes = {}
    for name in os.listdir(ckpt):
        if name.endswith(".safetensors"):
            with open(os.path.join(ckpt, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            sizes.update({k: t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items()
                          if k != "__metadata__"})
    return sizes


def warm_page_cache(ckpt: str) -> float:
    """Read every file of the checkpoint once; returns the bytes read."""
    total = 0
    for name in sorted(os.listdir(ckpt)):
        with open(os.path.join(ckpt, name), "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def make_texts(tokenizer, n: int, seed: int, corpus: str, lo: int = 20, hi: int = 80) -> list[str]:
    """``n`` runs of consecutive words of ``corpus`` from random places, each ``lo``..``hi`` tokens
    (this tokenizer, no special tokens; the length drawn uniformly)."""
    import numpy as np

    with open(corpus, encoding="utf-8") as f:
        words = f.read().split()
    rng = np.random.default_rng(seed)
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    texts = []
    while len(texts) < n:
        target = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - 1))
        end = start + 1
        while end < len(words) and count(" ".join(words[start:end])) < target:
            end += 1
        text = " ".join(words[start:end])
        if count(text) > hi:  # the last word overshot
            text = " ".join(words[start:end - 1])
        if lo <= count(text) <= hi:
            texts.append(text)
    return texts


# ---- memory ------------------------------------------------------------------------------------

def smaps_rollup(pid) -> dict | None:
    """``/proc/PID/smaps_rollup`` in bytes (None: the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (OSError, ValueError):
        return None
    return out or None


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = parent_pid(pid)
            if pid == ancestor:
                return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def map_worker_pids() -> list[int]:
    """Ray Data actor processes (their title is ``ray::MapWorker(...)``) of this process's Ray
    instance: descendants of this process (ray.init starts the raylet, which starts the workers),
    not those of another Ray instance on the machine."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"MapWorker" in f.read() and descends_from(int(pid), os.getpid()):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


class MemorySampler(threading.Thread):
    """Every ``interval`` s: smaps_rollup of each process ``pids()`` names; keeps each field's maximum
    per pid (``peak``) and the whole rollup at the maximum Pss (``at_peak_pss``)."""

    def __init__(self, pids, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: dict[int, dict] = {}
        self.at_peak_pss: dict[int, dict] = {}
        self.first_seen: dict[int, float] = {}
        self.samples = 0
        self.peak_total: dict = {"Pss": 0, "per_pid": {}}  # the sampling tick with the largest summed Pss
        self._stop_event = threading.Event()

    def sample(self) -> None:
        tick = {}
        for pid in self.pids():
            r = smaps_rollup(pid)
            if r is None:
                continue
            tick[pid] = {k: r.get(k, 0) for k in SMAPS_FIELDS}
            self.first_seen.setdefault(pid, time.perf_counter())
            peak = self.peak.setdefault(pid, {})
            for k in SMAPS_FIELDS:
                peak[k] = max(peak.get(k, 0), r.get(k, 0))
            if r.get("Pss", 0) >= self.at_peak_pss.get(pid, {}).get("Pss", -1):
                self.at_peak_pss[pid] = {k: r.get(k, 0) for k in SMAPS_FIELDS}
        total = sum(r["Pss"] for r in tick.values())
        if total > self.peak_total["Pss"]:
            self.peak_total = {"Pss": total, "Pss_File": sum(r["Pss_File"] for r in tick.values()),
                               "Rss": sum(r["Rss"] for r in tick.values()), "processes": len(tick),
                               "per_pid": {str(pid): r for pid, r in tick.items()}}
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def processes(self) -> list[dict]:
        """Per process in the order first seen: the peaks and the rollup at the peak Pss."""
        return [{"pid": pid, "peak": self.peak[pid], "at_peak_pss": self.at_peak_pss[pid]}
                for pid in sorted(self.peak, key=self.first_seen.get)]


# ---- one run -----------------------------------------------------------------------------------

BLOCK_DONE = re.compile(r"block (\d+)/(\d+) done")


def run_mode(name: str, actors: int, cpus: int, src: str, probe_src: str, tmp: str, options: dict,
             n_rows: int, block_rows: int, excluded: set[int]) -> tuple[dict, str, str]:
    """The start-up job (``probe_src``: one one-row block per model), then the measured job."""
    from glm4rt.batch import run_job

    def runner():
        if not actors:
            return None
        from glm4rt.integrations.ray import block_runner

        return block_runner(actors=actors, cpus_per_actor=cpus)

    if not actors:
        options = dict(options, threads=cpus)
    stem = os.path.join(tmp, f"{name.replace(' ', '-')}-{time.monotonic_ns()}")
    t0 = time.perf_counter()
    run_job(probe_src, stem + "-probe.parquet", "classify", options, block_rows=1, run_blocks=runner())
    probe_wall = time.perf_counter() - t0
    if actors:
        excluded |= wait_for_no_workers()  # the start-up job's actors (they exit when it is done)
        sampler = MemorySampler(lambda: [p for p in map_worker_pids() if p not in excluded])
    else:
        sampler = MemorySampler(lambda: [os.getpid()])
    dst = stem + ".parquet"
    run_blocks = runner()
    before = smaps_rollup("self")
    events = []
    sampler.start()
    t0 = time.perf_counter()
    summary = run_job(src, dst, "classify", options, block_rows=block_rows, run_blocks=run_blocks,
                      log=lambda s: events.append((time.perf_counter() - t0, s)))
    wall = time.perf_counter() - t0
    sampler.sample()  # in process: the predictor may be gone by now; the Ray actors too
    sampler.stop()
    after = smaps_rollup("self")
    # When each block was handed back, in order of completion.
    done = [(t, int(m.group(1)) - 1) for t, s in events if (m := BLOCK_DONE.match(s))]
    rows = [min(block_rows, n_rows - i * block_rows) for _, i in done]
    k = max(actors, 1)  # the first round of blocks: one per model, each after its load
    steady = None
    if len(done) > k and done[-1][0] > done[k - 1][0]:
        steady = sum(rows[k:]) / (done[-1][0] - done[k - 1][0])
    first = done[0][0] if done else None
    net = summary.rows / (wall - probe_wall) if wall > probe_wall else None
    result = {"mode": name, "actors": actors, "cpus_per_actor": cpus, "wall_s": wall, "rows": summary.rows,
              "blocks": summary.blocks, "texts_per_s": summary.rows / wall, "startup_s": probe_wall,
              "net_texts_per_s": net, "steady_texts_per_s": steady, "first_block_s": first,
              "block_times_s": [t for t, _ in done],
              "block_order": [i for _, i in done], "processes": sampler.processes(),
              "peak_total": sampler.peak_total,
              "memory_samples": sampler.samples}
    if not actors:
        result["self_before"], result["self_after"] = before, after
    return result, dst, stem + "-probe.parquet"


# ---- driver ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--texts", type=int, default=512, help="number of texts (default 512)")
    p.add_argument("--block-rows", type=int, default=None, help="rows per run_job block (default 64; 16 with --quick)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode (medians when > 1)")
    p.add_argument("--labels", type=int, default=4, help="num_labels of the classification head")
    p.add_argument("--seed", type=int, default=0, help="seed of the texts")
    p.add_argument("--fast", action="store_true",
                   help="run outside batch-invariant mode (`glm4rt batch --fast`): on AMX CPUs the prompt "
                        "paths the mode gives up; outputs of different modes may then differ in the last bits")
    p.add_argument("--modes", default=",".join(m[0] for m in MODES),
                   help="a comma-separated subset of: " + ", ".join(m[0] for m in MODES))
    p.add_argument("--corpus", default=CORPUS, help="text the texts are cut from")
    p.add_argument("--quick", action="store_true", help="1 layer, 64 texts, 16-row blocks")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.texts = 1, 64
    if args.block_rows is None:
        args.block_rows = 16 if args.quick else 64
    args.out = args.out or ("batch-quick" if args.quick else "batch")
    names = [m[0] for m in MODES]
    args.modes = [m.strip() for m in args.modes.split(",")]
    if not args.modes or any(m not in names for m in args.modes):
        p.error(f"--modes: choose from {', '.join(names)}")
    return args


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "glm4rt"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" (glm4rt/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wait_for_no_workers(timeout: float = 60.0) -> set[int]:
    """Wait until the previous mode's actor processes have exited; returns those still there."""
    deadline = time.time() + timeout
    while map_worker_pids() and time.time() < deadline:
        time.sleep(0.5)
    return set(map_worker_pids())


def describe_difference(a, b) -> str:
    if a.schema != b.schema:
        return f"schemas differ: {a.schema} vs {b.schema}"
    if a.num_rows != b.num_rows:
        return f"{a.num_rows} vs {b.num_rows} rows"
    cols = [c for c in a.column_names if not a.column(c).equals(b.column(c))]
    return f"columns {cols} differ"


def main(argv=None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    import glm4rt
    from glm4rt.tokenizer import Glm4Tokenizer

    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/batch.py"] + (argv or sys.argv[1:]))
    model_dir = ensure_int4(args.layers)
    # The head's config: the checkpoint's with num_labels labels (and score.weight from seed 0).
    # run_job writes its options into OUTPUT.parts/job.json, so they must be JSON: the config goes in
    # as the override num_labels, which from_pretrained applies to config.json exactly as
    # Glm4Config.from_pretrained(model_dir, num_labels=...) does (a Glm4Config object in
    # model_kwargs makes run_job fail with "Object of type Glm4Config is not JSON serializable").
    cfg = glm4rt.Glm4Config.from_pretrained(model_dir, num_labels=args.labels)
    options = {"model": model_dir, "model_kwargs": {"num_labels": args.labels, "seed": 0}}
    if args.fast:  # outside batch-invariant mode: the faster prompt paths (AMX tiles), bits per batch
        options["batch_invariant"] = False
    sizes = safetensors_sizes(model_dir)
    file_bytes = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                     if n.endswith(".safetensors"))
    # What a classification forward reads: every tensor but the embedding table (a few rows of it)
    # and the lm_head (not loaded by the classification head).
    read_bytes = sum(v for k, v in sizes.items() if not k.startswith(("lm_head.", "model.embed_tokens.")))

    tokenizer = Glm4Tokenizer.from_pretrained(model_dir)
    texts = make_texts(tokenizer, args.texts, args.seed, args.corpus)
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    say(f"{len(texts)} texts, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}); "
        f"model {model_dir} ({file_bytes / GIB:.2f} GiB)")
    say(f"warming the page cache: {warm_page_cache(model_dir) / GIB:.2f} GiB read")

    results = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": os.popen("lscpu | grep 'Model name'").read().strip(), "commit": git_commit(),
               "glm4rt": glm4rt.__version__ if hasattr(glm4rt, "__version__") else None,
               "ray": ray.__version__, "pyarrow": pa.__version__, "settings": vars(args),
               "model": {"dir": model_dir, "safetensors_bytes": file_bytes, "read_bytes": read_bytes,
                         "embedding_bytes": sizes.get("model.embed_tokens.weight", 0),
                         "num_labels": cfg.num_labels, "id2label": {str(k): v for k, v in cfg.id2label.items()}},
               "texts": {"n": len(texts), "tokens_min": min(lengths), "tokens_max": max(lengths),
                         "tokens_mean": statistics.mean(lengths), "tokens_total": sum(lengths)},
               "runs": [], "identical": None, "notes": []}
    modes = [m for m in MODES if m[0] in args.modes]
    reference, reference_name, mismatches = None, None, []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        with tempfile.TemporaryDirectory(prefix="glm4rt-batch-bench-") as tmp:
            src = os.path.join(tmp, "texts.parquet")
            pq.write_table(pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts}), src)
            probes = {}
            for k in {max(m[1], 1) for m in modes}:  # the start-up jobs: one row per model
                probes[k] = os.path.join(tmp, f"probe-{k}.parquet")
                pq.write_table(pa.table({"id": pa.array(range(k), pa.int64()), "text": texts[:k]}), probes[k])
            excluded: set[int] = set()
            probe_tables = []
            for rep in range(args.repeats):
                for name, actors, cpus in (modes if rep % 2 == 0 else modes[::-1]):
                    if actors:
                        excluded |= wait_for_no_workers()
                    say(f"rep {rep} {name}: running")
                    r, path, probe_path = run_mode(name, actors, cpus, src, probes[max(actors, 1)], tmp, options, len(texts),
                                       args.block_rows, excluded)
                    r["rep"] = rep
                    excluded |= {p["pid"] for p in r["processes"]} if actors else set()
                    table = pq.read_table(path)
                    probe_tables.append((rep, name, pq.read_table(probe_path)))
                    if reference is None:
                        reference, reference_name = table, name
                        labels = table.column("label").to_pylist()
                        results["label_counts"] = {lab: labels.count(lab) for lab in sorted(set(labels))}
                    elif not table.equals(reference):
                        mismatches.append(f"rep {rep} {name} vs {reference_name}: "
                                          f"{describe_difference(table, reference)}")
                    r["output_equal"] = table.equals(reference)
                    if actors and len(r["processes"]) != actors:
                        results["notes"].append(f"rep {rep} {name}: the memory sampler saw {len(r['processes'])} "
                                                f"actor process(es), not {actors}")
                    results["runs"].append(r)
                    pss = ", ".join(f"{p['peak']['Pss'] / GIB:.2f}" for p in r["processes"])
                    say(f"rep {rep} {name}: start-up job {r['startup_s']:.1f} s; {r['wall_s']:.1f} s, "
                        f"{r['texts_per_s']:.2f} texts/s, net of start-up {fmt(r['net_texts_per_s'])}, after the "
                        f"first round {fmt(r['steady_texts_per_s'])} texts/s, first block {fmt(r['first_block_s'], 1)} s, "
                        f"peak PSS {pss} GiB, output {'equal' if r['output_equal'] else 'DIFFERENT'}")
        for rep, name, table in probe_tables:  # one-row blocks: the same bits as in the big blocks
            if not table.equals(reference.slice(0, table.num_rows)):
                mismatches.append(f"rep {rep} {name}: the start-up job's {table.num_rows} row(s) vs the same rows "
                                  f"of {reference_name}: {describe_difference(table, reference.slice(0, table.num_rows))}")
    finally:
        ray.shutdown()
    results["identical"] = not mismatches
    results["mismatches"] = mismatches
    if mismatches:
        results["notes"].append("outputs differ between modes: " + "; ".join(mismatches))
    with open(os.path.join(HERE, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    report = render(results)
    with open(os.path.join(HERE, args.out + ".md"), "w") as f:
        f.write(report)
    print(report)
    if mismatches:
        print("ERROR: the outputs of the modes differ: " + "; ".join(mismatches), file=sys.stderr)
        return 1
    return 0


# ---- report ------------------------------------------------------------------------------------

def fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results: dict) -> list[dict]:
    """Per mode: medians over the repeats (per-process values by position, in the order first seen)."""
    out = []
    for name, *_ in MODES:
        runs = [r for r in results["runs"] if r["mode"] == name]
        if not runs:
            continue
        n_proc = max(len(r["processes"]) for r in runs)
        procs = []
        for j in range(n_proc):
            peaks = [r["processes"][j]["peak"] for r in runs if len(r["processes"]) > j]
            at = [r["processes"][j]["at_peak_pss"] for r in runs if len(r["processes"]) > j]
            procs.append({"peak": {k: median(p.get(k) for p in peaks) for k in SMAPS_FIELDS},
                          "at_peak_pss": {k: median(p.get(k) for p in at) for k in SMAPS_FIELDS}})
        s = {"mode": name, "actors": runs[0]["actors"], "cpus": runs[0]["cpus_per_actor"], "reps": len(runs),
             "processes": procs, "equal": all(r["output_equal"] for r in runs),
             "peak_total": {k: median(r["peak_total"].get(k) for r in runs)
                            for k in ("Pss", "Pss_File", "Rss", "processes")}}
        for key in ("wall_s", "texts_per_s", "startup_s", "net_texts_per_s", "steady_texts_per_s", "first_block_s"):
            s[key] = median(r[key] for r in runs)
        if name == "in-process":
            s["self_before"] = {k: median(r["self_before"].get(k) for r in runs) for k in SMAPS_FIELDS}
            s["self_after"] = {k: median(r["self_after"].get(k) for r in runs) for k in SMAPS_FIELDS}
        out.append(s)
    return out


def render(results: dict) -> str:
    g = lambda b: "n/a" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    m, t, st = results["model"], results["texts"], results["settings"]
    lines = [f"# Batch classification: in process vs Ray Data actors ({results['date']})", "",
             f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", "",
             f"glm4rt commit: {results['commit']}; ray {results['ray']}, pyarrow {results['pyarrow']}", "",
             f"Model: {os.path.basename(m['dir'])} (GLM-4-9B geometry, {st['layers']} layers, int4, random weights) "
             f"with a {m['num_labels']}-label `Glm4ForSequenceClassification` head (`score.weight` from seed 0); "
             f"safetensors {g(m['safetensors_bytes'])} GiB, of which the classifier reads {g(m['read_bytes'])} GiB "
             f"(all but the embedding table, {g(m['embedding_bytes'])} GiB of which only the texts' rows are "
             "touched, and the lm_head, which it does not load).", "",
             f"Texts: {t['n']} ({t['tokens_min']}-{t['tokens_max']} tokens, mean {t['tokens_mean']:.1f}, "
             f"{t['tokens_total']} in all, cut from `{os.path.relpath(st['corpus'], ROOT)}`, seed {st['seed']}); "
             f"`run_job` blocks of {st['block_rows']} rows; {st['repeats']} repeat(s)"
             + (" (medians)" if st["repeats"] > 1 else "") + ".", ""]
    lines += [f"Outputs of all modes and repeats identical (`pyarrow.Table.equals`; the start-up jobs' rows, "
              f"each alone in a block, too): "
              f"**{'yes' if results['identical'] else 'NO'}**.", ""]
    lines += [f"Note: {n}." for n in results.get("notes", [])] + ([""] if results.get("notes") else [])
    summary = summarize(results)
    lines += ["End to end: `run_job`'s wall time (model load / actor start included) and texts/s over it. "
              "Start-up: the wall time of the same job on one one-row block per model (run just before). "
              "Steady: the texts over the end-to-end time less the start-up. After round 1: the rows of the "
              "blocks handed back after the first round (one block per model, each after its load) over the "
              "time from that round's last block to the last block, as the driver sees them (Ray Data hands "
              "blocks back in bursts, so with few blocks this overstates the Ray modes). PSS / RSS: each model "
              "process's peak (sampled every 0.5 s).", "",
              "| mode | actors x CPUs | texts/s end-to-end | texts/s steady | texts/s after round 1 | wall s | "
              "start-up s | first block s | PSS per actor GiB | RSS per actor GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        shape = "in process x 2 threads" if not s["actors"] else f"{s['actors']} x {s['cpus']}"
        pss = " / ".join(g(p["peak"]["Pss"]) for p in s["processes"]) or "n/a"
        rss = " / ".join(g(p["peak"]["Rss"]) for p in s["processes"]) or "n/a"
        lines.append(f"| {s['mode']} | {shape} | {fmt(s['texts_per_s'])} | {fmt(s['net_texts_per_s'])} | "
                     f"{fmt(s['steady_texts_per_s'])} | {fmt(s['wall_s'], 1)} | {fmt(s['startup_s'], 1)} | "
                     f"{fmt(s['first_block_s'], 1)} | "
                     f"{pss} | {rss} |")
    lines += ["", "Memory per model process (GiB), the smaps_rollup at its peak PSS:", "",
              "| mode | process | Pss | Rss | Pss_File | Pss_Anon | Shared_Clean | Private_Clean | Private_Dirty |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        rows = [(f"actor {j + 1}" if s["actors"] else "this process", p["at_peak_pss"])
                for j, p in enumerate(s["processes"])]
        if not s["actors"]:
            rows = [("this process, before", s["self_before"])] + rows + [("this process, after", s["self_after"])]
        for label, r in rows:
            lines.append(f"| {s['mode']} | {label} | " + " | ".join(
                g(r.get(k)) for k in ("Pss", "Rss", "Pss_File", "Pss_Anon", "Shared_Clean", "Private_Clean",
                                      "Private_Dirty")) + " |")
    lines += ["", "The model processes' PSS summed at one sampling moment (the largest such sum) against the "
              "checkpoint: the weights are memory-mapped read-only, so actors on one node share their pages and "
              "each one's PSS counts its share of them (the file-backed part), and the sum of the per-process "
              "peaks (which need not coincide):", ""]
    for s in summary:
        if not s["processes"]:
            continue
        pt = s["peak_total"]
        total = pt["Pss"]
        peaks = sum(p["peak"]["Pss"] for p in s["processes"])
        lines.append(f"- {s['mode']}: {g(total)} GiB PSS in {pt['processes']:.0f} process(es) "
                     f"({g(pt['Pss_File'])} GiB of it file-backed; RSS {g(pt['Rss'])} GiB), "
                     f"{total / m['safetensors_bytes']:.0%} of the {g(m['safetensors_bytes'])} GiB checkpoint file, "
                     f"{pt['Pss_File'] / m['read_bytes']:.0%} (file-backed) of the {g(m['read_bytes'])} GiB the "
                     f"classifier reads; sum of the per-process peaks {g(peaks)} GiB")
    if results.get("label_counts"):
        lines += ["", "Predicted labels: " + ", ".join(f"{k} {v}" for k, v in results["label_counts"].items())]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
