"""Run under torchrun by tests/test_pipeline.py: every rank loads its slice of each model folder, runs
packed, chunked and generate passes, and saves what it saw to OUT/rank{r}.pt for the test to compare."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import PROMPTS

from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load_model
from mistral.generate import generate_ids


def recording(collective, seen: list):
    """collective, noting the shape and dtype of every tensor it sends."""
    def run(tensor, *args, **kwargs):
        seen.append((tuple(tensor.shape), tensor.dtype))
        return collective(tensor, *args, **kwargs)

    return run


def main(out: Path, folders: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    exchanged = []  # what generate summed over the ranks, over all its steps
    report = {}
    for folder in folders:
        model = load_model(folder, max_batch_size=3, num_pipeline_ranks=world, device="cpu")
        ids = torch.tensor(sum(PROMPTS, []))
        with torch.no_grad():
            packed = model(ids, [len(p) for p in PROMPTS])
            cache = RotatingBufferCache(model.n_local_layers, 3, model.args.sliding_window, model.args.n_kv_heads,
                                        model.args.head_dim)
            chunks = [model(torch.tensor(PROMPTS[0][i : i + 4]), [len(PROMPTS[0][i : i + 4])], cache)
                      for i in range(0, len(PROMPTS[0]), 4)]
            chunked = torch.cat(chunks) if model.is_last else None  # only the last rank has logits
        plain, dist.all_reduce = dist.all_reduce, recording(dist.all_reduce, exchanged)
        greedy = generate_ids(PROMPTS, model, max_tokens=12, chunk_size=5)
        # Each rank's generator would give other tokens: only the last rank's, which samples, may matter.
        seed = 7 if rank == world - 1 else 1000 + rank
        sampled = generate_ids(PROMPTS, model, max_tokens=12, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed))
        scored = generate_ids(PROMPTS, model, max_tokens=3, chunk_size=5, prompt_logprobs=True)
        dist.all_reduce = plain
        speculated = generate_ids(PROMPTS, model, max_tokens=24, speculate=4)  # rows that wrap, drafts taken back
        report[folder] = dict(params=sorted(model.state_dict()), packed=packed, chunked=chunked,
                              greedy=greedy, sampled=sampled, scored=scored, exchanged=exchanged, speculated=speculated)
    torch.save(report, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
