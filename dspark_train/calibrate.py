"""`dspark calibrate`: held-out acceptance statistics → sequential temperature scaling → cost profile →
adaptive-k tuning → calibration.json (read by the decoder's `adaptive` mode, the eval harness and the card).

Why each step (paper §3.2, METHOD.md §4):
- The confidence head predicts c_k = P(draft k survives | 1..k−1 survived). The scheduler needs the absolute
  value of the prefix survival a_k = Π_{i≤k} c_i, and raw heads are over-confident, so STS fits one
  temperature per slot, left to right, minimising the 20-bin ECE of a_k with the earlier ones fixed; by
  default jointly with an offset b_k (c_k = σ(z_k/T_k + b_k)), because the head is trained on the soft
  sampling label Σ min(p_t, p_d) and a temperature cannot move its mean onto greedy acceptance.
- ECE over 20 bins needs many samples: a perfectly calibrated score still shows ~4 % ECE on 700 rounds. The
  STS statistics therefore come from the target's own greedy answers to held-out prompts, with greedy
  drafting replayed at every anchor (`anchor_stats`: one target forward per answer, tens of thousands of
  blocks in minutes on a CPU), not from one decode round per sample.
- Whether verifying more tokens pays depends on the machine: SPS(B), target steps per second at B verified
  tokens, is profiled once (the decoder's `load_or_measure_sps`, cached) and smoothed to be non-increasing.
- Depth and width thresholds are chosen to maximise committed tokens per second, Σ τ / Σ round time, on the
  held-out rounds themselves.

The adaptive-k statistics come from one greedy *probe* decode per held-out prompt (its rounds start where
the previous round stopped, and carry measured drafting times): a beam-1 tree whose spine is exactly
the chain (full depth γ, so every position's survival is observed) and which also offers the top-W
siblings at every depth. Because the decoder's adaptive policy with beam 1 only ever prunes that tree
(depth by the calibrated survival, width by the top draft probability, a node budget), its τ and verified
size on each held-out round can be replayed exactly for any thresholds (`simulate`), without re-decoding.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

FORMAT_VERSION = 1
CALIBRATION_FILE = "calibration.json"
PLOT_FILE = "calibration_reliability.png"
STATS_FILE = "calibration_stats.npz"  # the STS statistics (anchor replay), kept in the run
HELDOUT_FILE = "heldout_ids.json"
BIAS_GRID = [round(0.1 * i, 1) for i in range(-20, 21)]  # STS offsets b_k searched with calibrate.bias
DEPTH_GRID = [0.0] + [round(0.02 * i, 2) for i in range(1, 50)]
WIDTH_GRID = [round(0.1 * i, 1) for i in range(1, 10)] + [None]  # None: widen at every depth


# =========================================================================== metrics
def _bins(p: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def ece(p: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Expected calibration error with `bins` equal-width bins: Σ_b n_b/N · |mean p_b − mean y_b|."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if p.size == 0:
        return float("nan")
    b = _bins(p, bins)
    gap = np.bincount(b, weights=p, minlength=bins) - np.bincount(b, weights=y, minlength=bins)
    return float(np.abs(gap).sum() / p.size)


def auroc(p: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann–Whitney, ties count half); None when only one class is present."""
    p, y = np.asarray(p, float), np.asarray(y, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size)
    sp = p[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    ends = np.r_[starts[1:], sp.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    p, y = np.asarray(p, float), np.asarray(y, float)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 20) -> list[list]:
    """Per equal-width bin: [mean predicted, observed rate, count] (None, None for an empty bin)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    b = _bins(p, bins)
    n = np.bincount(b, minlength=bins)
    sp = np.bincount(b, weights=p, minlength=bins)
    sy = np.bincount(b, weights=y, minlength=bins)
    return [[round(sp[i] / n[i], 5), round(sy[i] / n[i], 5), int(n[i])] if n[i] else [None, None, 0]
            for i in range(bins)]


# =========================================================================== held-out statistics
@dataclass
class HeldoutStats:
    """Per round of the probe decode, per depth k = 1..γ of the spine (nan / 0 where not drafted).

    survived through k ⇔ n_spine ≥ k. `rescue` = rank (2..W) of the sibling the target accepted at depth
    n_spine + 1, 0 if none of the W candidates there matched (or that depth was not drafted)."""

    conf_logits: np.ndarray  # [N, γ] raw confidence logit of the spine node's slot
    top_probs: np.ndarray  # [N, γ] draft probability of the spine token (greedy: the top candidate)
    target_probs: np.ndarray  # [N, γ] p_t(spine token | spine prefix)
    accept_rates: np.ndarray  # [N, γ] Σ_v min(p_t, p_d) at the spine parent (the soft label c*)
    depth: np.ndarray  # [N] drafted depth (γ except where max_new_tokens cut the round)
    n_spine: np.ndarray  # [N] spine tokens accepted = prefix survival length
    rescue: np.ndarray  # [N]
    t_draft: np.ndarray  # [N] seconds: drafter (context extension + backbone + head)
    t_book: np.ndarray  # [N] seconds: mask, acceptance, KV compaction
    width: int  # W: candidates per depth in the probe

    @property
    def gamma(self) -> int:
        return self.conf_logits.shape[1]

    def __len__(self) -> int:
        return self.conf_logits.shape[0]

    def observed(self) -> np.ndarray:
        """[N, γ] where a confidence logit and a survival label exist."""
        return np.arange(self.gamma)[None] < self.depth[:, None]

    def survived(self) -> np.ndarray:
        """[N, γ] prefix survival through depth k."""
        return np.arange(1, self.gamma + 1)[None] <= self.n_spine[:, None]

    def to_dict(self) -> dict:
        def enc(a):
            return [[None if not np.isfinite(x) else round(float(x), 5) for x in row] for row in a]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = enc(v) if v.ndim == 2 else [round(float(x), 6) if v.dtype.kind == "f" else int(x) for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "HeldoutStats":
        kw = {}
        for f in fields(cls):
            v = d[f.name]
            if f.name == "width":
                kw[f.name] = int(v)
            elif f.name in ("depth", "n_spine", "rescue"):
                kw[f.name] = np.asarray(v, dtype=np.int64)
            else:
                kw[f.name] = np.asarray([[np.nan if x is None else x for x in row] for row in v] if v and
                                        isinstance(v[0], list) else v, dtype=float)
        return cls(**kw)

    def save(self, path: Path) -> Path:
        """Compressed numpy arrays (no pickle): the STS statistics are too many rows for calibration.json."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays["width"] = np.asarray(self.width)
        tmp = Path(path).with_name(Path(path).name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "HeldoutStats":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: (int(z[f.name]) if f.name == "width" else z[f.name]) for f in fields(cls)})


