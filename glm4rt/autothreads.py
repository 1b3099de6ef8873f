"""Decode's thread count follows the machine's load.

A decode step is a chain of small kernels, each ending in a barrier. When another program keeps a
core busy, one of our threads is descheduled now and then and every barrier waits for it, so on a
busy machine fewer threads than CPUs can decode faster (measured on 2 cores with one kept busy:
1 thread 25.4 tok/s, 2 threads 23.6; ``benchmarks/contended.md``). Prefill's long kernels still
gain from every thread, so only single-token steps are tuned.

While the thread count is the default (``set_num_threads`` never called, or called with ``None``),
each decode step runs with ``current`` threads, and from time to time a short probe interleaves
steps at ``current`` with steps at its neighbours (``current - 1``, ``current + 1``); a neighbour
that is clearly faster, step next to step, becomes ``current``. The time between probes doubles
while nothing changes. On Linux, the CPU time other processes used (``/proc/stat`` minus our own,
read every 16 steps) tells whether the machine is idle: then the default thread count is used and
no probe runs, so an idle machine decodes at full speed; when the load changes, a probe runs at
once.
The state is per calling thread (and the kernel thread cap set with it), so concurrent generations
each tune their own steps.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from . import ops

METER_STEPS = 16         # decode steps between readings of the machine's load
MIN_INTERVAL = 16        # decode steps between probes at first and after a change ...
MAX_INTERVAL = 256       # ... doubling up to this while nothing changes
PROBE_ROUNDS = 5         # each probe runs every candidate this many times, interleaved
MIN_GAIN = 0.97          # a neighbour must take at most 97% of current's median step time ...
MIN_WINS = 4             # ... and beat current's step next to it in this many rounds (a burst of
                         # load elsewhere slows both steps of a round, so it cannot make a slower
                         # count win the rounds, where it could move a median)
IDLE_OTHERS_CPUS = 0.25  # other processes using less than this many CPUs = an idle machine
LOAD_CHANGE_CPUS = 0.5   # a change of the others' use by this many CPUs: probe at once

log = logging.getLogger(__name__)  # each probe's result at DEBUG level


class LoadMeter:
    """CPU time used by other processes on our CPUs, in CPUs, since the previous reading (Linux)."""

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self.stat_path = stat_path
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = None
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    def _busy_seconds(self) -> Optional[float]:
        """Busy (non-idle, non-iowait) time of our CPUs since boot, steal included, in seconds."""
        try:
            with open(self.stat_path, encoding="ascii") as f:
                lines = f.readlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or (self.cpus is not None and name not in self.cpus):
                continue
            fields = [int(v) for v in rest.split()]
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            busy += sum(fields[:8]) - fields[3] - fields[4]
        return busy / self.tick

    def _sample(self) -> Optional[tuple[float, float, float]]:
        busy = self._busy_seconds()
        if busy is None:
            return None
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def others(self) -> Optional[float]:
        """CPUs the other processes kept busy since the last call; None where unknown."""
        now = self._sample()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] <= 0.05:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


class DecodeThreads:
    """Chooses the thread count of each decode step (see the module docstring)."""

    def __init__(self, n_max: int, meter: Optional[LoadMeter] = None) -> None:
        self.n_max = n_max
        self.current = n_max
        self.interval = MIN_INTERVAL
        self.countdown = MIN_INTERVAL
        self.plan: list[int] = []               # thread counts of the probe's remaining steps
        self.times: dict[int, list[float]] = {}  # probe step times per thread count
        self.meter = meter
        self.until_meter = METER_STEPS
        self.others: Optional[float] = None  # the last reading, in CPUs (None: unknown)

    @property
    def idle(self) -> bool:
        """The last reading found no other program keeping a CPU busy."""
        return self.others is not None and self.others < IDLE_OTHERS_CPUS

    def next_threads(self) -> int:
        """Threads for the next step."""
        if not self.plan:
            self.until_meter -= 1
            if self.until_meter <= 0:
                self._read_meter()
            self.countdown -= 1
            if self.countdown <= 0 and not self.idle:
                self._start_probe()
        return self.plan[0] if self.plan else self.current

    def _read_meter(self) -> None:
        self.until_meter = METER_STEPS
        before, was_idle = self.others, self.idle
        self.others = self.meter.others() if self.meter is not None else None
        if self.idle and not was_idle:  # every CPU is ours again: the default thread count is right
            self.current = self.n_max
            log.debug("others use %.2f CPUs: idle, %d threads", self.others, self.current)
        elif not self.idle and (was_idle or self.others is not None and before is not None
                                and abs(self.others - before) >= LOAD_CHANGE_CPUS):
            self.interval, self.countdown = MIN_INTERVAL, 0  # the load changed: probe now
            log.debug("others use %s CPUs: probing", self.others)

    def record(self, threads: int, seconds: float) -> None:
        """The step just run with ``threads`` took ``seconds``."""
        if self.plan and self.plan[0] == threads:
            self.plan.pop(0)
            self.times.setdefault(threads, []).append(seconds)
            if not self.plan:
                self._decide()

    def _start_probe(self) -> None:
        candidates = [c for c in (self.current, self.current - 1, self.current + 1) if 1 <= c <= self.n_max]
        # rounds in alternating order, so that no count is always first after current's step
        self.plan = [c for i in range(PROBE_ROUNDS) for c in (candidates if i % 2 == 0 else candidates[::-1])]
        self.times = {}

    def _decide(self) -> None:
        medians = {c: sorted(ts)[len(ts) // 2] for c, ts in self.times.items()}
        mine = self.times[self.current]
        better = [c for c, ts in self.times.items() if c != self.current
                  and sum(t < m for t, m in zip(ts, mine)) >= MIN_WINS
                  and medians[c] <= MIN_GAIN * medians[self.current]]
        log.debug("probe: median ms per step %s", {c: round(1e3 * t, 2) for c, t in sorted(medians.items())})
        if better:
            self.current, self.interval = min(better, key=medians.get), MIN_INTERVAL
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)
        self.countdown = self.interval
        log.debug("%d threads, next probe in %d steps", self.current, self.interval)


_local = threading.local()


def _tuner() -> Optional[DecodeThreads]:
    """This thread's tuner, or None when the user chose the thread count or there is one CPU."""
    if not ops.num_threads_is_default():
        return None
    n_max = ops.get_num_threads()  # uncapped: decode_step lifts its cap when the step ends
    if n_max <= 1:
        return None
    tuner = getattr(_local, "tuner", None)
    if tuner is None or tuner.n_max != n_max:
        tuner = _local.tuner = DecodeThreads(n_max, LoadMeter())
    return tuner


@contextmanager
def decode_step() -> Iterator[None]:
    """Run one decode step (a single-token forward) with the thread count the tuner picks."""
    tuner = _tuner()
    if tuner is None:
        yield
        return
    threads = tuner.next_threads()
    ops.set_thread_cap(threads)
    start = time.perf_counter()
    try:
        yield
    finally:
        ops.set_thread_cap(0)
    tuner.record(threads, time.perf_counter() - start)
