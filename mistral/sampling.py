"""How the next token is picked from the logits: the options, their checks, and sample().

Every default of a sampling option is written once, here, in SamplingParams; the CLI, Chat and generate take
theirs from it.
"""
import math
from dataclasses import dataclass

import torch

from mistral.errors import MistralError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 0.8  # nucleus: sample from the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the top_k most likely tokens before top_p; 0 turns it off


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(max_tokens: int, temperature: float, top_p: float, top_k: int, chunk_size: int | None) -> None:
    """Reject generation options that make no sense, naming the option and its valid range."""
    if not _whole(max_tokens) or max_tokens < 0:
        raise MistralError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    if not _number(temperature) or not 0 <= temperature < math.inf:
        raise MistralError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise MistralError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _whole(top_k) or top_k < 0:
        raise MistralError(f"top_k must be a whole number >= 0 (0 turns it off), got {top_k!r}")
    if chunk_size is not None and (not _whole(chunk_size) or chunk_size <= 0):
        raise MistralError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (N, V) -> (N,): sample from the smallest set of tokens whose probability reaches p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    drop = before >= p
    drop[:, 0] = False  # the top token always survives, even where p rounds to 0 in fp32
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (N, 1), renormalises itself
    return torch.gather(order, -1, choice).squeeze(-1)


def is_greedy(temperature: float) -> bool:
    """Whether sample() at this temperature is greedy: 0, or so small that dividing by it would overflow."""
    return temperature < torch.finfo(torch.float32).tiny


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (N, V) -> (N,) next tokens: greedy at temperature 0, else temperature with top-k then top-p.

    The largest logit of each row is subtracted before dividing by the temperature: at a temperature so small that
    the quotients overflow (1e-40, say), every other token then goes to -inf and the largest keeps 0, so sampling is
    greedy, its limit, instead of a softmax of inf - inf. Below fp32's smallest normal number the temperature itself
    would round to 0 in the division: that is greedy too."""
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sample_top_p(torch.softmax(logits.float(), dim=-1), top_p, generator)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits (N, V) -> (N, V): the distribution sample() draws from at a temperature above 0, as probabilities: the
    softmax at that temperature, cut to the top_k most likely tokens, then to the smallest set whose probability
    reaches top_p, renormalised. What speculative sampling (mistral/speculate.py) weighs a draft token by."""
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    drop[:, 0] = False
    kept = torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return kept / kept.sum(dim=-1, keepdim=True)
