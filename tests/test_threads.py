"""The CPU engine's thread count (mistral/cpu/threads.py): it follows whichever count decodes faster, when the other
core is busy and when it is not, and pays little for watching."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mistral.cpu import threads
from mistral.cpu.threads import LONGEST_WAIT_MS, ThreadChoice, looks_busy


def never_busy(threads: int) -> bool:
    return False


class Machine:
    """A clock on which a step's duration depends on the thread count it runs with and on whether the machine is
    busy: quiet, 2 threads take 10 ms and 1 thread 16 ms; busy, 2 threads take 60 ms (the barriers wait for the
    descheduled thread) and 1 thread 17 ms."""

    def __init__(self):
        self.now, self.busy, self.ran = 0.0, False, []

    def clock(self) -> float:
        return self.now

    def step(self):
        n = torch.get_num_threads()
        self.ran.append(n)
        self.now += {(False, 2): 10, (False, 1): 16, (True, 2): 60, (True, 1): 17}[self.busy, n] / 1e3
        return torch.zeros(1)


def run(choice: ThreadChoice, machine: Machine, steps: int) -> list[int]:
    start = len(machine.ran)
    for _ in range(steps):
        with choice.chosen():
            machine.step()
    return machine.ran[start:]


def test_the_faster_count_is_followed_as_the_load_changes():
    before = torch.get_num_threads()
    machine = Machine()
    choice = ThreadChoice(2, clock=machine.clock, busy=never_busy)
    quiet = run(choice, machine, 2000)
    assert choice.current == 2 and quiet.count(1) / len(quiet) < 0.02  # a few tries of 1 thread
    machine.busy = True
    busy = run(choice, machine, 3000)
    assert choice.current == 1
    switched = busy.index(1) if busy[-1] == 1 else None
    assert switched is not None and switched <= 300  # noticed within 50 times a try's 48 ms: 240 steps of 10 ms
    tail = busy[switched + 100:]
    # The tries of 2 threads cost < 5% of the time: 3 steps of 60 ms at most every LONGEST_WAIT_MS (5 s).
    assert tail.count(2) * 60 / (tail.count(2) * 60 + tail.count(1) * 17) < 0.05
    machine.busy = False
    again = run(choice, machine, 2000)
    assert choice.current == 2 and again.index(2) < 600 and again[-500:].count(1) < 10
    assert torch.get_num_threads() == before  # each step's count is put back after it


def test_one_thread_has_nothing_to_choose():
    machine = Machine()
    choice = ThreadChoice(1, clock=machine.clock, busy=never_busy)
    assert set(run(choice, machine, 50)) == {torch.get_num_threads()}


def test_a_model_keeps_its_choice_across_generations():
    model = torch.nn.Linear(2, 2)
    assert threads.choice_for(model) is threads.choice_for(model)
    assert threads.choice_for(torch.nn.Linear(2, 2)) is not threads.choice_for(model)


def test_a_machine_that_looks_busy_starts_on_one_thread_and_tries_all_later():
    machine = Machine()
    machine.busy = True
    choice = ThreadChoice(2, clock=machine.clock, busy=lambda threads: True)
    ran = run(choice, machine, 400)
    first_try = ran.index(2)
    # The try ends after its first counted step, which is no faster.
    assert first_try * 17 >= LONGEST_WAIT_MS and ran[first_try:first_try + 3] == [2, 2, 1] and choice.current == 1
    # A wrong guess (the machine is quiet after all) costs one wait: then all threads are chosen.
    machine = Machine()
    choice = ThreadChoice(2, clock=machine.clock, busy=lambda threads: True)
    ran = run(choice, machine, 1000)
    assert ran[0] == 1 and choice.current == 2 and ran.index(2) * 16 < LONGEST_WAIT_MS + 100


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")
def test_a_spinning_process_makes_the_machine_look_busy():
    cpus = os.cpu_count()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert looks_busy(cpus)  # the spinner is always runnable, and our cpus threads would not fit beside it
    finally:
        spinner.kill()
        spinner.wait()
