"""Measurement children: one process per (engine, format), so peak RSS is that engine's alone.

    python benchmarks/workers.py SPEC.json RESULT.json   # a one-shot task ("logits" or "build")
    python benchmarks/workers.py --serve SPEC.json       # load an engine, then answer timing commands

SPEC is a JSON object with "task", "engine" ("glm4rt", "llama", "transformers"), "format", and the
run settings; RESULT receives a JSON object (see serve_task for the command protocol). Progress goes
to stderr. An engine/format the installed software does not provide is reported as
{"status": "n/a", "reason": ...}; any other failure as {"status": "error", ...}.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def log(msg: str) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    /proc/self/status VmHWM is the high-water mark of this program's own address space (reset at
    exec). ru_maxrss is the fallback: on Linux it also carries the pre-exec peak of the process
    that forked this one, so a large parent would leak into it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class NotAvailable(Exception):
    """The engine/format is not provided by the installed software."""


# ---- engines: load, threads, prefill, decode step, cache rewind ---------------------------------

def fixed_threads(n) -> int:
    """A thread count for engines without glm4rt's "auto" default: one thread per CPU."""
    return (os.cpu_count() or 1) if n == "auto" else int(n)


def use_glm4rt_from(root: str) -> None:
    """Import glm4rt from the source tree ``root`` (built in place: ``glm4rt/_C*.so`` there) instead
    of the installed package: bench.py --baseline runs an older commit next to the current one.
    An editable install's import hook would take ``glm4rt`` back to its own tree, so it goes."""
    sys.meta_path[:] = [f for f in sys.meta_path if "glm4rt" not in repr(f) and "Redirect" not in type(f).__name__]
    sys.path.insert(0, root)
    import glm4rt

    found = os.path.dirname(os.path.dirname(os.path.abspath(glm4rt.__file__)))
    if os.path.realpath(found) != os.path.realpath(root):
        raise NotAvailable(f"glm4rt imported from {found}, not from the baseline {root}")


class Glm4rtEngine:
    name = "glm4rt"

    def __init__(self, spec: dict) -> None:
        if spec.get("glm4rt_root"):
            use_glm4rt_from(spec["glm4rt_root"])
        import glm4rt

        self.glm4rt = glm4rt
        self.spec = spec
        self.fmt = spec["format"]
        self.cache = None
        if spec.get("isa"):  # a kernel set other than the best (quality.py: the VNNI path on AMX CPUs)
            glm4rt.set_isa(spec["isa"])

    def load(self) -> None:
        glm4rt = self.glm4rt
        directory = self.spec["checkpoint"]
        if self.fmt in ("bf16", "fp32"):
            self.model = glm4rt.Glm4ForCausalLM.from_pretrained(
                directory, dtype="bfloat16" if self.fmt == "bf16" else "float32", progress=False)
        else:
            kwargs = {"quantization": self.fmt}
            try:
                self.model = glm4rt.Glm4ForCausalLM.from_pretrained(directory, progress=False, **kwargs)
            except (TypeError, NotImplementedError) as e:
                raise NotAvailable(f"from_pretrained({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                                   f"raised {type(e).__name__}: {e}") from None
        self.config = self.model.config

    def allocate(self, capacity: int) -> None:
        self.cache = self.glm4rt.Glm4Cache.for_config(self.config, 1, capacity)

    def set_threads(self, n) -> None:
        self.glm4rt.set_num_threads(None if n == "auto" else n)  # "auto": the default
        if n == "auto":  # what the load-following thread count decided, on stderr (the bench log)
            import logging

            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("    [glm4rt auto threads] %(message)s"))
            logger = logging.getLogger("glm4rt.autothreads")
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)

    def reset(self, n_keep: int) -> None:
        self.cache.crop(n_keep)

    def prefill(self, ids: np.ndarray) -> int:
        out = self.model(ids[None, :], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    def step(self, tok: int) -> int:
        out = self.model(np.array([[tok]], dtype=np.int64), past_key_values=self.cache, use_cache=True)
        return int(out.logits[0, -1].argmax())

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model(ids[None, :], use_cache=False).logits[0]

    def weight_bytes(self) -> tuple[int, str]:
        """Bytes of weights read per decoded token: every array the model holds (projections in
        whatever format, norms, biases, lm_head), except the embedding table (one row per token)."""
        m = self.model
        try:
            params = m.named_parameters()
            tied = bool(getattr(self.config, "tie_word_embeddings", False))  # then lm_head reads it all
            n = sum(a.nbytes for k, a in params.items() if k != "model.embed_tokens.weight" or tied)
            if n > 0:
                return n, "named_parameters() without model.embed_tokens.weight"
        except Exception:  # noqa: BLE001 - fall back to walking the object
            pass
        exclude = set()
        if not getattr(self.config, "tie_word_embeddings", False):
            exclude.add(_array_key(m.model.embed_tokens))
        return _walk_nbytes(m, exclude), "arrays held by the model object"


def _array_key(a) -> tuple:
    if isinstance(a, np.ndarray):
        return (a.__array_interface__["data"][0], a.nbytes)
    return (id(a), 0)


def _walk_nbytes(root, exclude: set) -> int:
    """Sum of the distinct NumPy arrays (by data address and size) reachable from ``root`` through
    attributes, lists, tuples and dicts of glm4rt objects; objects without ``__dict__`` that report
    an integer ``nbytes`` (opaque packed weights) count with it."""
    seen_obj, seen_arr, total = set(), set(exclude), 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, np.ndarray):
            key = _array_key(obj)
            if key not in seen_arr:
                seen_arr.add(key)
                total += obj.nbytes
            continue
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, type)) or id(obj) in seen_obj:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            if type(obj).__module__.split(".")[0] == "glm4rt":  # stay inside the model's own objects
                stack.extend(vars(obj).values())
        else:
            n = getattr(obj, "nbytes", None)
            if isinstance(n, (int, np.integer)):
                total += int(n)
    return total


