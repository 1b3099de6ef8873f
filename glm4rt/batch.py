"""Batch inference over tables of texts (the ``batch`` extra: pyarrow).

``BatchPredictor`` loads one model and turns a table with a text column into the same table with
result columns, for one task:

- ``classify`` (``Glm4ForSequenceClassification``): ``label``, ``label_id``, ``probs`` (softmax;
  sigmoid for multi-label models, whose ``labels`` lists every label above 0.5; a one-label model
  is a regression and gives ``value``);
- ``token-classify`` (``Glm4ForTokenClassification``): ``tokens``, ``token_labels``,
  ``token_label_ids``;
- ``score`` (``Glm4ForCausalLM``): ``logprob`` (the sum of the log-probabilities of the text's
  tokens, each given those before it and the tokenizer's prefix, e.g. GLM's ``[gMASK]<sop>``),
  ``n_scored`` and ``perplexity`` (``exp(-logprob / n_scored)``);
- ``generate`` (``Glm4ForCausalLM`` through ``Glm4Engine``, continuous batching): the reply to each
  text as a user message (or the continuation of the raw text), ``generated_text``,
  ``finish_reason``, ``prompt_tokens``, ``completion_tokens``;

plus ``n_tokens`` and ``truncated`` for the reading tasks. Rows are sorted by length and grouped
into padded batches of similar lengths (right padding, at most ``max_batch_tokens`` tokens of
padded batch). The kernels run batch-invariant (``glm4rt.batch_invariant``): a row's results have
the bits of the text run alone, whatever else is in its batch, so a job split into blocks any way
(in this process or across Ray actors) gives the same output.

``run_job`` runs a whole Parquet file through a predictor, block by block, writing each finished
block to ``OUTPUT.parts/`` and resuming from there after a crash; ``glm4rt batch`` is its command
line. ``glm4rt.integrations.ray`` runs the same predictor in Ray Data actors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import ops
from .engine import EngineParams, Glm4Engine
from .heads import Glm4ForCausalLM, Glm4ForSequenceClassification, Glm4ForTokenClassification
from .sampling import SamplingParams

TASKS = ("classify", "token-classify", "score", "generate")
HEADS = {"classify": Glm4ForSequenceClassification, "token-classify": Glm4ForTokenClassification,
         "score": Glm4ForCausalLM, "generate": Glm4ForCausalLM}
# Rows of the lm_head computed at once when scoring: 256 x 151552 float32 logits = 155 MB.
SCORE_CHUNK_ROWS = 256


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ImportError("batch inference needs pyarrow: pip install 'glm4rt[batch]'") from e
    return pyarrow


def length_buckets(lengths: np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Group row indices into padded batches: rows sorted by length, each batch at most
    ``max_rows`` rows and ``rows x longest <= max_tokens`` padded tokens (a longer row goes alone).
    Returns the groups (index arrays into ``lengths``), shortest rows first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    groups, start, n = [], 0, len(order)
    while start < n:
        end = start + 1
        # Ascending lengths: a group [start, end) is padded to lengths[order[end - 1]].
        while end < n and end - start < max_rows and (end + 1 - start) * lengths[order[end]] <= max_tokens:
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def _right_padded(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` int64 [batch, longest], real tokens first."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def _row_seed(seed: int, text: str) -> int:
    """A sampling seed per text: the same text gets the same sample in any block or actor."""
    return (seed * 1_000_003 + zlib.crc32(text.encode("utf-8", "surrogatepass"))) % 2**63


class BatchPredictor:
    """One model, called on tables of texts (a callable class for Ray Data's ``map_batches``).

    Args:
        model: checkpoint directory or hub id (loaded once, memory-mapped), or a loaded model of
            the task's class (``tokenizer`` then defaults to its checkpoint's).
        task: one of ``TASKS``.
        text_column: the column holding the texts (strings, no nulls).
        tokenizer: a ``Glm4Tokenizer`` (default: the checkpoint's).
        dtype, quantization: as ``from_pretrained``.
        model_kwargs: more ``from_pretrained`` arguments (``config``, ``seed`` for a new head, ...).
        threads: kernel threads (default: leave the process's setting).
        max_length: cut texts to this many tokens, prefix included (default: an error for a text
            longer than ``max_position_embeddings``). Reading tasks only.
        max_batch_tokens, max_batch_rows: the size of one padded forward pass.
        batch_invariant: run the kernels batch-invariant (default): results independent of the
            batching, at the cost of the faster prompt paths on AMX CPUs (README "Serve").
        max_new_tokens, temperature, top_p, seed, chat, parallel, ctx: ``generate`` only.
            ``temperature`` 0 (default) is greedy; with ``seed`` a sampled text's seed is derived
            from the seed and the text, so results do not depend on the batching either. ``chat``
            (default) sends each text as a user message through the chat template; False
            continues the raw text. ``parallel`` sequences decode together; ``ctx`` tokens of
            prompt and reply per sequence (default: the model's, at most 4096).
    """

    def __init__(self, model: Any, task: str = "classify", *, text_column: str = "text", tokenizer: Any = None,
                 dtype: str = "auto", quantization: Optional[str] = None, model_kwargs: Optional[dict] = None,
                 threads: Optional[int] = None, max_length: Optional[int] = None, max_batch_tokens: int = 2048,
                 max_batch_rows: int = 64, batch_invariant: bool = True, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None, chat: bool = True,
                 parallel: int = 8, ctx: Optional[int] = None) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_rows", max_batch_rows),
                            ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be in [0, 2] and top_p in (0, 1], got {temperature}, {top_p}")
        self.task, self.text_column = task, text_column
        self.max_length, self.max_batch_tokens, self.max_batch_rows = max_length, max_batch_tokens, max_batch_rows
        self.batch_invariant = bool(batch_invariant)
        if threads is not None:
            ops.set_num_threads(threads)
        head = HEADS[task]
        if isinstance(model, (str, os.PathLike)):
            model = head.from_pretrained(model, dtype=dtype, quantization=quantization, progress=False,
                                         **(model_kwargs or {}))
        elif not isinstance(model, head):
            raise TypeError(f"task {task!r} needs a {head.__name__} (or a checkpoint path), got "
                            f"{type(model).__name__}")
        if tokenizer is None:
            from .tokenizer import Glm4Tokenizer

            if model.checkpoint_dir is None:
                raise ValueError("a model built in memory needs tokenizer=")
            tokenizer = Glm4Tokenizer.from_pretrained(model.checkpoint_dir)
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        # Special tokens the tokenizer puts in front (GLM: [gMASK]<sop>): the context of a score.
        self.prefix = len(tokenizer.encode("", add_special_tokens=True))
        self.engine: Optional[Glm4Engine] = None
        if task == "generate":
            self.chat = chat
            sampling = (SamplingParams(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0
                        else SamplingParams(do_sample=False))
            self.params = EngineParams(max_tokens=max_new_tokens, sampling=sampling)
            self.seed = seed
            self.engine = Glm4Engine(model, tokenizer, parallel=parallel, ctx=ctx, max_waiting=2**30)

    # ---- the call --------------------------------------------------------------------------------

    def __call__(self, batch: Any) -> Any:
        """``batch``: a ``pyarrow.Table`` or a dict of columns (Ray Data's "numpy" format). Returns
        a ``pyarrow.Table``: the batch's columns, then the task's result columns."""
        pa = _pyarrow()
        table = batch if isinstance(batch, pa.Table) else pa.table({k: list(v) if isinstance(v, np.ndarray)
                                                                      and v.dtype == object else v
                                                                      for k, v in dict(batch).items()})
        texts = self._texts(table)
        if not texts:
            columns = {name: pa.array([], type) for name, type in self.schema(pa)}
        else:
            with ops.batch_invariant_mode(self.batch_invariant):
                columns = {"generate": self._generate, "classify": self._classify, "score": self._score,
                           "token-classify": self._token_classify}[self.task](texts)
        clash = [name for name in columns if name in table.column_names]
        if clash:
            raise ValueError(f"the input already has the result column(s) {', '.join(clash)}: rename them")
        for name, type_ in self.schema(pa):
            table = table.append_column(name, pa.array(columns[name], type=type_))
        return table

    def schema(self, pa=None) -> list[tuple[str, Any]]:
        """The result columns: ``[(name, pyarrow type)]``."""
        pa = pa or _pyarrow()
        read = [("n_tokens", pa.int32()), ("truncated", pa.bool_())]
        if self.task == "classify":
            if self.model.config.num_labels == 1:
                return [("value", pa.float32())] + read
            cols = [("label", pa.string()), ("label_id", pa.int64()), ("probs", pa.list_(pa.float32()))]
            if self._multi_label:
                cols.append(("labels", pa.list_(pa.string())))
            return cols + read
        if self.task == "token-classify":
            return [("tokens", pa.list_(pa.string())), ("token_labels", pa.list_(pa.string())),
                    ("token_label_ids", pa.list_(pa.int32()))] + read
        if self.task == "score":
            return [("logprob", pa.float64()), ("n_scored", pa.int32()), ("perplexity", pa.float64())] + read
        return [("generated_text", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
                ("completion_tokens", pa.int32())]

    @property
    def _multi_label(self) -> bool:
        return self.model.config.problem_type == "multi_label_classification"

    def close(self) -> None:
        """Stop the generation engine's thread (other tasks hold none)."""
        if self.engine is not None:
            self.engine.shutdown()

    # ---- tasks -----------------------------------------------------------------------------------

    def _texts(self, table) -> list[str]:
        if self.text_column not in table.column_names:
            raise ValueError(f"the input has no column {self.text_column!r} (columns: "
                             f"{', '.join(table.column_names) or 'none'})")
        texts = table.column(self.text_column).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"row {i} of this batch: column {self.text_column!r} holds "
                                 f"{'a null' if t is None else type(t).__name__}, not a string")
        return texts

    def _encode(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text (prefix included), cut to ``max_length``; whether it was cut."""
        full = self.tokenizer._encode_ids(texts, True, None)
        limit = self.max_length or self.model.config.max_position_embeddings
        rows, cut = [], []
        for i, ids in enumerate(full):
            if len(ids) > limit:
                if self.max_length is None:
                    raise ValueError(f"row {i} of this batch has {len(ids)} tokens, more than the model's "
                                     f"{limit} (max_position_embeddings): set max_length to cut long texts")
                ids = self.tokenizer._encode_ids([texts[i]], True, limit)[0]
            rows.append(ids)
            cut.append(len(ids) < len(full[i]))
        return rows, cut

    def _groups(self, rows: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, input_ids, attention_mask) of each padded batch."""
        for group in length_buckets(np.array([len(r) for r in rows]), self.max_batch_tokens, self.max_batch_rows):
            yield (group,) + _right_padded([rows[i] for i in group], self.pad_id)

    def _classify(self, texts: list[str]) -> dict[str, list]:
        rows, cut = self._encode(texts)
        config = self.model.config
        logits = np.empty((len(rows), config.num_labels), dtype=np.float32)
        for group, ids, mask in self._groups(rows):
            last = mask.sum(1) - 1  # [b]: each row's last token, where the head pools
            keep = np.unique(last)
            hidden = self.model.model.forward(ids, mask, use_cache=False, keep_positions=keep).last_hidden_state
            logits[group] = self.model.score(np.ascontiguousarray(hidden[np.arange(len(group)),
                                                                         np.searchsorted(keep, last)]))
        out = {"n_tokens": [len(r) for r in rows], "truncated": cut}
        if config.num_labels == 1:
            out["value"] = logits[:, 0]
            return out
        names = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        if self._multi_label:
            probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            out["labels"] = [[names[j] for j in np.flatnonzero(p > 0.5)] for p in probs]
        else:
            z = logits.astype(np.float64)
            z = np.exp(z - z.max(1, keepdims=True))
            probs = z / z.sum(1, keepdims=True)
        best = logits.argmax(1)
        out.update(label=[names[j] for j in best], label_id=best, probs=list(probs.astype(np.float32)))
        return out

    def _token_classify(self, texts: list[str]) -> dict[str, list]:
        rows, cut = self._encode(texts)
        config = self.model.config
        names = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        best: list = [None] * len(rows)
        for group, ids, mask in self._groups(rows):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [b, T, L]
            for j, i in enumerate(group):
                best[i] = logits[j, :len(rows[i])].argmax(-1).astype(np.int32)
        return {"tokens": [self.tokenizer.convert_ids_to_tokens(r) for r in rows],
                "token_labels": [[names[j] for j in b] for b in best], "token_label_ids": best,
                "n_tokens": [len(r) for r in rows], "truncated": cut}

    def _score(self, texts: list[str]) -> dict[str, list]:
        rows, cut = self._encode(texts)
        first = max(self.prefix, 1)  # the first scored token: the first has no context without a prefix
        logprob = np.zeros(len(rows), dtype=np.float64)
        for group, ids, mask in self._groups(rows):
            hidden = self.model.model.forward(ids, mask, use_cache=False).last_hidden_state  # [b, T, H]
            # Position t predicts token t + 1: the states of positions first-1 .. n-2 of each row.
            where = [(j, t) for j, i in enumerate(group) for t in range(first - 1, len(rows[i]) - 1)]
            if not where:
                continue
            b_idx, t_idx = np.array(where).T
            states = np.ascontiguousarray(hidden[b_idx, t_idx])          # [R, H]
            targets = ids[b_idx, t_idx + 1]                               # [R]
            token_lp = np.empty(len(where), dtype=np.float64)
            for s in range(0, len(where), SCORE_CHUNK_ROWS):
                logits = self.model.lm_head(states[s:s + SCORE_CHUNK_ROWS])  # [r, V] float32
                picked = logits[np.arange(len(logits)), targets[s:s + SCORE_CHUNK_ROWS]].astype(np.float64)
                top = logits.max(1, keepdims=True)
                np.exp(np.subtract(logits, top, out=logits), out=logits)  # in place: no second [r, V]
                lse = top[:, 0].astype(np.float64) + np.log(logits.sum(1, dtype=np.float64))
                token_lp[s:s + SCORE_CHUNK_ROWS] = picked - lse
            for j, i in enumerate(group):  # each row's sum in position order
                logprob[i] = float(np.sum(token_lp[b_idx == j]))
        n_scored = [max(len(r) - first, 0) for r in rows]
        return {"logprob": logprob, "n_scored": n_scored,
                "perplexity": [float(np.exp(-lp / n)) if n else None for lp, n in zip(logprob, n_scored)],
                "n_tokens": [len(r) for r in rows], "truncated": cut}

    def _generate(self, texts: list[str]) -> dict[str, list]:
        tok = self.tokenizer
        handles = []
        try:
            for i, text in enumerate(texts):
                if self.chat:
                    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}],
                                                                add_generation_prompt=True, tokenize=False),
                                        add_special_tokens=False)
                else:
                    prompt = tok.encode(text, add_special_tokens=True)
                params = self.params
                if self.seed is not None and params.sampling.do_sample:
                    params = dataclasses.replace(params, seed=_row_seed(self.seed, text))
                try:
                    handles.append(self.engine.submit(prompt, params))
                except ValueError as e:
                    raise ValueError(f"row {i} of this batch: {e}") from None
            results = [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return {"generated_text": [text for _, text, _ in results],
                "finish_reason": [f.reason for _, _, f in results],
                "prompt_tokens": [f.prompt_tokens for _, _, f in results],
                "completion_tokens": [f.completion_tokens for _, _, f in results]}


# ---- whole files, resumable -----------------------------------------------------------------------

@dataclasses.dataclass
class JobSummary:
    rows: int
    blocks: int
    blocks_done_before: int  # found finished in OUTPUT.parts/ (a resumed run)
    seconds: float


def parts_dir(output: str) -> str:
    return output + ".parts"


def _manifest(input_path: str, task: str, options: dict, block_rows: int) -> dict:
    pa = _pyarrow()
    meta = pa.parquet.ParquetFile(input_path).metadata
    return {"input": os.path.abspath(input_path), "input_bytes": os.path.getsize(input_path),
            "rows": meta.num_rows, "schema": str(meta.schema.to_arrow_schema()), "task": task,
            "block_rows": block_rows, "options": options}


def _block_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"block-{index:07d}.parquet")


