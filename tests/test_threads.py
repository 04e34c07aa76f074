"""The CPU engine's thread count (mistral/cpu/threads.py): it follows whichever count decodes faster, when the other
core is busy and when it is not, and pays little for watching."""
import torch

from mistral.cpu import threads
from mistral.cpu.threads import ThreadChoice


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
    choice = ThreadChoice(2, clock=machine.clock)
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
    choice = ThreadChoice(1, clock=machine.clock)
    assert set(run(choice, machine, 50)) == {torch.get_num_threads()}


def test_a_model_keeps_its_choice_across_generations():
    model = torch.nn.Linear(2, 2)
    assert threads.choice_for(model) is threads.choice_for(model)
    assert threads.choice_for(torch.nn.Linear(2, 2)) is not threads.choice_for(model)
