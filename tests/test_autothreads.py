"""The load-following decode thread count (glm4rt/autothreads.py): the tuner's choices on
simulated step times, the load meter on a written /proc/stat and on a real busy process, the per
calling thread kernel cap, and its use around a model's decode steps."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import glm4rt
from glm4rt import autothreads, ops
from glm4rt.autothreads import DecodeThreads, LoadMeter

from conftest import fixture_dir


class FixedMeter:
    def __init__(self, value):
        self.value = value

    def others(self):
        return self.value


def run_steps(tuner, step_time, n):
    """n decode steps whose time is step_time(threads); the thread counts used."""
    used = []
    for _ in range(n):
        t = tuner.next_threads()
        used.append(t)
        tuner.record(t, step_time(t))
    return used


def test_tuner_moves_to_the_faster_thread_count_and_stays():
    tuner = DecodeThreads(2, FixedMeter(1.0))  # one CPU busy elsewhere
    used = run_steps(tuner, {1: 0.038, 2: 0.042}.get, 400)
    assert tuner.current == 1
    assert used[:autothreads.MIN_INTERVAL - 1] == [2] * (autothreads.MIN_INTERVAL - 1)
    # after the switch, probes of 2 threads are rare: their interval doubles up to MAX_INTERVAL
    assert used[100:].count(2) <= 3 * autothreads.PROBE_ROUNDS
    assert tuner.interval == autothreads.MAX_INTERVAL


def test_tuner_keeps_the_default_when_it_is_fastest():
    tuner = DecodeThreads(2, FixedMeter(1.0))
    used = run_steps(tuner, {1: 0.045, 2: 0.030}.get, 600)
    assert tuner.current == 2 and used[-1] == 2
    assert used.count(1) <= 5 * autothreads.PROBE_ROUNDS  # probes at 16, 48, 112, 240, 496


def test_tuner_ignores_a_gain_within_the_noise_margin():
    tuner = DecodeThreads(2, FixedMeter(1.0))
    run_steps(tuner, {1: 0.0395, 2: 0.040}.get, 100)  # 1.25% faster: not enough
    assert tuner.current == 2


def test_bursts_of_load_do_not_make_the_slower_count_win():
    """Steps of 1 thread take 45 ms, of 2 threads 30 ms; 40% of the steps, at random, are slowed
    3x by another program. Medians over a probe would often favour 1 thread; the rule that the
    candidate must beat current's step next to it in most rounds keeps 2 nearly always."""
    rng = np.random.default_rng(0)
    tuner = DecodeThreads(2, FixedMeter(1.0))
    used = run_steps(tuner, lambda t: {1: 0.045, 2: 0.030}[t] * (3 if rng.random() < 0.4 else 1), 5000)
    assert used.count(1) / len(used) < 0.03


def test_tuner_climbs_to_the_best_of_many_counts_and_follows_a_change():
    tuner = DecodeThreads(8, FixedMeter(3.0))
    run_steps(tuner, lambda t: 1.0 + abs(t - 5) * 0.1, 400)
    assert tuner.current == 5
    run_steps(tuner, lambda t: 1.0 + abs(t - 7) * 0.1, 1200)  # the load eased
    assert tuner.current == 7


def test_idle_machine_runs_every_thread_without_probes():
    meter = FixedMeter(0.0)
    tuner = DecodeThreads(2, meter)
    used = run_steps(tuner, {1: 0.010, 2: 0.050}.get, 300)  # 1 would be faster, but no probe runs
    assert used == [2] * 300
    meter.value = 1.0  # another program starts: a probe follows within one meter reading
    used = run_steps(tuner, {1: 0.010, 2: 0.050}.get, autothreads.METER_STEPS + 2 * autothreads.PROBE_ROUNDS)
    assert tuner.current == 1 and used[-1] == 1
    meter.value = 0.1  # it ended: every thread again at the next reading, without a probe
    used = run_steps(tuner, {1: 0.010, 2: 0.050}.get, autothreads.METER_STEPS + 1)
    assert tuner.current == 2 and used[-1] == 2


def test_a_change_of_load_probes_at_once():
    """Half a CPU more (or less) used by others starts a probe at the next reading, however long
    the interval between probes had grown."""
    meter = FixedMeter(0.6)  # loaded, with 2 threads the faster
    tuner = DecodeThreads(2, meter)
    run_steps(tuner, {1: 0.045, 2: 0.030}.get, 600)
    assert tuner.current == 2 and tuner.interval == autothreads.MAX_INTERVAL
    meter.value = 1.6  # one more CPU busy elsewhere: now 1 thread is faster
    run_steps(tuner, {1: 0.040, 2: 0.050}.get, autothreads.METER_STEPS + 2 * autothreads.PROBE_ROUNDS)
    assert tuner.current == 1