class LlamaEngine:
    name = "llama.cpp"

    def __init__(self, spec: dict) -> None:
        try:
            import llama_cpp
        except ImportError as e:
            raise NotAvailable(f"llama_cpp is not importable ({e})") from None
        self.llama_cpp = llama_cpp
        self.spec = spec
        self.fmt = spec["format"]
        self.llm = None

    def load(self, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        t = fixed_threads(self.spec.get("threads", [1])[0])
        path = self.spec["gguf"]
        if not os.path.isfile(path):
            raise NotAvailable(f"no GGUF file {path}")
        kwargs = dict(n_ctx=self.spec["n_ctx"], n_threads=t, n_threads_batch=t, n_batch=512, n_ubatch=512,
                      logits_all=logits_all, flash_attn=self.spec.get("flash_attn", True), verbose=False)
        if self.spec.get("no_extra_bufts"):  # llama.cpp's AMX buffer crashes on some Xeons (llama_tools.open_llama)
            import llama_tools

            self.llm = llama_tools.open_llama(path, **kwargs)
        else:
            self.llm = Llama(model_path=path, **kwargs)
        self.n_vocab = self.llm.n_vocab()

    def allocate(self, capacity: int) -> None:
        if capacity > self.llm.n_ctx():
            raise ValueError(f"n_ctx {self.llm.n_ctx()} < needed {capacity}")

    def set_threads(self, n) -> None:
        n = fixed_threads(n)
        self.llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)

    def reset(self, n_keep: int) -> None:
        self.llm.n_tokens = n_keep  # the next eval() removes the cache rows from n_keep on

    def _argmax(self) -> int:
        self.llama_cpp.llama_synchronize(self.llm.ctx)
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: np.ndarray) -> int:
        self.llm.eval(ids.tolist())
        return self._argmax()

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._argmax()

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def weight_bytes(self) -> tuple[int, str]:
        from synth import gguf_tensor_bytes

        sizes = gguf_tensor_bytes(self.spec["gguf"])
        return sum(v for k, v in sizes.items() if k != "token_embd.weight"), "GGUF tensor sizes"


class TransformersEngine:
    name = "transformers"

    def __init__(self, spec: dict) -> None:
        import inspect

        import torch
        from transformers import DynamicCache, Glm4ForCausalLM

        self.torch, self.DynamicCache, self.cls = torch, DynamicCache, Glm4ForCausalLM
        self.spec = spec
        self.fmt = spec["format"]
        params = inspect.signature(Glm4ForCausalLM.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None

    def load(self) -> None:
        torch = self.torch
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(self.fmt)
        if dtype is None:
            raise NotAvailable(f"transformers runs bf16 and fp32 here, not {self.fmt}")
        self.model = self.cls.from_pretrained(self.spec["checkpoint"], dtype=dtype)
        self.model.eval()

    def allocate(self, capacity: int) -> None:
        self.cache = self.DynamicCache(config=self.model.config)

    def set_threads(self, n) -> None:
        self.torch.set_num_threads(fixed_threads(n))

    def reset(self, n_keep: int) -> None:
        if n_keep == 0:
            self.cache = self.DynamicCache(config=self.model.config)
            return
        extra = self.cache.get_seq_length() - n_keep
        if extra > 0:
            try:
                self.cache.crop(-extra)  # transformers 5.x: a negative count removes that many positions
            except ValueError:
                self.cache.crop(n_keep)  # older: the length to keep
        if self.cache.get_seq_length() != n_keep:
            raise RuntimeError(f"DynamicCache.crop left {self.cache.get_seq_length()} positions, wanted {n_keep}")

    def _run(self, ids, keep: int = 1):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=True,
                             logits_to_keep=keep, **{self.cache_kw: self.cache})
        return out.logits

    def prefill(self, ids: np.ndarray) -> int:
        return int(self._run(ids[None, :])[0, -1].argmax())

    def step(self, tok: int) -> int:
        return int(self._run([[tok]])[0, -1].argmax())

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        self.reset(0)
        return self._run(ids[None, :], keep=0)[0].float().numpy()

    def weight_bytes(self) -> tuple[int, str]:
        n = sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                if not name.endswith("embed_tokens.weight"))
        return n, "named_parameters()"


