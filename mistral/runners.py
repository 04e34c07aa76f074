"""The one place that decides what runs a step.

A step is packed token ids, their seqlens, the cache and the rows whose logits are wanted. Three things can run it,
tried in this order, each declining (None) what it does not take:

    compiled    a decode step that every row of its cache takes part in (mistral/compiled.py, CUDA graphs)
    cpu         the CPU engine (mistral/cpu): a decode step in one C call, on one thread or all of them, whichever
                has been faster lately (mistral/cpu/threads.py)
    eager       the model's own forward, which takes everything

Whichever runs it, int8 and int4 weights compute the same products (mistral/quantize.py): on a CPU in C, by the
engine or by the modules mistral/cpu/linears.py put in the model's place when the engine is built (CpuDecoder.of).

Under pipeline ranks the eager forward is wrapped by mistral/pipeline.py, which tells the next rank of a failure.
"""
import contextlib

import torch

from mistral import pipeline
from mistral.cache import RotatingBufferCache
from mistral.compiled import CompiledDecoder
from mistral.cpu import CpuDecoder, threads
from mistral.model import Transformer


class Runner:
    """Runs the steps of one generation on `model`: built for it, as the CPU engine gathers the weights once (a weight
    replaced later needs a new runner)."""

    def __init__(self, model: Transformer, engine: bool = True, compiled: CompiledDecoder | None = None):
        """engine=False runs every step on the model, in torch. compiled: the decode steps every row of its cache
        takes run as its one compiled graph, the others as without it."""
        self.model, self.compiled = model, compiled
        self.cpu = CpuDecoder.of(model) if engine else None
        self.threads_choice = threads.choice_for(model) if self.cpu is not None else None

    def step(self, ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache,
             rows: list[int] | None) -> tuple[torch.Tensor | None, Exception | None]:
        """(logits (R, V) of `rows`, or None on a pipeline rank without the head; the exception this rank failed on,
        under pipeline ranks, where every rank must hear of it before any raises: None elsewhere, where it is
        raised)."""
        for runner in (self.compiled, self.cpu):
            logits = runner.step(ids, seqlens, cache, rows) if runner is not None else None
            if logits is not None:
                return logits, None
        if self.model.num_pipeline_ranks == 1:
            return self.model(ids, seqlens, cache, rows=rows), None
        try:
            return pipeline.forward(self.model, ids, seqlens, cache, rows), None
        except Exception as e:
            return None, e

    def threads(self, seqlens: list[int]) -> contextlib.AbstractContextManager:
        """Around a whole step, its picking included: a decode step of the CPU engine runs on one thread or all of
        them, whichever has been faster lately (mistral/cpu/threads.py); other steps as torch is set."""
        if self.threads_choice is None or not all(n <= 1 for n in seqlens):
            return contextlib.nullcontext()
        return self.threads_choice.chosen()

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's argmax and its log-softmax in one call where the CPU engine takes the logits; else None."""
        return self.cpu.greedy(logits) if self.cpu is not None else None
