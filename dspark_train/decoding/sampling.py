"""Probability arithmetic shared by drafting and verification (fp32 throughout).

Losslessness rests on two facts kept here in one place: the draft and the target distributions are
warped by the *same* function (temperature, top-k, top-p), and the draft distribution an acceptance
test divides by is exactly the one its token was drawn from (for siblings drawn without replacement:
the distribution renormalised without the earlier siblings).

Every random choice a round makes goes through `Draws` (drafting without replacement, each acceptance test,
the correction or bonus token), so a test can substitute an enumerator of all outcomes with their
probabilities and compute a round's output distribution exactly (tests/test_exact_sampling.py). Arithmetic
keeps float64 when given float64 (that test's 1e-9), else runs in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off (HF semantics: top-k first, then top-p)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [..., V] -> fp32 probabilities after temperature, top-k and top-p (greedy: plain softmax)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if params.greedy:
        return torch.softmax(x, dim=-1)
    x = x / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (always the top one)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= params.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One token from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_without_replacement(probs: torch.Tensor, k: torch.Tensor, generator: Optional[torch.Generator]
                               ) -> torch.Tensor:
    """Rows [F, V]; returns [F, max(k)] token ids in draw order (exponential race = sequential sampling
    without replacement). Row f's first k[f] entries are valid; k is clipped by the caller to the support."""
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return torch.empty(probs.shape[0], 0, dtype=torch.long, device=probs.device)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return torch.topk(probs / race, kmax, dim=-1).indices


class Draws:
    """The random choices of decoding rounds, drawn from one torch.Generator (None: torch's default)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def accept(self, p: float) -> bool:
        """True with probability min(1, max(p, 0)): one acceptance test (p = r(x) / q(x))."""
        if p >= 1.0 or p <= 0.0:
            return p >= 1.0
        device = self.generator.device if self.generator is not None else None
        return float(torch.rand((), generator=self.generator, device=device)) < p

    def choice(self, probs: torch.Tensor) -> int:
        """One token from a 1-D distribution."""
        return sample(probs, self.generator)

    def without_replacement(self, probs: torch.Tensor, k: Sequence[int]) -> torch.Tensor:
        """Row f's first k[f] tokens drawn without replacement, in draw order ([F, max k])."""
        return sample_without_replacement(probs, torch.as_tensor(list(k)), self.generator)


def as_draws(source: Union[Draws, torch.Generator, None]) -> Draws:
    return source if isinstance(source, Draws) else Draws(source)


def residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """norm(max(target - draft, 0)); if nothing is left (only reachable through rounding), keep target."""
    r = (target - draft).clamp_min_(0.0)
    s = r.sum()
    return r / s if s > 0 else target


def accept_rate(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """Σ_v min(p_t, p_d) = 1 − TV: the probability that one draft from `draft` survives (rows)."""
    return torch.minimum(target, draft).sum(dim=-1)
