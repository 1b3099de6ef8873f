"""glm4rt on a local Ray cluster (this machine, 2 CPUs, loopback only): batch jobs on Ray Data give
exactly the in-process results, also when an actor is killed mid-run, and Ray Serve replicas answer
the ``openai`` client with the tokens ``generate`` gives alone."""
import os
import signal
import socket
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra (ray[data,serve])")
pa = pytest.importorskip("pyarrow", reason="the Ray tests need pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import glm4rt  # noqa: E402
from batch_models import build_model, texts  # noqa: E402
from chat_model import build_chat_checkpoint  # noqa: E402
from glm4rt.batch import BatchPredictor, run_job  # noqa: E402
from glm4rt.integrations.ray import app, block_runner, map_texts, serve_app  # noqa: E402
from helpers import glm4rt_command  # noqa: E402

N_TEXTS = 3000
# Ray Serve's own pydantic models warn on import; nothing to do with glm4rt.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray puts the driver's working directory on its workers' sys.path: from the source tree (the
    # README's test command) the uncompiled glm4rt/ there would shadow the installed package.
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray_driver"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
    finally:
        os.chdir(here)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_model(str(tmp_path_factory.mktemp("ray_seqcls")), "seqcls", seed=3)


@pytest.fixture(scope="module")
def job(tmp_path_factory, classifier):
    """A Parquet file of N_TEXTS short texts and its classification computed in this process."""
    src = str(tmp_path_factory.mktemp("ray_job") / "tickets.parquet")
    pq.write_table(pa.table({"ticket": np.arange(N_TEXTS), "text": texts(N_TEXTS, seed=11, longest=24)}), src)
    expected = BatchPredictor(classifier, "classify")(pq.read_table(src))
    return src, expected


def test_ray_job_gives_the_in_process_results(cluster, classifier, job, tmp_path):
    src, expected = job
    dst = str(tmp_path / "out.parquet")
    summary = run_job(src, dst, "classify", {"model": classifier}, block_rows=250,
                      run_blocks=block_runner(actors=2, cpus_per_actor=1))
    assert summary.rows == N_TEXTS and summary.blocks == 12
    assert pq.read_table(dst).equals(expected)


def test_bad_pool_sizes_are_named(cluster, classifier):
    ds = ray.data.from_items([{"text": "x"}])
    with pytest.raises(ValueError, match="actors must be an integer >= 1"):
        map_texts(ds, classifier, "classify", actors=0)
    with pytest.raises(ValueError, match="cpus_per_actor must be > 0"):
        map_texts(ds, classifier, "classify", cpus_per_actor=0)


def test_actor_threads_follow_num_cpus(cluster, classifier):
    @ray.remote
    def threads_of_a_predictor():
        from glm4rt.integrations.ray import RayBatchPredictor

        RayBatchPredictor(classifier, "classify")
        return glm4rt.get_num_threads()

    for cpus in (1, 2):
        assert ray.get(threads_of_a_predictor.options(num_cpus=cpus).remote()) == cpus


def test_cli_batch_on_the_running_cluster(cluster, classifier, job, tmp_path):
    """`glm4rt batch --ray-address ADDRESS` joins the cluster as a second driver."""
    import subprocess

    src, expected = job
    dst = str(tmp_path / "out.parquet")
    address = ray.get_runtime_context().gcs_address
    # From this directory (the source tree, in CI), with the model as a relative path.
    res = subprocess.run(glm4rt_command("batch", "--model", os.path.relpath(classifier), "--input", src, "--output", dst,
                                        "--task", "classify", "--block-rows", "500", "--ray-address", address,
                                        "--actors", "2", "--cpus-per-actor", "1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{N_TEXTS} rows (6 blocks, 0 done before)" in res.stdout
    assert pq.read_table(dst).equals(expected)


def test_ray_job_resumes_after_the_driver_stops(cluster, classifier, job, tmp_path):
    src, expected = job
    dst = str(tmp_path / "out.parquet")
    seen = []

    def stop_after_four_blocks(message: str) -> None:
        seen.append(message)
        if len(seen) == 4:
            raise KeyboardInterrupt("the driver is stopped")

    with pytest.raises(KeyboardInterrupt):
        run_job(src, dst, "classify", {"model": classifier}, block_rows=300,
                run_blocks=block_runner(actors=2, cpus_per_actor=1), log=stop_after_four_blocks)
    logs = []
    summary = run_job(src, dst, "classify", {"model": classifier}, block_rows=300,
                      run_blocks=block_runner(actors=2, cpus_per_actor=1), log=logs.append)
    assert summary.blocks_done_before == 4 and logs[0] == "resuming: 4 of 10 blocks already done"
    assert len(logs) == 1 + 6  # the six other blocks, each once
    assert pq.read_table(dst).equals(expected)


def _map_workers() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"MapWorker(MapBatches(RayBatchPredictor))" in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_killed_actor_is_retried_without_loss_or_duplicates(cluster, classifier, job, tmp_path):
    src, expected = job
    dst = str(tmp_path / "out.parquet")
    killed = []

    def kill_one_after_the_first_block(message: str) -> None:
        if not killed and message.startswith("block "):
            workers = _map_workers()
            assert workers, "no Ray Data actor process found"
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    run_job(src, dst, "classify", {"model": classifier}, block_rows=100,
            run_blocks=block_runner(actors=2, cpus_per_actor=1), log=kill_one_after_the_first_block)
    assert killed
    out = pq.read_table(dst)
    assert sorted(out["ticket"].to_pylist()) == list(range(N_TEXTS))  # every row once
    assert out.equals(expected)


def test_map_texts_on_a_ray_dataset(cluster, classifier, job):
    src, expected = job
    ds = ray.data.read_parquet(src)  # read tasks take a CPU too: one actor leaves them one of the two
    out = map_texts(ds, classifier, "classify", actors=1, cpus_per_actor=1, batch_size=200)
    got = pa.concat_tables(list(out.iter_batches(batch_format="pyarrow", batch_size=None))).sort_by("ticket")
    assert got.equals(expected)


def test_serve_app_builder_arguments():
    """`serve run glm4rt.integrations.ray:app key=value ...` gets strings: numbers are parsed."""
    application = app({"model": "some/dir", "replicas": "3", "cpus_per_replica": "2", "parallel": "2",
                       "ctx": "512", "api_key": "k"})
    deployment = application._bound_deployment
    assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_cpus"] == 2.0
    assert deployment.max_ongoing_requests == 2 + 64
    assert application._bound_deployment.init_args == ("some/dir",)
    assert deployment.init_kwargs == {"parallel": 2, "ctx": 512, "api_key": "k"}
    with pytest.raises(ValueError, match="model="):
        app({"replicas": "2"})
    scaled = serve_app("some/dir", autoscaling_config={"min_replicas": 1, "max_replicas": 8})._bound_deployment
    assert (scaled._deployment_config.autoscaling_config.min_replicas,
            scaled._deployment_config.autoscaling_config.max_replicas) == (1, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_replicas_answer_the_openai_client(cluster, tmp_path):
    openai = pytest.importorskip("openai", reason="the Serve test needs the openai client (test extra)")
    from ray import serve

    checkpoint = build_chat_checkpoint(str(tmp_path / "chat"))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(serve_app(checkpoint, replicas=2, cpus_per_replica=1, parallel=2, ctx=256,
                            served_model_name="tiny-glm4", api_key="k"), name="glm4rt", route_prefix="/")
        status = serve.status().applications["glm4rt"].deployments["glm4rt"]
        assert status.replica_states.get("RUNNING") == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-glm4"]
        model = glm4rt.Glm4ForCausalLM.from_pretrained(checkpoint)
        tok = glm4rt.Glm4Tokenizer.from_pretrained(checkpoint)
        for i, text in enumerate(texts(4, seed=12, longest=8)):
            messages = [{"role": "user", "content": text or "hi"}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            with glm4rt.batch_invariant():
                ids = model.generate(np.array([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
            want = tok.decode(ids, skip_special_tokens=True)
            if i % 2:
                stream = client.chat.completions.create(model="tiny-glm4", messages=messages, max_tokens=10,
                                                        temperature=0, stream=True)
                got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                reply = client.chat.completions.create(model="tiny-glm4", messages=messages, max_tokens=10,
                                                       temperature=0)
                got = reply.choices[0].message.content
                assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 10
            assert got == want
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny-glm4", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        serve.shutdown()
        time.sleep(0.5)