ENGINES = {"glm4rt": Glm4rtEngine, "llama": LlamaEngine, "transformers": TransformersEngine}


# ---- tasks ---------------------------------------------------------------------------------------

def prompt_ids(n: int, seed: int = 1234, vocab: int = 151329) -> np.ndarray:
    """The token ids every engine is fed (ordinary tokens, no specials)."""
    return np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.int64)


def serve_task(spec: dict) -> None:
    """Load one engine, then answer commands, one JSON line each way, until "finish".

    The benchmark keeps every engine of a format loaded at once and runs their repetitions in turn
    (lockstep), so each comparison is made in the same stretch of time. Commands (stdin):
      {"op": "threads", "n": t}            set the thread count and warm up (32-token prefill, one step)
      {"op": "prefill", "n": n}            time one prefill of n prompt tokens over an empty cache
      {"op": "prepare_depth", "depth": d}  prefill d tokens once (timed) and keep them in the cache
      {"op": "decode", "depth": d, "steps": k}  rewind the cache to d positions, time k greedy steps
      {"op": "decode", ..., "resume": true}      time k more steps from where the last decode stopped
      {"op": "finish"}                     peak RSS, the saved-checkpoint check (glm4rt int8/int4/q4k), exit
    Replies go to the original stdout; stdout itself is pointed at stderr so that nothing a library
    prints can corrupt the channel.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        engine = ENGINES[spec["engine"]](spec)
        log(f"{engine.name} {spec['format']}: loading")
        t0 = time.perf_counter()
        engine.load()
        info = {"status": "ok", "load_s": time.perf_counter() - t0, "rss_after_load_bytes": current_rss_bytes()}
        info["weight_bytes"], info["weight_bytes_source"] = engine.weight_bytes()
        if spec["engine"] == "glm4rt":
            info["isa"] = engine.glm4rt.cpu_isa()
        engine.allocate(int(spec["capacity"]))
        log(f"loaded in {info['load_s']:.2f} s; weights read per token {info['weight_bytes'] / 1e9:.3f} GB")
    except NotAvailable as e:
        reply({"status": "n/a", "reason": str(e)})
        return
    except Exception as e:  # noqa: BLE001 - the parent reports it and goes on
        reply({"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    reply(info)

    ids = prompt_ids(int(spec["n_ids"]))
    first_of_depth = {0: int(ids[0])}  # the token decode starts from at each prepared depth
    last_token = None  # the last token a decode produced (a resumed decode feeds it back)
    warmed = False
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "threads":
                engine.set_threads(cmd["n"] if cmd["n"] == "auto" else int(cmd["n"]))
                engine.reset(0)
                t0 = time.perf_counter()
                engine.prefill(ids[:32])  # touch weights, buffers, thread pools
                out = {"status": "ok", "warmup_s": time.perf_counter() - t0, "first_call": not warmed}
                warmed = True
                engine.reset(0)
                engine.step(int(ids[0]))
            elif op == "prefill":
                engine.reset(0)
                t0 = time.perf_counter()
                engine.prefill(ids[: int(cmd["n"])])
                out = {"status": "ok", "s": time.perf_counter() - t0}
            elif op == "prepare_depth":
                d = int(cmd["depth"])
                engine.reset(0)
                t0 = time.perf_counter()
                first_of_depth[d] = engine.prefill(ids[:d])
                out = {"status": "ok", "s": time.perf_counter() - t0, "first": first_of_depth[d]}
            elif op == "decode":
                d = int(cmd["depth"])
                if cmd.get("resume"):  # go on from the last decode's cache and token
                    if last_token is None:
                        raise ValueError("decode with resume before any decode")
                    tok = last_token
                else:
                    engine.reset(d)
                    tok = first_of_depth[d]
                seq = []
                t0 = time.perf_counter()
                for _ in range(int(cmd["steps"])):
                    tok = engine.step(tok)
                    seq.append(tok)
                out = {"status": "ok", "s": time.perf_counter() - t0, "tokens": seq}
                last_token = tok
            elif op == "finish":
                out = {"status": "ok", "peak_rss_bytes": peak_rss_bytes()}
                if spec["engine"] == "glm4rt" and spec["format"] in ("int8", "int4", "q4k") and spec.get("saved_dir"):
                    out["saved_checkpoint"] = _saved_roundtrip(engine, spec, ids)
            else:
                out = {"status": "error", "reason": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001
            out = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        reply(out)
        if op == "finish":
            break


def _saved_roundtrip(engine: Glm4rtEngine, spec: dict, ids: np.ndarray) -> dict:
    """save_pretrained the quantized model once, then time from_pretrained on the saved directory
    and check that it computes the same logits. Runs after the peak-RSS reading."""
    out: dict = {}
    saved = spec["saved_dir"]
    shutil.rmtree(saved, ignore_errors=True)
    try:
        engine.reset(0)
        ref = engine.all_logits(ids[:16])
        t0 = time.perf_counter()
        engine.model.save_pretrained(saved)
        out["save_s"] = time.perf_counter() - t0
        out["bytes_on_disk"] = sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved))
        del engine.model
        gc.collect()
        t0 = time.perf_counter()
        try:
            _load_saved(engine, saved)
        except NotAvailable as e:
            return {"status": "n/a", "reason": str(e), **out}
        out["load_s"] = time.perf_counter() - t0
        got = engine.all_logits(ids[:16])
        out["max_abs_logit_diff_vs_original"] = float(np.abs(got - ref).max())
        out["status"] = "ok"
        log(f"saved {spec['format']} checkpoint: {out['bytes_on_disk'] / 1e9:.2f} GB, reloads in {out['load_s']:.2f} s")
    except (AttributeError, TypeError, NotImplementedError) as e:
        out.update(status="n/a", reason=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - report, do not lose the speed results
        out.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    return out


def _load_saved(engine: Glm4rtEngine, saved: str) -> None:
    """A saved quantized checkpoint should load by itself; fall back to naming the format."""
    glm4rt = engine.glm4rt
    try:
        engine.model = glm4rt.Glm4ForCausalLM.from_pretrained(saved, progress=False)
    except Exception as first:  # noqa: BLE001
        try:
            engine.model = glm4rt.Glm4ForCausalLM.from_pretrained(saved, quantization=engine.fmt, progress=False)
        except (TypeError, NotImplementedError) as e:
            raise NotAvailable(f"from_pretrained(saved) raised {type(first).__name__}: {first}; "
                               f"with quantization={engine.fmt!r}: {type(e).__name__}: {e}") from None
    engine.config = engine.model.config


def logits_task(spec: dict) -> dict:
    """All-position logits for ``spec['n_positions']`` prompt tokens, saved to ``spec['out']`` (.npy)."""
    engine = ENGINES[spec["engine"]](spec)
    if spec["engine"] == "llama":
        engine.load(logits_all=True)
    else:
        engine.load()
    engine.set_threads(spec["threads"][0])
    ids = prompt_ids(int(spec["n_positions"]), seed=int(spec.get("seed", 4321)))
    t0 = time.perf_counter()
    logits = engine.all_logits(ids)
    np.save(spec["out"], logits.astype(np.float32))
    wb, _ = engine.weight_bytes()
    return {"status": "ok", "seconds": time.perf_counter() - t0, "shape": list(logits.shape),
            "finite": bool(np.isfinite(logits).all()), "weight_bytes": wb,
            "peak_rss_bytes": peak_rss_bytes()}


def build_task(spec: dict) -> dict:
    """Build (or find in the cache) the synthetic checkpoint and the GGUF files of ``spec['gguf_formats']``."""
    import synth

    g = synth.Geometry(**spec["geometry"])
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    ckpt = synth.ensure_checkpoint(g, int(spec.get("seed", 0)), log=say)
    ggufs, missing = {}, None
    if spec.get("gguf_formats"):
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            missing = f"the gguf package is not installed ({e})"
        else:
            for fmt in spec["gguf_formats"]:
                ggufs[fmt] = synth.ensure_gguf(ckpt, fmt, log=say)
    return {"status": "ok", "checkpoint": ckpt, "gguf": ggufs, "gguf_missing": missing}


TASKS = {"logits": logits_task, "build": build_task}


def main(argv: list[str]) -> int:
    if argv[0] == "--serve":
        with open(argv[1]) as f:
            serve_task(json.load(f))
        return 0
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = TASKS[spec["task"]](spec)
    except NotAvailable as e:
        result = {"status": "n/a", "reason": str(e)}
        log(f"n/a: {e}")
    except Exception as e:  # noqa: BLE001 - the parent reports it and goes on
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        log(f"error: {type(e).__name__}: {e}")
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
