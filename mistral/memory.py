"""What a run needs in memory, and what is available: the loader refuses a run that cannot fit before any weight is
read (mistral/checkpoint/load.py), and generation a cache that cannot fit before any step (mistral/generate.py)."""
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral.model import Transformer


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


@dataclass(frozen=True)
class Memory:
    """Bytes a run needs: the weights as kept, the KV cache, and the largest temporaries of a forward."""

    weights: int
    cache: int
    work: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.work

    @staticmethod
    def of(model: Transformer, compute: torch.dtype, cache_slots: int, prefill_tokens: int,
           grouped: bool = False) -> "Memory":
        """For a model on the meta device, whose tensors have the dtypes they will be loaded in; grouped: its experts'
        weights will be stacked once loaded (mistral/grouped.py), which holds one stack twice for a moment."""
        args, size = model.args, compute.itemsize
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        cache = 2 * model.n_local_layers * model.max_batch_size * cache_slots * args.n_kv_heads * args.head_dim * size
        S, H, D = prefill_tokens, args.n_heads, args.head_dim
        # A pre-fill step of S tokens: the residual and the norm's output, q/k/v and attention's output, the FFN's
        # gate, up and their product (K rows a token in a mixture whose experts are grouped); SDPA's scores for a tile
        # of 256 queries; a block of weights converted for a product (mistral/quantize.py's CONVERT_BLOCK_BYTES, 8 MB,
        # counted twice over); the logits of the rows that are sampled, and their softmax. Grouping stacks one kind of
        # a layer's expert weights at a time while loading, before any forward: the larger of the two is the need.
        ffn_rows = S * (args.moe.num_experts_per_tok if grouped else 1)
        activations = (S * (2 * args.dim + (2 * H + 2 * args.n_kv_heads) * D) + ffn_rows * 3 * args.hidden_dim) * size
        scores = 256 * (256 + (args.window or S)) * H * 4
        logits = 2 * model.max_batch_size * args.vocab_size * 4
        work = activations + scores + (16 << 20) + logits
        stack = args.moe.num_experts * args.hidden_dim * args.dim * compute.itemsize if grouped else 0
        return Memory(weights, cache, max(work, stack))

    def __str__(self) -> str:
        return f"weights {gb(self.weights)}, cache {gb(self.cache)}, work space {gb(self.work)}"


def memory_available(device: torch.device) -> int:
    """Bytes a new allocation can take without the kernel killing something: MemAvailable (free memory and the
    page cache that can be dropped), or less where a cgroup (a container) caps this process; a GPU's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # not Linux: nothing to go by, so nothing is refused
    return min(free, cgroup_room())


def cgroup_room(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes the memory limits of this process's cgroups leave it: the least over its cgroup and every one above it
    (a limit set higher up, as `systemd-run --scope -p MemoryMax=` or a container sets, applies below it), in
    cgroup v2 (memory.max, memory.current) or v1 (the memory controller's memory.limit_in_bytes,
    memory.usage_in_bytes). No limit found: 2**62.

    /proc/self/cgroup names the cgroup: "0::/user.slice/run-u7.scope" (v2), or "4:memory:/docker/abc" (v1). Where
    the files are mounted as the process sees its own cgroup at the root (inside most containers), the walk finds its
    limit at the root."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return 1 << 62
    room = 1 << 62
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, at root, or at root/unified beside v1's (a hybrid set-up)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_file, used_file = "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, used_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
            folder = base.joinpath(*parts[:depth])
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 1 << 62:  # v1 writes "no limit" as a huge number
                    room = min(room, int(limit) - int((folder / used_file).read_text()))
            except (OSError, ValueError):
                continue
    return room
