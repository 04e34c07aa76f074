"""The memory a run needs (mistral/memory.py)."""
import torch
from helpers import SIX_EXPERTS as MOE, tiny_params

from mistral.memory import Memory
from mistral.model import ModelArgs, Transformer


def test_grouping_is_counted_in_the_memory_a_run_needs():
    """Stacking holds one kind of a layer's expert weights twice for a moment (E * hidden * dim), and grouped
    pre-fill runs K FFN rows a token: with a stack larger than the work space, the need grows by the difference."""
    params = tiny_params(dim=512, hidden_dim=8192, **MOE)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict(params))
    plain = Memory.of(model, torch.bfloat16, 0, 4)
    grouped_ = Memory.of(model, torch.bfloat16, 0, 4, grouped=True)
    assert grouped_.weights == plain.weights and grouped_.work == 6 * 8192 * 512 * 2 > plain.work


def _files(root, files: dict) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_memory_limit_is_the_one_that_applies_to_this_process(tmp_path):
    """Only a cgroup v2 limit at the root was read: a limit on a cgroup above this process's (systemd-run --scope -p
    MemoryMax=) or a cgroup v1 one (older Docker) was missed, so a capped run passed the check and was killed."""
    from mistral.memory import cgroup_room

    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    # v2, nested: the limit sits one level above the process's cgroup, which has none of its own.
    _files(root, {"cgroup.controllers": "memory", "memory.max": "max", "memory.current": "5",
                  "user.slice/memory.max": "1000", "user.slice/memory.current": "100",
                  "user.slice/run-u7.scope/memory.max": "max", "user.slice/run-u7.scope/memory.current": "40"})
    proc.write_text("0::/user.slice/run-u7.scope\n")
    assert cgroup_room(proc, root) == 900
    # v1: the memory controller's files, the limit on the process's own cgroup, none at the root (a huge number).
    root = tmp_path / "v1"
    _files(root, {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "7",
                  "memory/docker/abc/memory.limit_in_bytes": "5000", "memory/docker/abc/memory.usage_in_bytes": "1000"})
    proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_room(proc, root) == 4000
    # Both the process's and a parent's limit: the tighter one counts.
    _files(root, {"memory/docker/memory.limit_in_bytes": "3000", "memory/docker/memory.usage_in_bytes": "2500"})
    assert cgroup_room(proc, root) == 500
    # No cgroup files to read (not Linux, or none mounted): no limit.
    assert cgroup_room(tmp_path / "absent", root) == 1 << 62
