"""How many threads the CPU engine's decode steps use: all of torch's, or one, whichever has been faster lately.

The C kernels split each product of a step between the threads and meet at a barrier after it, dozens of times a
step. On a machine where another process keeps a core busy, the thread that shares its core is descheduled for a
scheduler slice now and then, and every barrier waits for it: a decode step then takes several times, up to 60
times, what it takes on one thread (bench/contention.py measures it). A step on one thread waits for nobody.

So the engine times its decode steps with each count and keeps the faster one. Now and then it tries the other
again, for a few steps, and then waits before the next try until the chosen count has run WAIT_FACTOR times as long
as that try will take, or LONGEST_WAIT_MS if that is shorter but still LEAST_FACTOR times the try: the watching
costs 1 / WAIT_FACTOR to 1 / LEAST_FACTOR of the time, and a change of load is followed within a few seconds (within
LEAST_FACTOR tries' time for a model whose steps take a second).

The first count is a guess from what the kernel says runs now: if other processes' runnable threads and ours would not
fit the CPUs (/proc/stat's procs_running, less our own threads that run), the engine starts on one thread and tries
all of them only after LONGEST_WAIT_MS and LEAST_FACTOR tries' steps; otherwise it starts on all of them. A wrong
guess costs that wait at most. A try whose first counted step is no faster than the chosen count ends there.
"""
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

FIRST_TRY = 1  # steps of the first count (all threads) before the first try of the other
PROBE_STEPS = 3  # steps a try lasts: the first may pay for waking threads, and is not counted
WAIT_FACTOR = 50  # between tries, the chosen count runs this many times as long as the next try will take ...
LONGEST_WAIT_MS = 5000  # ... but no longer than this, so that a change of load is followed within seconds ...
LEAST_FACTOR = 20  # ... unless that is under this many times the try: a large model's try can take seconds
MARGIN = 0.95  # the other count must be this much faster to take over: noise alone does not switch
READINGS = 5  # of the threads that run now, 1 ms apart, for the first guess: a busy process runs in every one


def _running_here() -> int:
    """Threads of this process that are running or runnable now."""
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:  # the thread has ended
            continue
        running += stat[stat.rindex(")") + 2] == "R"
    return running


def looks_busy(threads: int) -> bool:
    """Whether `threads` more threads would share a CPU with another process's now: the fewest other runnable
    threads over READINGS readings (one can catch a passing thread), plus `threads`, exceed the CPUs. False where
    /proc cannot say."""
    try:
        others = []
        for reading in range(READINGS):
            time.sleep(0.001 * (reading > 0))
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
            total = next(int(line.split()[1]) for line in lines if line.startswith("procs_running"))
            others.append(total - _running_here())
        cpus = sum(line[:3] == "cpu" and line[3].isdigit() for line in lines)
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return min(others) + threads > (cpus or os.cpu_count() or 1)


class ThreadChoice:
    """The thread count of one model's decode steps, learned from their times (ms per step, smoothed)."""

    def __init__(self, most: int, clock: Callable[[], float] = time.perf_counter,
                 busy: Callable[[int], bool] = looks_busy):
        self.counts = (most, 1) if most > 1 else (1,)
        self.current = most
        self.busy, self.guessed = busy, False  # the first count is guessed at the first step, from busy(most)
        self.ms = {n: None for n in self.counts}  # recent ms per step with each count: None until timed
        self.steps_left, self.ms_left = FIRST_TRY, 0.0  # of the chosen count before the next try of the other
        self.probing = 0  # steps of a try still to run
        self.tried: list[float] = []
        self.clock = clock

    @contextmanager
    def chosen(self) -> Iterator[None]:
        """Within: torch (and so the kernels, which share its OpenMP runtime) has the chosen number of threads. The
        block is one decode step, the picking of its tokens included; its time is recorded unless it raises."""
        if len(self.counts) == 1:
            yield
            return
        n = self._count()
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        start = self.clock()
        try:
            yield
        finally:
            torch.set_num_threads(before)
        self._record(n, (self.clock() - start) * 1e3)

    def _other(self) -> int:
        return self.counts[1] if self.current == self.counts[0] else self.counts[0]

    def _count(self) -> int:
        if not self.guessed:
            self.guessed = True
            if self.busy(self.current):  # start on one thread, and try all of them after the longest wait
                self.current, self.ms_left, self.steps_left = 1, LONGEST_WAIT_MS, LEAST_FACTOR * PROBE_STEPS
        if not self.probing and self.steps_left <= 0 and self.ms_left <= 0:
            self.probing, self.tried = PROBE_STEPS, []
        return self._other() if self.probing else self.current

    def _record(self, n: int, ms: float) -> None:
        if n == self.current:
            old = self.ms[n]
            self.ms[n] = ms if old is None else 0.7 * old + 0.3 * ms
            self.steps_left, self.ms_left = self.steps_left - 1, self.ms_left - ms
            return
        self.tried.append(ms)
        self.probing -= 1
        if len(self.tried) > 1 and ms >= self.ms[self.current]:
            self.probing = 0  # no faster at all: the try ends here, a step early
        if self.probing:
            return
        mean = sum(self.tried[1:]) / len(self.tried[1:])  # the first step of a try may pay for waking threads
        self.ms[n] = mean
        if self.ms[self.current] is not None and mean < MARGIN * self.ms[self.current]:
            self.current = n  # the other is faster now: it becomes the choice
        # The next try costs PROBE_STEPS steps of the count not chosen: wait WAIT_FACTOR times that.
        self.steps_left = PROBE_STEPS
        cost = PROBE_STEPS * self.ms[self._other()]
        self.ms_left = min(WAIT_FACTOR * cost, max(LONGEST_WAIT_MS, LEAST_FACTOR * cost))


_choices: "weakref.WeakKeyDictionary[torch.nn.Module, ThreadChoice]" = weakref.WeakKeyDictionary()


def choice_for(model: torch.nn.Module) -> ThreadChoice:
    """The model's ThreadChoice, kept across generations (a chat's turns, a server's steps) for as long as it lives."""
    if model not in _choices:
        _choices[model] = ThreadChoice(torch.get_num_threads())
    return _choices[model]