def stats_from_traces(traces: Sequence, gamma: int, width: int) -> HeldoutStats:
    """Probe-decode traces (beam-1 trees; a chain is the width-1 case) → per-round spine statistics."""
    rows = []
    for trace in traces:
        for r in trace.rounds:  # rounds with nothing drafted (the last token before max_new_tokens) count too
            spine, u = [], 0  # follow the first (top-1) child of each spine node
            kids: dict[int, list[int]] = {}
            for i, p in enumerate(r.parents):
                kids.setdefault(p, []).append(i + 1)
            while u in kids:
                u = kids[u][0]
                spine.append(u)
            n = 0
            while n < len(spine) and r.accepted[spine[n] - 1]:
                n += 1
            rescue = 0
            if n < len(spine):
                parent = spine[n - 1] if n else 0
                hit = [j for j, c in enumerate(kids[parent]) if r.accepted[c - 1]]
                rescue = hit[0] + 1 if hit else 0
            pick = [s - 1 for s in spine]
            pad = [np.nan] * (gamma - len(pick))
            tp = r.target_probs or [np.nan] * len(r.tokens)
            ar = r.accept_rates or [np.nan] * len(r.tokens)
            rows.append(([r.conf_logits[i] for i in pick] + pad, [r.draft_probs[i] for i in pick] + pad,
                         [tp[i] for i in pick] + pad, [ar[i] for i in pick] + pad,
                         len(spine), n, rescue, r.t_draft, r.t_book))
    if not any(r[4] for r in rows):
        raise ValueError("no drafted rounds in the held-out decode (max_new_tokens too small?)")
    cols = list(zip(*rows))
    f = lambda i: np.asarray(cols[i], dtype=float)  # noqa: E731
    i64 = lambda i: np.asarray(cols[i], dtype=np.int64)  # noqa: E731
    return HeldoutStats(f(0), f(1), f(2), f(3), i64(4), i64(5), i64(6), f(7), f(8), width)


