"""Rotary position embeddings in the interleaved-pair (complex) form of the native checkpoints.

Channels (2m, 2m+1) of each head form one complex number that is rotated by angle pos * theta^(-2m/D).
"""
from functools import lru_cache

import torch


def precompute_freqs_cis(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """positions (S,) int -> (S, D/2) complex64 unit rotations, computed in fp32 whatever the model dtype."""
    return rotations(positions, inverse_frequencies(head_dim, theta, positions.device))


def rotations(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """positions (S,) int, inv_freq (D/2,) -> (S, D/2) complex64 unit rotations by position * inv_freq."""
    angles = torch.outer(positions.to(torch.float32), inv_freq)  # (S, D/2)
    return torch.polar(torch.ones_like(angles), angles)


@lru_cache(maxsize=64)
def inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(D/2,) fp32 theta^(-2m/D). Built once per shape: every forward asks for it, and building it is most of
    what a decode step's RoPE costs. A normal tensor even when first asked for under inference_mode."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (S, heads, D) queries or keys, freqs_cis (S, D/2) -> rotated x in its own dtype."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (S, heads, D/2)
    return torch.view_as_real(x_ * freqs_cis[:, None, :]).flatten(-2).type_as(x)  # (S, heads, D)
