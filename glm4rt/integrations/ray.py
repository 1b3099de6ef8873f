"""glm4rt on Ray (the ``ray`` extra): batch jobs with Ray Data, replicas with Ray Serve.

Ray Data: ``map_texts(dataset, model, task)`` runs ``RayBatchPredictor`` (a ``BatchPredictor`` whose
kernel threads are the CPUs Ray gave its actor) in a pool of actors, one model per actor::

    ds = ray.data.read_parquet("tickets.parquet")
    out = map_texts(ds, "path/to/checkpoint", "classify", actors=16, cpus_per_actor=8)
    out.write_parquet("labels/")

Actors on one node share the checkpoint's pages: the weights are memory-mapped read-only, so the
page cache holds one copy per node however many actors map it (quantize the checkpoint once with
``glm4rt quantize``: quantizing while loading would make a private copy per actor).
``glm4rt batch --ray-address ...`` uses ``block_runner`` to run a resumable job on a cluster.

Ray Serve: ``serve_app(model, replicas=N)`` is an application whose replicas each run a
``Glm4Engine`` (continuous batching) behind the routes of ``glm4rt serve`` (``/v1/chat/completions``,
``/v1/completions``, ...); Serve's proxy routes requests across replicas::

    serve run glm4rt.integrations.ray:app model=path/to/checkpoint replicas=2 cpus_per_replica=8
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Iterator, Optional

import ray

from .. import ops
from ..batch import BatchPredictor

BLOCK_COLUMN, ROW_COLUMN = "__glm4rt_block", "__glm4rt_row"


def actor_threads() -> Optional[int]:
    """The CPUs Ray assigned to the calling actor or task (None outside Ray or with no CPU)."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except (AssertionError, RuntimeError):  # not a Ray worker
        return None
    if not cpus:
        return None
    return max(1, min(int(cpus), ops.max_num_threads()))


class RayBatchPredictor(BatchPredictor):
    """``BatchPredictor`` for Ray Data actors: ``threads`` defaults to the actor's ``num_cpus``."""

    def __init__(self, model: Any, task: str = "classify", **options: Any) -> None:
        if options.get("threads") is None:
            options["threads"] = actor_threads()
        super().__init__(model, task, **options)


def map_texts(dataset, model: str, task: str, *, actors: int = 1, cpus_per_actor: float = 1,
              batch_size: Optional[int] = 256, **options: Any):
    """``dataset.map_batches`` with a pool of ``actors`` ``RayBatchPredictor`` actors, each
    reserving ``cpus_per_actor`` CPUs (its kernel threads). ``options``: ``BatchPredictor``'s.
    ``batch_size`` rows go to an actor at a time (None: whole blocks); the predictor pads them by
    length buckets. A failed actor is restarted and its batch retried (Ray Data's default)."""
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be an integer >= 1, got {actors!r}")
    if not cpus_per_actor > 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor!r}")
    return dataset.map_batches(RayBatchPredictor, fn_constructor_kwargs=dict(model=model, task=task, **options),
                               batch_format="pyarrow", batch_size=batch_size,
                               compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor)


def block_runner(actors: int = 1, cpus_per_actor: float = 1):
    """A ``run_blocks`` for ``glm4rt.batch.run_job`` that runs the blocks on Ray (``ray.init``
    first). The driver puts each pending block in the object store, tagged with its index and row
    numbers; a block is handed back when every one of its rows has come back, rows in input order.
    A row returned twice (an actor retried after its result was sent) is kept once."""
    def run_blocks(blocks, task: str, options: dict) -> Iterator[tuple[int, Any]]:
        import pyarrow as pa

        refs, sizes = [], {}
        for i, table in blocks:
            n = table.num_rows
            table = table.append_column(BLOCK_COLUMN, pa.array([i] * n, pa.int64()))
            table = table.append_column(ROW_COLUMN, pa.array(range(n), pa.int64()))
            refs.append(ray.put(table))
            sizes[i] = n
        if not refs:
            return
        out = map_texts(ray.data.from_arrow_refs(refs), options["model"], task, actors=actors,
                        cpus_per_actor=cpus_per_actor, batch_size=None,
                        **{k: v for k, v in options.items() if k != "model"})
        pieces: dict[int, list] = {i: [] for i in sizes}
        seen: dict[int, set] = {i: set() for i in sizes}
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            block_ids = batch.column(BLOCK_COLUMN).to_numpy()
            for i in sorted(set(block_ids.tolist())):
                part = batch.filter(pa.array(block_ids == i))
                rows = part.column(ROW_COLUMN).to_pylist()
                fresh = [k for k, r in enumerate(rows) if r not in seen[i]]
                if len(fresh) < len(rows):
                    part = part.take(pa.array(fresh, pa.int64()))
                seen[i].update(rows)
                pieces[i].append(part)
                if len(seen[i]) == sizes[i]:
                    whole = pa.concat_tables(pieces.pop(i))
                    whole = whole.sort_by(ROW_COLUMN).drop_columns([BLOCK_COLUMN, ROW_COLUMN])
                    yield i, whole
        if pieces:
            raise RuntimeError(f"Ray returned blocks {sorted(pieces)[:10]} incompletely")
    return run_blocks


