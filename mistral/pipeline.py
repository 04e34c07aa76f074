"""Pipeline parallelism: the model's layers split over torchrun ranks, one process each.

Which layers a rank builds is the model's (model.pipeline_layers), and so is the hand-over of the residual stream
between ranks in its forward. Everything else distributed lives here: the process group's set-up, each rank's GPU,
and the end of every step, where the last rank, which alone has the logits, tells every rank what it picked or
that some rank failed.
"""
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from mistral.cache import RotatingBufferCache
from mistral.errors import MistralError
from mistral.model import Transformer

# If a pipeline rank dies, the others give up after this long instead of waiting forever.
TIMEOUT = timedelta(minutes=5)


def init(num_pipeline_ranks: int, device: str) -> None:
    """Check --num_pipeline_ranks against the processes torchrun started (WORLD_SIZE), and join the process group
    where there are several."""
    if not isinstance(num_pipeline_ranks, int) or isinstance(num_pipeline_ranks, bool) or num_pipeline_ranks < 1:
        raise MistralError(f"num_pipeline_ranks must be a whole number >= 1, got {num_pipeline_ranks!r}")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and not world.isdigit():
        raise MistralError(f"WORLD_SIZE is {world!r}, not a number of processes: leave it to torchrun, or unset it")
    if num_pipeline_ranks == 1:
        if world not in (None, "1"):
            raise MistralError(f"torchrun started {world} processes but --num_pipeline_ranks is 1, so each would run "
                               f"the whole model and print it all: add --num_pipeline_ranks {world}, or run without "
                               "torchrun")
        return
    if world is None:
        raise MistralError(f"--num_pipeline_ranks {num_pipeline_ranks} needs one process per rank: run "
                           f"torchrun --nproc-per-node {num_pipeline_ranks} -m main ...")
    if world != str(num_pipeline_ranks):
        raise MistralError(f"--num_pipeline_ranks {num_pipeline_ranks} but torchrun started {world} processes; make "
                           "--nproc-per-node and --num_pipeline_ranks equal")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)


def pipeline_rank(num_pipeline_ranks: int) -> int:
    """This process's rank, after checking that the process group has exactly num_pipeline_ranks ranks."""
    if not dist.is_initialized():
        raise MistralError(f"num_pipeline_ranks={num_pipeline_ranks} needs one process per rank: "
                           f"run under torchrun --nproc-per-node {num_pipeline_ranks}")
    if dist.get_world_size() != num_pipeline_ranks:
        raise MistralError(f"num_pipeline_ranks={num_pipeline_ranks} but torchrun started {dist.get_world_size()} "
                           "processes; make --nproc-per-node and --num_pipeline_ranks equal")
    return dist.get_rank()


def rank_gpu(device: torch.device, rank: int) -> torch.device:
    """The GPU of this pipeline rank: cuda:N when the caller named one, else cuda:LOCAL_RANK, the variable torchrun
    sets. Whoever called init_process_group may not have chosen a GPU, and then every rank would land on cuda:0.
    The GPU is made current too, so that what the caller allocates on "cuda", and NCCL's barrier, go there."""
    if device.index is None:
        local = os.environ.get("LOCAL_RANK")
        if local is None or not local.isdigit():
            raise MistralError(f"pipeline rank {rank} on CUDA needs its own GPU: set LOCAL_RANK (torchrun "
                               "does) or pass device='cuda:N'")
        device = torch.device("cuda", int(local))
    if device.index >= torch.cuda.device_count():
        raise MistralError(f"pipeline rank {rank} was given {device} but this machine has "
                           f"{torch.cuda.device_count()} GPUs: run at most that many ranks per machine")
    torch.cuda.set_device(device)
    return device


def forward(model: Transformer, ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache,
            rows: list[int] | None) -> torch.Tensor | None:
    """model(ids, seqlens, cache, rows=rows) on one pipeline rank, telling the next rank if this one fails.

    The next rank is waiting for this one's output. On a failure it gets NaN, not nothing, so that it reaches the end
    of the step, where last_rank_pick tells every rank which one failed, instead of waiting out the timeout. (Every
    rank then raises from the step, and generate_ids puts each rank's cache back as it was before it.) A mistake in
    the step's inputs is found by every rank alike, before anything is sent, and is raised as it is.
    """
    step = model.prepare(ids, seqlens, cache, rows)
    try:
        return model.run(step)
    except Exception:
        if not model.is_last:
            nan = torch.full((ids.shape[0], model.args.dim), float("nan"), device=model.device, dtype=model.dtype)
            dist.send(nan, dst=model.pipeline_rank + 1)
        raise


def last_rank_pick(model: Transformer, pick: Callable[[], tuple[torch.Tensor, torch.Tensor]], n: int,
                   failure: Exception | None = None) -> tuple[list[int], list[float]]:
    """Pipeline ranks, at the end of every step: the last rank, which alone has the logits, picks the step's n
    tokens, and every rank gets them, or learns that some rank failed in the step (`failure`: this one's).

    Only the last rank samples, so ranks cannot disagree, whatever their RNGs do (CUDA's need not agree across GPU
    models). What goes over the process group is one (2, n + R) float64 tensor for R ranks, summed over them: the
    last rank's tokens (exact in float64) and their log-probabilities, then a flag per rank, 1 where it failed. The
    first rank that failed then sends its error, and every rank raises, none left waiting for a step that will not
    come: the one that failed its own error, the others a MistralError where that was a user's mistake, else a
    DistError, which says a rank failed on something other than the user's input.
    """
    R, rank = model.num_pipeline_ranks, model.pipeline_rank
    box = torch.zeros(2, n + R, dtype=torch.float64, device=model.device)  # [tokens, failed], [logprobs, unused]
    if model.is_last and failure is None and n:
        try:
            tokens, lps = pick()
            box[0, :n], box[1, :n] = tokens, lps
        except Exception as e:
            failure = e
    if failure is not None:
        box[0, n + rank] = 1
    dist.all_reduce(box)
    picked, scores = box.tolist()
    tokens, failed, lps = picked[:n], picked[n:], scores[:n]
    if any(failed):
        first = failed.index(1)
        why = [(isinstance(failure, MistralError), str(failure), type(failure).__name__) if rank == first else None]
        dist.broadcast_object_list(why, src=first)
        if failure is not None:
            raise failure
        user_error, message, kind = why[0]
        if user_error:
            raise MistralError(message)
        raise dist.DistError(f"pipeline rank {first} stopped on {kind}: {message}")
    return [int(t) for t in tokens], lps
