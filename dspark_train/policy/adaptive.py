"""Adaptive-k tuning (docs/method.md §4): replay the decoder's beam-1 adaptive policy on the probe decode's
held-out rounds for any thresholds, and pick the depth threshold × width × node budget with the most committed
tokens per second under this machine's cost profile SPS(B). Plain decoding (node budget 0: no drafting, one
token per target step at SPS(1)) is a candidate too, so the tuned policy is never expected to be slower than
plain decoding on the measured cost curve. numpy only: the replay shares the decoder's width/depth rule
(`calibration.child_widths`) instead of importing the decoder, and the decoder may re-run the search
(`decoding/retune.py`) on a machine whose cost curve differs from the calibrating one's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from .calibration import AdaptivePolicy, HeldoutStats, child_widths
from .slotmaps import SlotMap, conditional

PLAIN = AdaptivePolicy(0.0, None, 1, 0)  # node budget 0: the decoder drafts nothing
DEPTH_GRID = [0.0] + [round(0.02 * i, 2) for i in range(1, 50)]
WIDTH_GRID = [round(0.1 * i, 1) for i in range(1, 10)] + [None]  # None: widen at every depth


@dataclass
class Outcome:
    tau: float  # mean tokens committed per round (bonus included)
    verified: float  # mean tokens per verify forward (anchor included)
    tokens_per_s: float  # Σ τ / Σ (t_draft + t_book + 1/SPS(B))

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def simulate(stats: HeldoutStats, maps: Sequence[SlotMap], policy: AdaptivePolicy) -> tuple[np.ndarray, np.ndarray]:
    """Replay the decoder's beam-1 drafting rule on every held-out round: returns (τ [N], B [N]).

    Exact for greedy decoding: the spine is the probe's, siblings are leaves, so a round accepts the spine
    while it matches and at the first miss at most one sibling of rank ≤ that depth's width. `maps` are the
    per-slot calibration maps (slotmaps.py), applied by the same function as the decoder's."""
    if policy.beam != 1 or policy.max_width > stats.width:
        raise ValueError(f"simulate replays beam 1 with max_width ≤ the probe width {stats.width}")
    n, g = stats.conf_logits.shape
    c = conditional(np.nan_to_num(stats.conf_logits), maps)
    alive = np.ones(n, bool)
    on_path = np.ones(n, bool)
    surv = np.ones(n)
    nodes = np.zeros(n, np.int64)
    tau = np.ones(n, np.int64)
    for k in range(g):
        s = surv * c[:, k]
        w = child_widths(policy.max_width, stats.top_probs[:, k], s, policy.width_threshold, policy.depth_threshold)
        w = np.where(alive & (k < stats.depth), np.minimum(w, policy.node_budget - nodes), 0)
        nodes += w
        spine_ok = stats.n_spine > k
        rescued = (stats.n_spine == k) & (stats.rescue >= 2) & (stats.rescue <= w)
        tau += on_path & (w > 0) & (spine_ok | rescued)
        on_path &= (w > 0) & spine_ok
        alive &= w > 0
        surv = s
    return tau, nodes + 1


@dataclass(frozen=True)
class RoundCost:
    """A round's cost beside the verify forward, as a function of the draft nodes n it verifies: the drafter's
    backbone, context extension and the round's bookkeeping (`base`), each node's head step and share of the
    bookkeeping (`per_node`); a plain decoding round's own bookkeeping (`plain`: acceptance, cache, stop checks).
    Measured on the machine that tunes from real decode rounds (`decoding.retune.measure_round_cost`), so a narrow
    policy is not charged the probe's wide trees, nor plain decoding nothing at all."""

    base: float
    per_node: float
    plain: float = 0.0

    def seconds(self, nodes: np.ndarray) -> np.ndarray:
        return self.base + self.per_node * nodes

    @classmethod
    def from_json(cls, obj: Optional[dict]) -> Optional["RoundCost"]:
        return cls(float(obj["base"]), float(obj["per_node"]), float(obj.get("plain", 0.0))) if obj else None


def evaluate_policy(stats: HeldoutStats, maps: Sequence[SlotMap], policy: AdaptivePolicy, sps: np.ndarray,
                    cost: Optional[RoundCost] = None) -> Outcome:
    """τ, verified tokens and tokens/s of `policy` replayed on the held-out rounds: per round 1/SPS(B) plus the
    round cost (`cost` of its nodes when given, else the probe round's measured drafting and bookkeeping)."""
    tau, b = simulate(stats, maps, policy)
    if policy.node_budget == 0:  # the decoder drafts nothing
        overhead = cost.plain if cost is not None else 0.0
    else:
        overhead = cost.seconds(b - 1) if cost is not None else stats.t_draft + stats.t_book
    seconds = overhead + 1.0 / sps[np.minimum(b, len(sps) - 1)]
    return Outcome(float(tau.mean()), float(b.mean()), float(tau.sum() / seconds.sum()))


def tune_adaptive(stats: HeldoutStats, maps: Sequence[SlotMap], sps: np.ndarray, max_width: int,
                  node_budget: int, depth_grid: Sequence[float] = DEPTH_GRID,
                  width_grid: Sequence[Optional[float]] = WIDTH_GRID, cost: Optional[RoundCost] = None,
                  plain: bool = True) -> tuple[AdaptivePolicy, Outcome]:
    """Grid search over depth threshold × (width, width threshold) × node budget (1..γ, and the maximum)
    for the highest simulated tokens/s. A budget of d at width 1 is the fixed-depth-d chain, so the result
    is never worse than the best fixed chain on these rounds; plain decoding (budget 0) is the first
    candidate (unless `plain=False`: the best drafting policy), so where no draft pays the policy drafts nothing.
    Ties go to fewer verified tokens, then to the earlier candidate."""
    budgets = sorted({b for b in range(1, stats.gamma + 1)} | {node_budget})
    best = ((-1.0, 0.0), None, None)
    if plain:
        out = evaluate_policy(stats, maps, PLAIN, sps, cost)
        best = ((round(out.tokens_per_s, 9), -out.verified), PLAIN, out)
    for w in range(1, min(max_width, stats.width) + 1):
        for wt in (width_grid if w > 1 else [None]):
            for nb in (b for b in budgets if b <= node_budget):
                for dt in depth_grid:
                    pol = AdaptivePolicy(float(dt), wt, w, nb)
                    out = evaluate_policy(stats, maps, pol, sps, cost)
                    key = (round(out.tokens_per_s, 9), -out.verified)
                    if key > best[0]:
                        best = (key, pol, out)
    return best[1], best[2]


def best_fixed_chain(stats: HeldoutStats, sps: np.ndarray, cost: Optional[RoundCost] = None) -> tuple[int, Outcome]:
    """The fixed-depth chain (d = 1..γ, no thresholds) with the highest simulated tokens/s."""
    outs = {depth: evaluate_policy(stats, [], AdaptivePolicy(0.0, None, 1, depth), sps, cost)
            for depth in range(1, stats.gamma + 1)}
    best = max(outs, key=lambda depth: outs[depth].tokens_per_s)
    return best, outs[best]