def anchor_stats(target, drafter, examples: Sequence, anchors_per_chunk: int = 64, progress: bool = False
                 ) -> HeldoutStats:
    """Greedy drafting replayed at *every* anchor of held-out conversations: one target forward and one
    batched drafter pass per conversation instead of one decode round per sample, so thousands of rounds
    for the price of a few dozen decodes (the 20-bin ECE of a few hundred probe rounds is mostly noise).

    Each block is drafted exactly as the decoder would (`blocks_at` = `propose` at each anchor, then
    `head_step` fed the drafted tokens) and compared with the target's greedy token at each slot. A slot is
    observed while the text so far follows the target's greedy path (otherwise the target's next token
    would be conditioned on a context a greedy decode never reaches): that condition is on the text, not on
    the draft, so it does not select on the outcome."""
    import torch
    from tqdm.auto import tqdm

    from .data import anchor_candidates, block_labels

    g = drafter.config.block_size
    dev, ddtype = target.device, drafter.conf.weight.dtype
    vocab = drafter.d2t  # work in the draft vocabulary: p_d is zero outside it
    rows = []
    for ex in tqdm(examples, desc="anchor replay", unit="text", disable=not progress):
        anchors = anchor_candidates(torch.tensor(ex.loss_mask)).to(dev)
        if not len(anchors):
            continue
        ids = torch.tensor([ex.input_ids], device=dev)
        T, s0 = ids.shape[1], int(anchors[0])
        feats = target.forward_features(ids, torch.ones_like(ids))
        features, last_hidden = feats.features.to(ddtype), feats.last_hidden.to(ddtype)
        logp_t = torch.cat([torch.log_softmax(target.logits(h), -1)  # [T − s0, V]: rows from the first anchor
                            for h in feats.last_hidden[0, s0:].split(256)])
        greedy = logp_t.argmax(-1)  # the target's token after position s0 + i
        # slots inside the supervised answer: the contiguous prefix, as the trainer's blocks
        valid = block_labels(ids.cpu(), torch.tensor([ex.loss_mask]), anchors.cpu()[None], g, 0)[1][0].to(dev)
        follows = torch.zeros(T - s0, dtype=torch.bool, device=dev)
        follows[:-1] = ids[0, s0 + 1:] == greedy[:-1]
        for a, ok in zip(anchors.split(anchors_per_chunk), valid.split(anchors_per_chunk)):
            block = drafter.blocks_at(features, last_hidden, ids, a[None])
            pos = (a[:, None] + torch.arange(g, device=dev)).clamp(max=T - 1)  # slot k predicts pos + 1
            rel = pos - s0
            prev, state = ids[0, a][:, None], None
            conf, top, match, p_t, rate = [], [], [], [], []
            for k in range(g):
                logits, z, state = drafter.head_step(block, k, prev, state)
                lt = logp_t[rel[:, k]]
                logits, lt_d = (logits[:, 0], lt) if vocab is None else (logits[:, 0, vocab], lt[:, vocab])
                p_d = torch.softmax(logits, -1)
                prob, tok = p_d.max(-1)
                tok = tok if vocab is None else vocab[tok]
                conf.append(z[:, 0])
                top.append(prob)
                match.append(tok == greedy[rel[:, k]])
                p_t.append(lt.gather(1, tok[:, None])[:, 0].exp())
                rate.append(torch.minimum(p_d, lt_d.exp()).sum(-1))
                prev = tok[:, None]
            on_greedy = torch.cat((torch.ones_like(ok[:, :1]), follows[rel[:, :-1]]), 1).long().cumprod(1)
            depth = (ok.long() * on_greedy).sum(1)
            n_spine = torch.minimum(torch.stack(match, 1).long().cumprod(1).sum(1), depth)
            cols = [torch.stack(c, 1).float() for c in (conf, top, p_t, rate)]
            unseen = torch.arange(g, device=dev)[None] >= depth[:, None]
            cols = [c.masked_fill(unseen, float("nan")).cpu().numpy() for c in cols]
            rows.append((*cols, depth.cpu().numpy(), n_spine.cpu().numpy()))
    if not rows:
        raise ValueError("no anchors in the held-out conversations")
    cat = [np.concatenate(c) for c in zip(*rows)]
    n = len(cat[4])
    return HeldoutStats(*cat[:4], cat[4].astype(np.int64), cat[5].astype(np.int64), np.zeros(n, np.int64),
                        np.full(n, np.nan), np.full(n, np.nan), 1)


# =========================================================================== sequential temperature scaling
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def conditional(conf_logits: np.ndarray, temperatures: Sequence[float],
                biases: Optional[Sequence[float]] = None) -> np.ndarray:
    """c_k = σ(z_k / T_k + b_k): calibrated survival of slot k given slots 1..k−1 survived [N, γ]."""
    g = conf_logits.shape[1]
    t = np.asarray(temperatures, float)[None, :g]
    b = np.asarray(biases, float)[None, :g] if biases is not None and len(biases) else 0.0
    return _sigmoid(conf_logits / t + b)


def survival(conf_logits: np.ndarray, temperatures: Sequence[float],
             biases: Optional[Sequence[float]] = None) -> np.ndarray:
    """a_k = Π_{i≤k} c_i: calibrated prefix survival [N, γ] (nan propagates past the drafted depth)."""
    return np.cumprod(conditional(conf_logits, temperatures, biases), axis=1)


def _refined(grid: list[float], i: int, n: int) -> list[float]:
    """grid[i] plus 2n+1 points spanning its neighbours: the second, finer stage of a grid search."""
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return sorted(set(np.linspace(lo, hi, 2 * n + 1).tolist()) | {grid[i]})