# ---- Ray Serve -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def deployment_class():
    """The Serve deployment (built on first use: Ray Data users need not have Serve installed)."""
    from ray import serve

    @serve.deployment(name="glm4rt")
    @serve.ingress()
    class Glm4Deployment:
        """One replica: a model, a ``Glm4Engine`` and the OpenAI routes of ``glm4rt serve``."""

        def __init__(self, model: str, *, served_model_name: Optional[str] = None, dtype: str = "auto",
                     quantization: Optional[str] = None, api_key: Optional[str] = None, parallel: int = 4,
                     ctx: Optional[int] = None, prefill_chunk: int = 512, max_stall: float = 2.5,
                     max_waiting: int = 64, threads: Optional[int] = None) -> None:
            from ..engine import Glm4Engine
            from ..heads import Glm4ForCausalLM
            from ..server import OpenAIServer
            from ..tokenizer import Glm4Tokenizer

            threads = threads or actor_threads()
            if threads:
                ops.set_num_threads(threads)
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))  # as run_server does
            lm = Glm4ForCausalLM.from_pretrained(model, dtype=dtype, quantization=quantization, progress=False)
            tokenizer = Glm4Tokenizer.from_pretrained(lm.checkpoint_dir)
            self.engine = Glm4Engine(lm, tokenizer, parallel=parallel, ctx=ctx, prefill_chunk=prefill_chunk,
                                     max_stall=max_stall, max_waiting=max_waiting)
            self.server = OpenAIServer(self.engine, tokenizer, served_model_name or model, api_key)

        def __serve_build_asgi_app__(self):
            return self.server.app

        def check_health(self) -> None:
            if self.engine._closed or not self.engine._thread.is_alive():
                raise RuntimeError("the engine's scheduler thread is not running")

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.shutdown(timeout=0)

    return Glm4Deployment


def serve_app(model: str, *, replicas: int = 1, cpus_per_replica: float = 1,
              autoscaling_config: Optional[dict] = None, **options: Any):
    """A Serve application of ``replicas`` replicas (or ``autoscaling_config``), each with
    ``cpus_per_replica`` CPUs (its kernel threads). ``options``: ``Glm4Deployment``'s (``parallel``,
    ``ctx``, ``api_key``, ``served_model_name``, ...). Run it with ``serve.run(app)``."""
    parallel = options.get("parallel", 4)
    scaling = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": replicas}
    # A replica takes as many requests as it has slots and waiting room; Serve's router sends
    # the rest to other replicas (or holds them) instead of stacking them on one.
    deployment = deployment_class().options(ray_actor_options={"num_cpus": cpus_per_replica},
                                            max_ongoing_requests=parallel + options.get("max_waiting", 64),
                                            **scaling)
    return deployment.bind(model, **options)


def app(args: dict):
    """Builder for ``serve run glm4rt.integrations.ray:app model=DIR [replicas=N cpus_per_replica=C
    parallel=P ctx=T api_key=K served_model_name=NAME quantization=int4]``."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("give model=<checkpoint directory or hub id>")
    ints = ("replicas", "parallel", "ctx", "prefill_chunk", "max_waiting", "threads")
    floats = ("cpus_per_replica", "max_stall")
    kwargs = {k: int(v) if k in ints else float(v) if k in floats else v for k, v in args.items()}
    return serve_app(kwargs.pop("model"), **kwargs)
