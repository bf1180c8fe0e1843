"""Rotary position embeddings as HF Llama computes them (half-split convention), shared by the drafter and its
initialisation from the target."""
from __future__ import annotations

import torch


def rope_tables(theta: float, head_dim: int, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] fp32 for positions 0..n−1 (angles in fp64, as exact as the target's)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    f = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv
    f = torch.cat((f, f), -1)
    return f.cos().float(), f.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split convention (as HF Llama)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin
