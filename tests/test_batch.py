"""Batch inference (glm4rt.batch, ``glm4rt batch``) in this process: each task against transformers
(the oracle) on tiny random checkpoints, results independent of how rows are batched, and whole
Parquet jobs that resume after a crash and refuse bad input."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="batch inference needs the batch extra (pyarrow)")
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import glm4rt  # noqa: E402
from batch_models import LABELS, build_model, texts  # noqa: E402
from chat_model import build_chat_checkpoint  # noqa: E402
from glm4rt.batch import BatchPredictor, length_buckets, parts_dir, run_job  # noqa: E402
from helpers import glm4rt_command  # noqa: E402
from hf_reference import load_reference  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_models")
    out = {head: build_model(str(root / head), head, seed=i) for i, head in enumerate(("seqcls", "tokcls", "causal"))}
    out["chat"] = build_chat_checkpoint(str(root / "chat"))
    return out


@pytest.fixture(scope="module")
def predictors(models):
    made = {"classify": BatchPredictor(models["seqcls"], "classify", max_batch_tokens=512),
            "token-classify": BatchPredictor(models["tokcls"], "token-classify", max_batch_tokens=512),
            "score": BatchPredictor(models["causal"], "score", max_batch_tokens=512)}
    yield made


def _hf_ids(predictor, text):
    return torch.tensor([predictor.tokenizer.encode(text)])


def test_length_buckets_cover_every_row_once_within_the_budget():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 300):
        lengths = rng.integers(1, 200, size=n)
        lengths[rng.integers(0, n)] = 1000  # longer than the budget: a group of its own
        groups = length_buckets(lengths, max_tokens=512, max_rows=16)
        rows = np.concatenate(groups)
        assert sorted(rows.tolist()) == list(range(n))
        for g in groups:
            assert len(g) <= 16
            assert len(g) == 1 or len(g) * lengths[g].max() <= 512
        assert [lengths[g].max() for g in groups] == sorted(lengths[g].max() for g in groups)


def test_classify_matches_transformers(models, predictors):
    p = predictors["classify"]
    some = texts(24, seed=1)
    out = p(pa.table({"text": some}))
    hf = load_reference(models["seqcls"], "seqcls")
    for i, text in enumerate(some):
        with torch.no_grad():
            logits = hf(_hf_ids(p, text)).logits[0].double()
        want = torch.softmax(logits, -1).numpy()
        np.testing.assert_allclose(out["probs"][i].as_py(), want, rtol=0, atol=2e-6)
        assert out["label_id"][i].as_py() == int(logits.argmax())
        assert out["label"][i].as_py() == LABELS["seqcls"][int(logits.argmax())]
        assert out["n_tokens"][i].as_py() == len(p.tokenizer.encode(text))


def test_token_classify_matches_transformers(models, predictors):
    p = predictors["token-classify"]
    some = texts(12, seed=2)
    out = p(pa.table({"text": some}))
    hf = load_reference(models["tokcls"], "tokcls")
    for i, text in enumerate(some):
        ids = _hf_ids(p, text)
        with torch.no_grad():
            logits = hf(ids).logits[0]
        top2 = torch.topk(logits, 2, -1).values
        sure = (top2[:, 0] - top2[:, 1]) > 1e-4  # positions whose argmax rounding cannot flip
        got = np.array(out["token_label_ids"][i].as_py())
        np.testing.assert_array_equal(got[sure.numpy()], logits.argmax(-1).numpy()[sure.numpy()])
        assert out["tokens"][i].as_py() == p.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        assert out["token_labels"][i].as_py() == [LABELS["tokcls"][j] for j in got]


def test_score_matches_transformers(models, predictors):
    p = predictors["score"]
    some = texts(10, seed=3) + [""]
    out = p(pa.table({"text": some}))
    hf = load_reference(models["causal"], "causal")
    for i, text in enumerate(some):
        ids = _hf_ids(p, text)
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        # [gMASK]<sop> is the context: tokens 2.. are scored, each from the position before it.
        want = float(lp[torch.arange(1, ids.shape[1] - 1), ids[0, 2:]].sum())
        assert out["n_scored"][i].as_py() == ids.shape[1] - 2
        assert out["logprob"][i].as_py() == pytest.approx(want, rel=1e-6, abs=1e-5)
        if ids.shape[1] > 2:
            assert out["perplexity"][i].as_py() == pytest.approx(np.exp(-want / (ids.shape[1] - 2)), rel=1e-5)
        else:
            assert out["perplexity"][i].as_py() is None and out["logprob"][i].as_py() == 0.0


@pytest.mark.parametrize("task", ["classify", "token-classify", "score"])
def test_rows_do_not_depend_on_the_batching(predictors, task):
    """Every row has the same bits alone, in one big call, and in random splits of the table."""
    p = predictors[task]
    some = texts(120 if task != "score" else 40, seed=4)
    whole = p(pa.table({"text": some}))
    rng = np.random.default_rng(5)
    cuts = np.sort(rng.choice(np.arange(1, len(some)), size=6, replace=False))
    pieces = [p(pa.table({"text": some[a:b]})) for a, b in zip([0, *cuts], [*cuts, len(some)])]
    assert pa.concat_tables(pieces).equals(whole)
    for i in rng.choice(len(some), size=5, replace=False):
        assert p(pa.table({"text": [some[i]]})).equals(whole.slice(i, 1))


def test_generate_gives_generate_alone(models):
    p = BatchPredictor(models["chat"], "generate", max_new_tokens=12, parallel=3)
    try:
        some = texts(7, seed=6, longest=12)
        out = p(pa.table({"text": some}))
    finally:
        p.close()
    model = glm4rt.Glm4ForCausalLM.from_pretrained(models["chat"])
    tok = p.tokenizer
    for i, text in enumerate(some):
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_dict=False)
        with glm4rt.batch_invariant():
            ids = model.generate(np.array([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert out["generated_text"][i].as_py() == tok.decode(ids, skip_special_tokens=True)
        assert out["completion_tokens"][i].as_py() == 12 and out["finish_reason"][i].as_py() == "length"
        assert out["prompt_tokens"][i].as_py() == len(prompt)


def test_sampled_generation_is_seeded_per_text(models):
    p = BatchPredictor(models["chat"], "generate", max_new_tokens=8, temperature=1.0, seed=7)
    try:
        some = texts(4, seed=8, longest=10)
        a = p(pa.table({"text": some}))["generated_text"].to_pylist()
        b = p(pa.table({"text": some[::-1]}))["generated_text"].to_pylist()[::-1]
    finally:
        p.close()
    assert a == b
    assert len(set(a)) > 1


def test_classify_results_keep_the_input_columns(predictors):
    table = pa.table({"id": pa.array([10, 11, 12], pa.int64()), "text": ["a", "bb cc", ""], "extra": [1.5, None, 2.0]})
    out = predictors["classify"](table)
    assert out.column_names == ["id", "text", "extra", "label", "label_id", "probs", "n_tokens", "truncated"]
    assert out.slice(0, 3).select(["id", "text", "extra"]).equals(table)
    assert np.allclose([sum(p) for p in out["probs"].to_pylist()], 1.0, atol=1e-6)
    empty = predictors["classify"](table.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema.equals(out.schema)


def test_max_length_cuts_long_texts(models):
    p = BatchPredictor(models["seqcls"], "classify", max_length=8)
    out = p(pa.table({"text": ["the quick brown fox jumps over a lazy dog " * 3, "fox"]}))
    assert out["n_tokens"].to_pylist()[0] == 8 and out["truncated"].to_pylist() == [True, False]
    cut = p.tokenizer.decode(p.tokenizer.encode("the quick brown fox jumps over a lazy dog " * 3)[2:8])
    alone = p(pa.table({"text": [cut]}))
    assert alone["probs"][0].as_py() == out["probs"][0].as_py()


def test_bad_input_is_named(models, predictors):
    p = predictors["classify"]
    with pytest.raises(ValueError, match="no column 'text'"):
        p(pa.table({"body": ["x"]}))
    with pytest.raises(ValueError, match="row 1 .*null"):
        p(pa.table({"text": ["x", None]}))
    with pytest.raises(ValueError, match="row 0 .*int"):
        p(pa.table({"text": [3]}))
    with pytest.raises(ValueError, match="result column.*label"):
        p(pa.table({"text": ["x"], "label": ["y"]}))
    with pytest.raises(ValueError, match="row 0 .*max_position_embeddings.*max_length"):
        p(pa.table({"text": ["fox " * 600]}))
    with pytest.raises(ValueError, match="task must be one of"):
        BatchPredictor(models["seqcls"], "summarize")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchPredictor(models["seqcls"], "classify", max_batch_tokens=0)
    with pytest.raises(TypeError, match="Glm4ForSequenceClassification"):
        BatchPredictor(glm4rt.Glm4ForCausalLM.from_pretrained(models["causal"]), "classify")


# ---- whole files -------------------------------------------------------------------------------

def _write_input(path, n, seed=9):
    pq.write_table(pa.table({"id": np.arange(n), "text": texts(n, seed=seed)}), path, row_group_size=97)
    return path


def test_job_output_is_the_predictor_on_the_whole_table(tmp_path, models, predictors):
    src = _write_input(str(tmp_path / "in.parquet"), 250)
    dst = str(tmp_path / "out.parquet")
    summary = run_job(src, dst, "classify", {"model": models["seqcls"], "max_batch_tokens": 512}, block_rows=64)
    assert (summary.rows, summary.blocks, summary.blocks_done_before) == (250, 4, 0)
    assert pq.read_table(dst).equals(predictors["classify"](pq.read_table(src)))
    assert not os.path.exists(parts_dir(dst))
    with pytest.raises(FileExistsError, match="exists"):
        run_job(src, dst, "classify", {"model": models["seqcls"]}, block_rows=64)


def test_job_resumes_without_redoing_finished_blocks(tmp_path, models, predictors):
    src = _write_input(str(tmp_path / "in.parquet"), 300)
    dst = str(tmp_path / "out.parquet")
    options = {"model": models["seqcls"]}
    p = predictors["classify"]
    ran = []

    def crashing(blocks, task, opts):
        for i, table in blocks:
            if len(ran) == 3:
                raise KeyboardInterrupt("killed")
            ran.append(i)
            yield i, p(table)

    with pytest.raises(KeyboardInterrupt):
        run_job(src, dst, "classify", options, block_rows=50, run_blocks=crashing)
    assert sorted(os.listdir(parts_dir(dst))) == ["block-0000000.parquet", "block-0000001.parquet",
                                                  "block-0000002.parquet", "job.json"]
    with pytest.raises(ValueError, match="another job.*block_rows"):
        run_job(src, dst, "classify", options, block_rows=60)
    with pytest.raises(ValueError, match="another job.*options"):
        run_job(src, dst, "classify", {**options, "max_length": 9}, block_rows=50)
    ran.clear()
    logs = []

    def counting(blocks, task, opts):
        for i, table in blocks:
            ran.append(i)
            yield i, p(table)

    summary = run_job(src, dst, "classify", options, block_rows=50, run_blocks=counting, log=logs.append)
    assert ran == [3, 4, 5] and summary.blocks_done_before == 3
    assert logs[0] == "resuming: 3 of 6 blocks already done"
    assert pq.read_table(dst).equals(p(pq.read_table(src)))


def test_job_of_an_empty_input_keeps_the_columns(tmp_path, models):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src)
    dst = str(tmp_path / "out.parquet")
    run_job(src, dst, "classify", {"model": models["seqcls"]})
    out = pq.read_table(dst)
    assert out.num_rows == 0 and out.column_names == ["text", "label", "label_id", "probs", "n_tokens", "truncated"]


def test_job_bad_input(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="no input file"):
        run_job(str(tmp_path / "missing.parquet"), str(tmp_path / "o.parquet"), "classify", {"model": models["seqcls"]})
    src = _write_input(str(tmp_path / "in.parquet"), 3)
    with pytest.raises(TypeError, match="JSON values"):
        run_job(src, str(tmp_path / "o.parquet"), "classify", {"model": glm4rt.Glm4ForSequenceClassification.from_pretrained(models["seqcls"])})
    assert not os.path.exists(parts_dir(str(tmp_path / "o.parquet")))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        run_job(str(bad), str(tmp_path / "o.parquet"), "classify", {"model": models["seqcls"]})


def test_cli_batch_killed_then_resumed(tmp_path, models, predictors):
    """`glm4rt batch` killed by SIGKILL after some blocks resumes where it stopped."""
    src = _write_input(str(tmp_path / "in.parquet"), 3000, seed=10)
    dst = str(tmp_path / "out.parquet")
    cmd = glm4rt_command("--threads", "1", "batch", "--model", models["seqcls"], "--input", src, "--output", dst,
                         "--task", "classify", "--block-rows", "100")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = [n for n in os.listdir(parts_dir(dst))] if os.path.isdir(parts_dir(dst)) else []
        if sum(n.startswith("block-") and n.endswith(".parquet") for n in done) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed: " + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sum(n.endswith(".parquet") for n in os.listdir(parts_dir(dst)))
    assert 3 <= finished < 30 and not os.path.exists(dst)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {finished} of 30 blocks already done" in res.stderr
    assert pq.read_table(dst).equals(predictors["classify"](pq.read_table(src)))


def test_cli_batch_errors(tmp_path, models):
    src = _write_input(str(tmp_path / "in.parquet"), 5)
    for args, message in [
        (["--input", str(tmp_path / "nope.parquet")], "no input file"),
        (["--input", src, "--text-column", "body"], "no column 'body'"),
        (["--input", src, "--max-new-tokens", "0", "--task", "generate"], "max_new_tokens"),
    ]:
        res = subprocess.run(glm4rt_command("batch", "--model", models["seqcls"], "--output",
                                            str(tmp_path / "o.parquet"), "--task", "classify", *args),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