def write_parquet_atomic(table, path: str) -> None:
    """Write beside ``path`` and rename over it: a crash never leaves a half-written file there."""
    pa = _pyarrow()
    tmp = path + ".tmp"
    pa.parquet.write_table(table, tmp)
    os.replace(tmp, path)


def input_blocks(input_path: str, block_rows: int) -> Iterator[tuple[int, Any]]:
    """``(block index, pyarrow.Table)`` of ``block_rows`` rows each (the last may be shorter)."""
    pa = _pyarrow()
    f = pa.parquet.ParquetFile(input_path)
    for i, rb in enumerate(f.iter_batches(batch_size=block_rows)):
        yield i, pa.Table.from_batches([rb])


def run_job(input_path: str, output_path: str, task: str, options: dict, *, block_rows: int = 1024,
            run_blocks: Optional[Callable] = None, log: Callable[[str], None] = lambda s: None) -> JobSummary:
    """Run a Parquet file through ``BatchPredictor(task=task, **options)`` into ``output_path``.

    Each block of ``block_rows`` input rows is written to ``OUTPUT.parts/`` when done; a rerun with
    the same input and settings skips those (a crashed or killed run resumes), one with other
    settings is refused. At the end the blocks are joined in input order into ``output_path`` and
    the parts directory is removed.

    Args:
        run_blocks: ``run_blocks(blocks, task, options) -> iterator of (index, table)`` runs the
            pending ``(index, table)`` blocks somewhere else (``glm4rt.integrations.ray``); default
            a ``BatchPredictor`` in this process.
    """
    import time

    pa = _pyarrow()
    t0 = time.perf_counter()
    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1, got {block_rows!r}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"no input file {input_path!r}")
    try:
        json.dumps(options)
    except (TypeError, ValueError) as e:
        raise TypeError(f"the job's options must be JSON values (a checkpoint path, not a loaded model; "
                        f"plain numbers and strings), as they are recorded in job.json: {e}") from None
    try:
        manifest = _manifest(input_path, task, options, block_rows)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{input_path!r} is not a Parquet file: {e}") from None
    directory = parts_dir(output_path)
    manifest_path = os.path.join(directory, "job.json")
    finished = os.path.isdir(directory) and any(n.startswith("block-") and n.endswith(".parquet")
                                                 for n in os.listdir(directory))
    if finished and not os.path.exists(manifest_path):
        raise ValueError(f"{directory} holds blocks but no job.json: delete the directory to start over")
    if finished:
        with open(manifest_path) as f:
            before = json.load(f)
        if before != json.loads(json.dumps(manifest)):
            changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
            raise ValueError(f"{directory} holds the blocks of another job (differs in: {', '.join(changed)}): "
                             "rerun with that job's input and settings, or delete the directory")
    else:  # a new job (or one that failed before its first block: nothing to keep)
        if os.path.exists(output_path):
            raise FileExistsError(f"{output_path!r} exists: remove it or choose another output")
        os.makedirs(directory, exist_ok=True)
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(manifest_path + ".tmp", manifest_path)
    n_blocks = max(-(-manifest["rows"] // block_rows), 1)  # an empty input: one empty block
    done = {i for i in range(n_blocks) if os.path.exists(_block_path(directory, i))}
    if done:
        log(f"resuming: {len(done)} of {n_blocks} blocks already done")
    if manifest["rows"]:
        pending = ((i, t) for i, t in input_blocks(input_path, block_rows) if i not in done)
    else:
        pending = iter([] if done else [(0, pa.parquet.read_table(input_path))])
    if run_blocks is None:
        predictor = BatchPredictor(task=task, **options)

        def run_blocks(blocks, task, options):
            for i, table in blocks:
                yield i, predictor(table)
    else:
        predictor = None
    try:
        for count, (i, table) in enumerate(run_blocks(pending, task, options), len(done) + 1):
            write_parquet_atomic(table, _block_path(directory, i))
            log(f"block {i + 1}/{n_blocks} done ({count}/{n_blocks})")
    finally:
        if predictor is not None:
            predictor.close()
    missing = [i for i in range(n_blocks) if not os.path.exists(_block_path(directory, i))]
    if missing:
        raise RuntimeError(f"blocks {missing[:10]} were never written")
    _join_blocks(directory, n_blocks, output_path)
    return JobSummary(manifest["rows"], n_blocks, len(done), time.perf_counter() - t0)


def _join_blocks(directory: str, n_blocks: int, output_path: str) -> None:
    pa = _pyarrow()
    tmp = output_path + ".tmp"
    writer = None
    try:
        for i in range(n_blocks):
            table = pa.parquet.read_table(_block_path(directory, i))
            if writer is None:
                writer = pa.parquet.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, output_path)
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
    os.rmdir(directory)