def fit_sts(conf_logits: np.ndarray, survived: np.ndarray, observed: np.ndarray, grid: Sequence[float],
            bins: int = 20, bias_grid: Optional[Sequence[float]] = None, refine: int = 24
            ) -> tuple[list[float], list[float]]:
    """Sequential temperature scaling. For k = 1..γ in order: T_k = argmin over `grid` (then a finer grid
    between the winner's neighbours) of the ECE of a_{k−1}·σ(z_k/T + b), earlier slots fixed. Positions
    without data keep T = 1.

    With `bias_grid`, the offset b_k is searched jointly with T_k (Platt scaling, still order-preserving
    within a slot): a temperature only sharpens or flattens, so it cannot remove a head's constant bias,
    e.g. a confidence head trained on the soft sampling label Σ min(p_t, p_d) and used for greedy
    acceptance. Without it b_k = 0 (the paper's STS). Returns (temperatures, offsets)."""
    grid = sorted(float(t) for t in grid if t > 0)
    bgrid = sorted(float(b) for b in bias_grid) if bias_grid is not None and len(bias_grid) else [0.0]
    temps: list[float] = []
    biases: list[float] = []
    prev = np.ones(conf_logits.shape[0])
    for k in range(conf_logits.shape[1]):
        m = observed[:, k]
        if not m.any():
            temps.append(1.0)
            biases.append(0.0)
            continue
        z, y, a = conf_logits[m, k], survived[m, k], prev[m]
        score = lambda t, b: ece(a * _sigmoid(z / t + b), y, bins)  # noqa: E731
        errs = np.array([[score(t, b) for b in bgrid] for t in grid])
        i, j = np.unravel_index(int(np.argmin(errs)), errs.shape)
        fine_t, fine_b = _refined(grid, i, refine), _refined(bgrid, j, refine // 4 if len(bgrid) > 1 else 0)
        t_best, b_best = min(((t, b) for t in fine_t for b in fine_b),
                             key=lambda tb: (score(*tb), abs(tb[0] - grid[i]) + abs(tb[1] - bgrid[j])))
        temps.append(round(float(t_best), 4))
        biases.append(round(float(b_best), 4))
        prev = prev * _sigmoid(conf_logits[:, k] / t_best + b_best)
    return temps, biases


def position_metrics(conf_logits: np.ndarray, survived: np.ndarray, observed: np.ndarray,
                     temperatures: Sequence[float], bins: int = 20, biases: Optional[Sequence[float]] = None) -> dict:
    """Per position: ECE, AUROC, Brier of the prefix survival a_k against the observed survival, plus the
    reliability bins and the number of rounds."""
    a = survival(conf_logits, temperatures, biases)
    out = {"ece": [], "auroc": [], "brier": [], "reliability": {}, "count": []}
    for k in range(conf_logits.shape[1]):
        m = observed[:, k]
        p, y = a[m, k], survived[m, k]
        out["ece"].append(round(ece(p, y, bins), 5) if m.any() else None)
        au = auroc(p, y)
        out["auroc"].append(None if au is None else round(au, 5))
        out["brier"].append(round(brier(p, y), 5) if m.any() else None)
        out["reliability"][str(k + 1)] = reliability(p, y, bins)
        out["count"].append(int(m.sum()))
    return out


# =========================================================================== cost profile
def smooth_sps(steps_per_s: Sequence[float]) -> list[float]:
    """Isotonic fit (pool adjacent violators) making the step time non-decreasing in B, i.e. SPS
    non-increasing: timing noise must not create fake sweet spots, and Algorithm 1's early stop assumes a
    smoothly decaying curve."""
    blocks: list[list[float]] = []  # [mean step time, weight]
    for s in steps_per_s:
        blocks.append([1.0 / s, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
    out = []
    for m, w in blocks:
        out += [1.0 / m] * int(w)
    return out


def profile_cost(target, max_tokens: int, context: int, batch_sizes: Sequence[int] = (1,), refresh: bool = False
                 ) -> dict:
    """SPS(B) for B = 1..max_tokens verified tokens on this machine (the decoder's cached profiler), raw and
    smoothed: batch 1 at the top level, R > 1 requests (B = R·n total tokens) under `batches`."""
    from .decoding import load_or_measure_sps

    out = {}
    for r in sorted(set(batch_sizes) | {1}):
        p = load_or_measure_sps(target, max_tokens=max_tokens, context=context, refresh=refresh, batch_size=r)
        out[r] = {"tokens": list(p.tokens), "steps_per_s": [round(x, 4) for x in smooth_sps(p.steps_per_s)],
                  "raw_steps_per_s": [round(x, 4) for x in p.steps_per_s], "meta": p.meta or {}}
    return {**out[1], "batches": {str(r): v for r, v in out.items() if r > 1}}


def sps_table(cost: dict, max_b: int) -> np.ndarray:
    """SPS at B = 0..max_b (index B) from a cost profile dict, via the decoder's interpolation."""
    from .decoding import SPSProfile

    f = SPSProfile(cost["tokens"], cost["steps_per_s"])
    return np.array([f(max(b, 1)) for b in range(max_b + 1)])


# =========================================================================== adaptive-k tuning
@dataclass
class AdaptivePolicy:
    """The decoder's adaptive TreePolicy knobs (decoding/tree.py): a node gets children while the calibrated
    survival through their slot ≥ depth_threshold; `max_width` candidates where the top draft probability is
    < width_threshold (None: everywhere), else 1; at most node_budget draft nodes; `beam` nodes expanded per
    depth."""

    depth_threshold: float = 0.0
    width_threshold: Optional[float] = None
    max_width: int = 1
    node_budget: int = 32
    beam: int = 1


@dataclass
class Outcome:
    tau: float  # mean tokens committed per round (bonus included)
    verified: float  # mean tokens per verify forward (anchor included)
    tokens_per_s: float  # Σ τ / Σ (t_draft + t_book + 1/SPS(B))

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def simulate(stats: HeldoutStats, temperatures: Sequence[float], policy: AdaptivePolicy,
             biases: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Replay the decoder's beam-1 drafting rule on every held-out round: returns (τ [N], B [N]).

    Exact for greedy decoding: the spine is the probe's, siblings are leaves, so a round accepts the spine
    while it matches and at the first miss at most one sibling of rank ≤ that depth's width."""
    if policy.beam != 1 or policy.max_width > stats.width:
        raise ValueError(f"simulate replays beam 1 with max_width ≤ the probe width {stats.width}")
    n, g = stats.conf_logits.shape
    c = conditional(np.nan_to_num(stats.conf_logits), temperatures, biases)
    alive = np.ones(n, bool)
    on_path = np.ones(n, bool)
    surv = np.ones(n)
    nodes = np.zeros(n, np.int64)
    tau = np.ones(n, np.int64)
    for k in range(g):
        s = surv * c[:, k]
        w = np.full(n, policy.max_width, np.int64)
        if policy.width_threshold is not None:
            w[stats.top_probs[:, k] >= policy.width_threshold] = 1
        w[s < policy.depth_threshold] = 0
        w = np.where(alive & (k < stats.depth), np.minimum(w, policy.node_budget - nodes), 0)
        nodes += w
        spine_ok = stats.n_spine > k
        rescued = (stats.n_spine == k) & (stats.rescue >= 2) & (stats.rescue <= w)
        tau += on_path & (w > 0) & (spine_ok | rescued)
        on_path &= (w > 0) & spine_ok
        alive &= w > 0
        surv = s
    return tau, nodes + 1


def evaluate_policy(stats: HeldoutStats, temperatures: Sequence[float], policy: AdaptivePolicy, sps: np.ndarray,
                    biases: Optional[Sequence[float]] = None) -> Outcome:
    tau, b = simulate(stats, temperatures, policy, biases)
    seconds = stats.t_draft + stats.t_book + 1.0 / sps[np.minimum(b, len(sps) - 1)]
    return Outcome(float(tau.mean()), float(b.mean()), float(tau.sum() / seconds.sum()))


def tune_adaptive(stats: HeldoutStats, temperatures: Sequence[float], sps: np.ndarray, max_width: int,
                  node_budget: int, depth_grid: Sequence[float] = DEPTH_GRID,
                  width_grid: Sequence[Optional[float]] = WIDTH_GRID, biases: Optional[Sequence[float]] = None
                  ) -> tuple[AdaptivePolicy, Outcome]:
    """Grid search over depth threshold × (width, width threshold) × node budget (1..γ, and the maximum)
    for the highest simulated tokens/s. A budget of d at width 1 is the fixed-depth-d chain, so the result
    is never worse than the best fixed chain on these rounds. Ties go to fewer verified tokens, then to the
    earlier grid point."""
    budgets = sorted({b for b in range(1, stats.gamma + 1)} | {node_budget})
    best = None
    for w in range(1, min(max_width, stats.width) + 1):
        for wt in (width_grid if w > 1 else [None]):
            for nb in (b for b in budgets if b <= node_budget):
                for dt in depth_grid:
                    pol = AdaptivePolicy(float(dt), wt, w, nb)
                    out = evaluate_policy(stats, temperatures, pol, sps, biases)
                    key = (round(out.tokens_per_s, 9), -out.verified)
                    if best is None or key > best[0]:
                        best = (key, pol, out)
    return best[1], best[2]


def best_fixed_chain(stats: HeldoutStats, sps: np.ndarray) -> tuple[int, Outcome]:
    """The fixed-depth chain (d = 1..γ, no thresholds) with the highest simulated tokens/s."""
    outs = {d: evaluate_policy(stats, [1.0] * stats.gamma, AdaptivePolicy(0.0, None, 1, d), sps)
            for d in range(1, stats.gamma + 1)}
    d = max(outs, key=lambda d: outs[d].tokens_per_s)
    return d, outs[d]


# =========================================================================== calibration.json
@dataclass
class Calibration:
    """calibration.json. Top-level per-position lists (slot k = 1..γ) are what the eval harness and the model
    card summarise; `adaptive` + `temperatures` are what `TreePolicy.from_calibration` reads."""

    block_size: int
    temperatures: list[float]
    ece_before: list
    ece_after: list
    auroc_before: list
    auroc_after: list
    brier_before: list
    brier_after: list
    adaptive: dict  # AdaptivePolicy fields
    expected: dict = field(default_factory=dict)  # simulated on the held-out rounds: adaptive and best chain
    measured: dict = field(default_factory=dict)  # decoded with the tuned policy / best chain on the prompts
    cost_profile: dict = field(default_factory=dict)  # SPS(B): tokens, steps_per_s (smoothed), raw, meta
    reliability: dict = field(default_factory=dict)  # {"before"|"after": {"k": [[mean pred, observed, n], ...]}}
    data: dict = field(default_factory=dict)  # what it was fitted on, including the per-round statistics
    biases: list[float] = field(default_factory=list)  # STS offsets b_k (empty: temperature only)
    copy: dict = field(default_factory=dict)  # [J] hybrid: the copy drafter's acceptance prior (decoding/copy.py)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Union[dict, str, Path]) -> "Calibration":
        if not isinstance(d, dict):
            d = json.loads(Path(d).read_text())
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"calibration.json format_version {version} is newer than this dspark-train reads")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> Path:
        """Atomic write (temp file + rename): readers never see half a file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(_dumps(self.to_json()) + "\n")
        os.replace(tmp, path)
        return path

    def policy(self) -> AdaptivePolicy:
        return AdaptivePolicy(**self.adaptive)

    def stats(self) -> HeldoutStats:
        return HeldoutStats.from_dict(self.data["stats"])


def _dumps(x, indent: int = 0) -> str:
    """JSON with one line per dict entry and per row: flat lists stay on one line (the per-round statistics
    would otherwise take one line per number)."""
    pad = " " * (indent + 1)
    if isinstance(x, dict) and x:
        body = ",\n".join(f"{pad}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in x.items())
        return "{\n" + body + "\n" + " " * indent + "}"
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in x) + "\n" + " " * indent + "]"
    return json.dumps(x)


# =========================================================================== plot
def plot_reliability(cal: Calibration, path: Path) -> Path:
    """One panel per position: predicted vs observed prefix survival before/after STS, bin counts shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = cal.block_size
    cols = min(g, 4)
    rows = math.ceil(g / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for k in range(g):
        ax = axes[k // cols][k % cols]
        key = str(k + 1)
        after = cal.reliability["after"][key]
        n = len(after)
        counts = np.array([r[2] for r in after], float)
        if counts.sum():
            ax.bar((np.arange(n) + 0.5) / n, counts / counts.max() * 0.25, width=1 / n, color="0.85", zorder=0)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for stage, style in (("before", "o-"), ("after", "s-")):
            pts = [r for r in cal.reliability[stage][key] if r[2]]
            ax.plot([r[0] for r in pts], [r[1] for r in pts], style, ms=3, lw=1, label=stage)
        ece_b, ece_a, au = cal.ece_before[k], cal.ece_after[k], cal.auroc_after[k]
        title = f"position {k + 1}"
        if ece_b is not None:
            title += f"\nECE {100 * ece_b:.1f}% → {100 * ece_a:.1f}%"
        if au is not None:
            title += f", AUC {au:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("observed survival", fontsize=8)
        if k // cols == rows - 1:
            ax.set_xlabel("predicted survival", fontsize=8)
    for k in range(g, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# =========================================================================== summary
def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def summary_table(cal: Calibration) -> str:
    """The readable report `dspark calibrate` prints."""
    lines = ["position | blocks | T_k   | b_k   | ECE before → after | AUROC before → after | Brier before → after",
             "---------|--------|-------|-------|--------------------|----------------------|---------------------"]
    counts = cal.data.get("count", [None] * cal.block_size)
    biases = cal.biases or [0.0] * cal.block_size
    for k in range(cal.block_size):
        lines.append(f"{k + 1:>8} | {counts[k] if counts[k] is not None else '—':>6} | {cal.temperatures[k]:5.2f} | "
                     f"{biases[k]:+5.2f} | "
                     f"{_pct(cal.ece_before[k]):>7} → {_pct(cal.ece_after[k]):<8} | "
                     f"{_num(cal.auroc_before[k]):>8} → {_num(cal.auroc_after[k]):<9} | "
                     f"{_num(cal.brier_before[k]):>7} → {_num(cal.brier_after[k])}")
    probe = cal.data.get("probe") or {}
    if probe.get("ece_after") and cal.data.get("sts", {}).get("source") != "probe rounds":
        lines += ["", f"on the {probe.get('rounds')} probe-decode rounds (noisier, fewer samples): ECE after "
                  + ", ".join(_pct(e) for e in probe["ece_after"][:4]) + " at positions 1-4"]
    ad = cal.adaptive
    width = ("1 (chain)" if ad["max_width"] == 1 else
             f"{ad['max_width']} where top draft prob < {ad['width_threshold']}" if ad["width_threshold"] is not None
             else f"{ad['max_width']} at every depth")
    lines += ["", f"adaptive policy: depth threshold {ad['depth_threshold']:.2f} on calibrated survival; width "
              f"{width}; node budget {ad['node_budget']}; beam {ad['beam']}"]
    rows = [("adaptive (expected)", cal.expected.get("adaptive")),
            (f"chain d={cal.expected.get('best_chain_depth')} (expected)", cal.expected.get("best_chain")),
            ("probe decode (measured)", cal.measured.get("probe")),
            ("adaptive (measured)", cal.measured.get("adaptive")),
            (f"chain d={cal.expected.get('best_chain_depth')} (measured)", cal.measured.get("best_chain"))]
    lines += ["", "                            |   τ   | verified/round | tokens/s",
              "----------------------------|-------|----------------|---------"]
    for name, o in rows:
        if o:
            lines.append(f"{name:<27} | {o['tau']:5.2f} | {o['verified']:14.2f} | {o['tokens_per_s']:8.1f}")
    cp = cal.cost_profile
    if cp.get("steps_per_s"):
        s = cp["steps_per_s"]
        picks = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= len(s)]
        lines += ["", "cost profile SPS(B) (smoothed, " + str(cp.get("meta", {}).get("device", "")) + ", "
                  + str(cp.get("meta", {}).get("dtype", "")) + "): "
                  + ", ".join(f"B={b}: {s[b - 1]:.1f}/s" for b in picks)]
    return "\n".join(lines)


# =========================================================================== the command
def heldout_prompts(run: Path, recipe, tokenizer, limit: int) -> tuple[list[str], list[list[int]], str]:
    """First-user-turn prompt ids the drafter never trained on, up to `limit`: the run's held-out
    conversations first (the trainer's `heldout_ids.json`, or the recipe's deterministic split recomputed),
    then prompts of `data.prompts` that have no conversation in the training file (in a seeded order).
    Never the eval sets."""
    from .chat import prompt_ids, user_messages
    from .config import RecipeError
    from .data import conversations_path, load_prompts, prompt_turns, read_jsonl, split_heldout, usable_conversations

    conv_file = conversations_path(recipe)
    ids_file = run / HELDOUT_FILE
    if ids_file.is_file():  # {"conversations": path, "seed": s, "ids": [...]} as train.py writes it, or a list
        raw = json.loads(ids_file.read_text())
        wanted = [str(i) for i in (raw["ids"] if isinstance(raw, dict) else raw)]
        recorded = Path(raw["conversations"]) if isinstance(raw, dict) and raw.get("conversations") else None
        conv_file = recorded if recorded is not None and recorded.is_file() else conv_file
        convs = read_jsonl(conv_file)
        by_id = {str(c["id"]): c for c in convs}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise FileNotFoundError(f"{ids_file}: {len(missing)} held-out ids not in {conv_file}")
        held, source = [by_id[i] for i in wanted], str(ids_file)
    else:  # the trainer's split: the same records (usable ones, max_prompts), the same seeded hash
        convs = read_jsonl(conv_file)
        _, held = split_heldout(usable_conversations(convs, recipe.data.max_prompts), recipe.data.heldout,
                                recipe.data.seed)
        source = f"split_heldout(data.heldout={recipe.data.heldout}, data.seed={recipe.data.seed})"
    names, prompts = [], []

    def add(name: str, messages: list[dict]) -> None:
        ids = prompt_ids(tokenizer, messages)
        if len(ids) <= recipe.data.max_seq_len and len(prompts) < limit:  # longer ones were truncated in training
            names.append(name)
            prompts.append(ids)

    for c in held:
        turns = c["conversations"]
        add(str(c["id"]), turns[:next((i for i, m in enumerate(turns) if m["role"] == "assistant"), len(turns))])
    if len(prompts) < limit:
        try:
            trained = {str(c["id"]) for c in convs}  # the whole file: any of it may have been trained on
            fresh = [p for p in load_prompts(recipe) if p["id"] not in trained]
        except (RecipeError, FileNotFoundError) as e:  # no prompt file here: the held-out conversations only
            fresh, source = [], f"{source} (data.prompts unavailable: {e})"
        n0 = len(prompts)
        for p in split_heldout(fresh, len(fresh), recipe.data.seed)[1]:
            if len(prompts) == limit:
                break
            try:
                add(p["id"], user_messages(prompt_turns(p["raw"])[:1]))
            except (ValueError, TypeError, KeyError):
                continue
        if len(prompts) > n0:
            source += f" + {len(prompts) - n0} untrained prompts of {recipe.data.prompts}"
    if not prompts:
        raise FileNotFoundError(f"{run}: no held-out prompt fits data.max_seq_len = {recipe.data.max_seq_len}")
    return names, prompts, source


def greedy_texts(target, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                 progress: bool = True) -> list:
    """prompt + the target's own greedy answer as `Example`s (loss mask on the answer): the text a greedy
    decode produces, so anchor statistics over it have the decoder's context distribution. Batched
    `generate` (prompts sorted by length to limit padding): several times the throughput of one prompt at
    a time on a CPU."""
    from tqdm.auto import tqdm

    from .data import Example, generate_batch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="greedy answers", unit="prompt", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for i, (new, _) in zip(idx, generate_batch(target, [prompts[i] for i in idx], max_new_tokens)):
                out[i] = Example(str(i), prompts[i] + new, [0] * len(prompts[i]) + [1] * len(new))
            bar.update(len(idx))
    return out


def _measure(decoder, prompts: list[list[int]], max_new_tokens: int, **kw) -> tuple[dict, list]:
    """Decode every prompt; τ and decode-only tokens/s (prefill excluded, as in the simulation)."""
    traces = [decoder.generate(p, max_new_tokens=max_new_tokens, **kw) for p in prompts]
    rounds = [r for t in traces for r in t.rounds]
    secs = sum(r.t_draft + r.t_verify + r.t_book for r in rounds)
    committed = sum(r.committed for r in rounds)
    return {"tau": round(sum(r.n_accepted + 1 for r in rounds) / max(1, len(rounds)), 4),
            "verified": round(sum(r.verified + 1 for r in rounds) / max(1, len(rounds)), 4),
            "tokens_per_s": round(committed / secs, 4) if secs else 0.0,
            "end_to_end_tokens_per_s": round(sum(len(t.tokens) for t in traces) / sum(t.t_total for t in traces), 4),
            "rounds": len(rounds), "tokens": committed}, traces


def run_calibration(run_or_artifact: Union[str, Path], overrides: Sequence[str] = (), prompts: Optional[int] = None,
                    out: Optional[Union[str, Path]] = None, quiet: bool = False) -> Calibration:
    """Calibrate a training run (<run>/final + recipe.yaml) or an exported artifact in place: writes
    calibration.json and the reliability PNG next to the weights' recipe (or into `out`)."""
    import torch

    from .config import load_recipe
    from .decoding import SpeculativeDecoder, TreePolicy
    from .export import load_artifact
    from .target import load_target

    root = Path(run_or_artifact).expanduser()
    recipe_file = root / "recipe.yaml"
    if not recipe_file.is_file():
        raise FileNotFoundError(f"{root}: no recipe.yaml (expected a training run directory or an artifact)")
    recipe = load_recipe(recipe_file, ["distributed.accelerate_config=null", "target.config_path=null",
                                       *overrides])
    cc = recipe.calibrate
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    recipe.target.dtype = cc.dtype
    target = load_target(recipe.target)
    drafter = load_artifact(root, target=target)
    gamma = drafter.config.block_size
    width = cc.max_width
    names, prompt_list, source = heldout_prompts(root, recipe, target.tokenizer,
                                                 max(prompts or cc.prompts, cc.texts))
    probe_prompts = prompt_list[:prompts or cc.prompts]
    say(f"calibrating {root}: {len(prompt_list)} held-out prompts ({source}), γ={gamma}, probe width {width}, "
        f"{cc.dtype}, {torch.get_num_threads()} threads")

    # 1. STS statistics: the target's greedy answers, with greedy drafting replayed at every anchor
    sts_stats, sts_source, copy_prior = None, "probe rounds", None
    if cc.texts:
        t0 = time.perf_counter()
        texts = greedy_texts(target, prompt_list[:cc.texts], cc.max_new_tokens, cc.batch_size, progress=not quiet)
        sts_stats = anchor_stats(target, drafter, texts, progress=not quiet)
        sts_source = f"anchor replay over greedy answers to {len(texts)} prompts"
        say(f"{sts_source}: {len(sts_stats)} blocks in {time.perf_counter() - t0:.1f}s")
        # [J] hybrid: the copy drafter's per-cell acceptance, replayed over the same greedy answers
        from .decoding.copy import fit_copy_prior
        copy_prior = fit_copy_prior([(ex.input_ids, ex.loss_mask.index(1)) for ex in texts if 1 in ex.loss_mask])

    # 2. probe decode: the chain at full depth plus top-W siblings at every depth
    decoder = SpeculativeDecoder(target, drafter)
    probe = TreePolicy([width] * gamma, beam=1, node_budget=width * gamma)
    decoder.generate(probe_prompts[0], max_new_tokens=min(8, cc.max_new_tokens), policy=probe)  # warm-up
    t0 = time.perf_counter()
    probe_measured, traces = _measure(decoder, probe_prompts, cc.max_new_tokens, policy=probe, record_probs=True)
    stats = stats_from_traces(traces, gamma, width)
    say(f"probe decode: {len(stats)} rounds on {len(probe_prompts)} prompts, τ {probe_measured['tau']:.2f} in "
        f"{time.perf_counter() - t0:.1f}s")
    if sts_stats is None:
        sts_stats = stats

    # sequential temperature scaling
    z, y, obs = sts_stats.conf_logits, sts_stats.survived(), sts_stats.observed()
    temps, biases = fit_sts(z, y, obs, cc.temperature_grid, cc.bins, BIAS_GRID if cc.bias else None)
    before = position_metrics(z, y, obs, [1.0] * gamma, cc.bins)
    after = position_metrics(z, y, obs, temps, cc.bins, biases)
    on_probe = position_metrics(stats.conf_logits, stats.survived(), stats.observed(), temps, cc.bins, biases)

    # 3. cost profile
    max_b = min(cc.max_nodes, width * gamma) + 1
    cost = profile_cost(target, max_b, context=cc.profile_context, batch_sizes=cc.profile_batch_sizes)
    sps = sps_table(cost, max_b)

    # 4. adaptive-k tuning on the held-out rounds
    policy, expected = tune_adaptive(stats, temps, sps, cc.max_width, cc.max_nodes, biases=biases)
    chain_d, chain_expected = best_fixed_chain(stats, sps)

    cal = Calibration(
        block_size=gamma, temperatures=temps, biases=biases,
        ece_before=before["ece"], ece_after=after["ece"], auroc_before=before["auroc"], auroc_after=after["auroc"],
        brier_before=before["brier"], brier_after=after["brier"], adaptive=asdict(policy),
        copy=copy_prior.to_dict() if copy_prior else {},  # [J] hybrid
        expected={"adaptive": expected.to_dict(), "best_chain_depth": chain_d, "best_chain": chain_expected.to_dict()},
        cost_profile=cost, reliability={"before": before["reliability"], "after": after["reliability"]},
        data={"source": str(root), "heldout": source, "prompt_ids": names, "n_prompts": len(prompt_list),
              "sts": {"source": sts_source, "blocks": len(sts_stats),
                      **({"file": STATS_FILE} if sts_stats is not stats else {})}, "count": after["count"],
              "max_new_tokens": cc.max_new_tokens, "decoding": "greedy", "dtype": cc.dtype,
              "probe": {"width": width, "beam": 1, "depth": gamma, "prompts": len(probe_prompts),
                        "rounds": len(stats), "ece_after": on_probe["ece"], "auroc_after": on_probe["auroc"]},
              "target": target.fingerprint(), "threads": torch.get_num_threads(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stats": stats.to_dict()})

    # 5. measure: the tuned adaptive policy and the best fixed chain, same prompts
    if cc.measure:
        adaptive = SpeculativeDecoder(target, drafter, calibration=cal.to_json())
        cal.measured = {"probe": probe_measured,
                        "adaptive": _measure(adaptive, probe_prompts, cc.max_new_tokens, mode="adaptive")[0],
                        "best_chain": _measure(decoder, probe_prompts, cc.max_new_tokens,
                                               policy=TreePolicy.chain(chain_d))[0]}
    else:
        cal.measured = {"probe": probe_measured}

    dest = Path(out).expanduser() if out else root
    dest.mkdir(parents=True, exist_ok=True)
    if sts_stats is not stats:
        sts_stats.save(dest / STATS_FILE)
    cal.save(dest / CALIBRATION_FILE)
    plot_reliability(cal, dest / PLOT_FILE)
    say(summary_table(cal))
    say(f"wrote {dest / CALIBRATION_FILE} and {dest / PLOT_FILE}")
    return cal