def test_unknown_load_probes():
    tuner = DecodeThreads(2, FixedMeter(None))  # no /proc/stat: measure instead
    run_steps(tuner, {1: 0.038, 2: 0.042}.get, 100)
    assert tuner.current == 1


def write_stat(path, per_cpu):
    """A /proc/stat with per-CPU (user, system, idle, steal) ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for i, (user, system, idle, steal) in enumerate(per_cpu):
        lines.append(f"cpu{i} {user} 0 {system} {idle} 7 0 0 {steal} 0 0")
    lines.append("intr 12345 0 0")
    path.write_text("\n".join(lines) + "\n")


def test_load_meter_subtracts_our_own_cpu_time(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    clock, own = [100.0], [5.0]
    monkeypatch.setattr(autothreads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(autothreads.os, "times", lambda: type("T", (), {"user": own[0], "system": 0.0})())
    monkeypatch.setattr(autothreads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(autothreads.os, "sysconf", lambda name: 100)
    write_stat(stat, [(1000, 0, 5000, 0), (2000, 0, 4000, 0), (9999, 0, 0, 0)])  # cpu2: not ours
    meter = LoadMeter(str(stat))
    # 2 s later: cpu0 busy 150 ticks + 10 steal, cpu1 busy 250; we used 1.0 s; cpu2 ran 200 ticks
    clock[0], own[0] = 102.0, 6.0
    write_stat(stat, [(1100, 50, 5040, 10), (2250, 0, 4150, 0), (10199, 0, 0, 0)])
    assert meter.others() == pytest.approx((4.1 - 1.0) / 2.0)
    clock[0], own[0] = 103.0, 7.0  # only our own time since: no others
    write_stat(stat, [(1150, 50, 5090, 10), (2300, 0, 4200, 0), (10199, 0, 0, 0)])
    assert meter.others() == pytest.approx(0.0)


def test_load_meter_without_proc_stat(tmp_path):
    assert LoadMeter(str(tmp_path / "missing")).others() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat (Linux)")
def test_load_meter_sees_a_busy_process():
    meter = LoadMeter()
    code = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        meter.others()
        time.sleep(1.0)
        assert meter.others() > 0.6
    finally:
        busy.kill()
        busy.wait()


def test_thread_cap_is_per_calling_thread_and_default_tracks_set_num_threads():
    before = ops.num_threads_is_default()
    assert before, "glm4rt must start with the default thread count (GLM4RT_NUM_THREADS unset in tests)"
    n = ops.get_num_threads()
    seen = {}

    def other():
        seen["other"] = ops.get_num_threads()

    ops.set_thread_cap(1)
    try:
        assert ops.get_num_threads() == 1
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["other"] == n
        ops.set_thread_cap(n + 5)  # a cap above the count changes nothing
        assert ops.get_num_threads() == n
    finally:
        ops.set_thread_cap(0)
    glm4rt.set_num_threads(1)
    try:
        assert not ops.num_threads_is_default()
    finally:
        glm4rt.set_num_threads(None)
    assert ops.num_threads_is_default() and ops.get_num_threads() == n


def test_decode_steps_run_with_the_tuned_count_and_the_same_logits(monkeypatch):
    """Single-token forwards go through the tuner (with the default thread count only); the
    logits do not depend on the thread count."""
    n = ops.get_num_threads()
    if n < 2:
        pytest.skip("one CPU: no thread count to choose")
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa1_official"))
    counts = []
    real_attention = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: (counts.append(ops.get_num_threads()),
                                                          real_attention(*a, **k))[1])
    monkeypatch.setattr(autothreads._local, "tuner", DecodeThreads(n, FixedMeter(1.0)), raising=False)
    tuner = autothreads._local.tuner
    tuner.current = 1  # as if a probe had found 1 thread faster
    ids = np.array([[3, 1, 4, 1, 5]])
    cache = glm4rt.Glm4Cache.for_config(model.config, 1, 16)
    model(ids, past_key_values=cache, use_cache=True)  # prefill: all threads
    prefill_counts, counts[:] = list(counts), []
    step = model(np.array([[9]]), past_key_values=cache, use_cache=True).logits
    assert prefill_counts == [n] * model.config.num_hidden_layers
    assert counts == [1] * model.config.num_hidden_layers
    assert ops.get_num_threads() == n  # the cap ends with the step
    full = model(np.array([[3, 1, 4, 1, 5, 9]])).logits[:, -1:]
    np.testing.assert_allclose(step, full, rtol=1e-5, atol=1e-5)

    glm4rt.set_num_threads(n)  # a count the user chose is used as given
    try:
        counts[:] = []
        cache.crop(5)
        explicit = model(np.array([[9]]), past_key_values=cache, use_cache=True).logits
        assert counts == [n] * model.config.num_hidden_layers
        np.testing.assert_array_equal(explicit, step)
    finally:
        glm4rt.set_num_threads(None)
