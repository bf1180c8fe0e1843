"""Sequential calibration of the confidence head (paper §3.2, docs/method.md §4): one order-preserving map per
slot (slotmaps.py), fitted left to right so that the prefix survival a_k = a_{k−1}·c_k matches the observed
survival with the earlier slots fixed, and the per-position metrics before and after. numpy only.

The paper's map is sequential temperature scaling (STS, here with an offset). A trained head's miscalibration
need not be sigmoidal, so with `method="auto"` a slot whose STS leaves a cross-fitted ECE above `threshold`
also tries Platt (slope + offset by maximum likelihood) and isotonic regression, and keeps the one with the
lowest cross-fitted ECE: fitted on one half of the held-out texts and scored on the other, both ways round.
In-sample ECE would always pick isotonic (it can follow the noise); cross-fitting makes it earn its place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .metrics import auroc, brier, ece, reliability
from ..policy.slotmaps import IDENTITY, KINDS, SlotMap, sigmoid, survival

BIAS_GRID = [round(0.1 * i, 1) for i in range(-20, 21)]  # STS offsets b_k searched with calibrate.bias
METHODS = ("sts", "auto", "platt", "isotonic")  # calibrate.map
ISO_ROWS, ISO_BINS = 200, (20, 100)  # isotonic: z pre-binned at quantiles, ISO_ROWS rows a bin, 20..100 bins
ISO_EPS = 1e-4  # isotonic values are clipped into [ISO_EPS, 1 − ISO_EPS]


def _refined(grid: list[float], i: int, n: int) -> list[float]:
    """grid[i] plus 2n+1 points spanning its neighbours: the second, finer stage of a grid search."""
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return sorted(set(np.linspace(lo, hi, 2 * n + 1).tolist()) | {grid[i]})


def fit_sts_slot(z: np.ndarray, y: np.ndarray, a: np.ndarray, grid: Sequence[float], bins: int = 20,
                 bias_grid: Optional[Sequence[float]] = None, refine: int = 24) -> SlotMap:
    """One slot of STS: T = argmin over `grid` (then a finer grid between the winner's neighbours) of the ECE of
    a·σ(z/T + b), a = the earlier slots' survival. With `bias_grid` the offset b is searched jointly (a
    temperature only sharpens or flattens, so it cannot remove a head's constant bias, e.g. one trained on the
    soft sampling label Σ min(p_t, p_d) and used for greedy acceptance); without it b = 0 (the paper's STS)."""
    grid = sorted(float(t) for t in grid if t > 0)
    bgrid = sorted(float(b) for b in bias_grid) if bias_grid is not None and len(bias_grid) else [0.0]
    score = lambda temp, bias: ece(a * sigmoid(z / temp + bias), y, bins)  # noqa: E731
    errs = np.array([[score(temp, bias) for bias in bgrid] for temp in grid])
    i, j = np.unravel_index(int(np.argmin(errs)), errs.shape)
    fine_t, fine_b = _refined(grid, i, refine), _refined(bgrid, j, refine // 4 if len(bgrid) > 1 else 0)
    t_best, b_best = min(((temp, bias) for temp in fine_t for bias in fine_b),
                         key=lambda tb: (score(*tb), abs(tb[0] - grid[i]) + abs(tb[1] - bgrid[j])))
    return SlotMap("sts", temperature=round(float(t_best), 4), offset=round(float(b_best), 4))


def fit_platt(z: np.ndarray, y: np.ndarray, a: np.ndarray, iters: int = 100) -> SlotMap:
    """Platt scaling of one slot: the slope α = e^θ > 0 and offset β maximising the likelihood of the observed
    survival y under a·σ(αz + β), a = the earlier slots' survival (the product is what is calibrated). Fisher
    scoring with step halving from the raw head (α = 1, β = 0); θ and β are kept in a sane box."""
    y = np.asarray(y, float)

    def nll(th, b):
        p = np.clip(a * sigmoid(math.exp(th) * z + b), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).sum())

    th, b = 0.0, 0.0
    cur = nll(th, b)
    for _ in range(iters):
        al = math.exp(th)
        s = sigmoid(al * z + b)
        q = np.clip(1 - a * s, 1e-12, None)
        du = -y * (1 - s) + (1 - y) * a * s * (1 - s) / q  # ∂nll/∂u, u = αz + β
        w = a * s * (1 - s) ** 2 / q  # Fisher information in u
        jac = np.stack([al * z, np.ones_like(z)], 1)  # ∂u/∂(θ, β)
        step = np.linalg.solve((jac * w[:, None]).T @ jac + 1e-9 * np.eye(2), jac.T @ du)
        t, new = 1.0, math.inf
        while t > 1e-6:
            nth, nb = float(np.clip(th - t * step[0], -7, 7)), float(np.clip(b - t * step[1], -30, 30))
            new = nll(nth, nb)
            if new < cur:
                break
            t /= 2
        if not new < cur:
            break
        done = cur - new < 1e-10 * max(1.0, abs(cur))
        th, b, cur = nth, nb, new
        if done:
            break
    return SlotMap("platt", slope=round(math.exp(th), 6), offset=round(b, 6))


def fit_isotonic(z: np.ndarray, y: np.ndarray, a: np.ndarray, rows: int = ISO_ROWS) -> SlotMap:
    """Isotonic regression of one slot: pool-adjacent-violators on the conditional survival target y/a with
    weights a, so every pooled block satisfies Σ a·c = Σ y (the product a_{k−1}·c_k is calibrated there). z is
    first cut at quantiles into bins of about `rows` rows (at least ISO_BINS[0] bins, so a small sample still
    has resolution; at most ISO_BINS[1]; equal z never split), which bounds the knots and the noise a block can
    follow. Knots sit at the blocks' weighted centres; values are clipped into (0, 1) and
    blocks that clipping made equal are pooled, so knots and values both strictly increase (slotmaps.py)."""
    y, a = np.asarray(y, float), np.asarray(a, float)
    n_bins = min(max(ISO_BINS[0], len(z) // max(rows, 1)), ISO_BINS[1])
    edges = np.unique(np.quantile(z, np.linspace(0, 1, n_bins + 1)[1:-1])) if n_bins > 1 else np.array([])
    idx = np.searchsorted(edges, z, side="right")
    sums = [np.bincount(idx, weights=w, minlength=len(edges) + 1) for w in (y, a, a * z)]
    blocks: list[list[float]] = []  # [Σ y, Σ a, Σ a·z] per block, in z order
    for sy, sa, sz in zip(*sums):
        if sa <= 0:
            continue
        blocks.append([sy, sa, sz])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            last = blocks.pop()
            blocks[-1] = [u + v for u, v in zip(blocks[-1], last)]
    value = lambda blk: min(max(blk[0] / blk[1], ISO_EPS), 1 - ISO_EPS)  # noqa: E731
    pooled: list[list[float]] = []
    for blk in blocks:
        if pooled and value(pooled[-1]) >= value(blk):
            pooled[-1] = [u + v for u, v in zip(pooled[-1], blk)]
        else:
            pooled.append(blk)
    return SlotMap("isotonic", z=tuple(round(float(p[2] / p[1]), 6) for p in pooled),
                   c=tuple(round(float(value(p)), 6) for p in pooled))


def text_folds(text: Optional[np.ndarray], n: int) -> np.ndarray:
    """Two cross-fit folds over held-out texts (rows of one text are correlated, so a text never straddles
    them): alternating texts, or, without text ids (older statistics files), the first and second half."""
    return np.asarray(text) % 2 if text is not None else (np.arange(n) * 2 >= n).astype(np.int64)


def _crossfit(fit: Callable, z, y, a, folds, bins) -> Optional[float]:
    """ECE of a·map(z) on each fold with the map fitted on the other, averaged by fold size (scored per fold:
    pooled, the two folds' opposite errors would cancel inside a bin); None if a fold is empty."""
    total = 0.0
    for f in (0, 1):
        train, test = folds != f, folds == f
        if not train.any() or not test.any():
            return None
        total += test.sum() * ece(a[test] * fit(z[train], y[train], a[train])(z[test]), y[test], bins)
    return round(float(total) / len(z), 6)


@dataclass
class MapFit:
    maps: list[SlotMap]  # the chosen map per slot
    temperatures: list[float]  # the STS fit per slot (earlier slots at their chosen maps)
    biases: list[float]
    crossfit: dict = field(default_factory=dict)  # {kind: [cross-fitted ECE of a_k per slot, None: not fitted]}


def fit_maps(conf_logits: np.ndarray, survived: np.ndarray, observed: np.ndarray, grid: Sequence[float],
             bins: int = 20, bias_grid: Optional[Sequence[float]] = None, method: str = "sts",
             threshold: float = 0.015, folds: Optional[np.ndarray] = None, refine: int = 24, iso_rows: int = ISO_ROWS
             ) -> MapFit:
    """Sequential calibration, k = 1..γ in order with the earlier slots' chosen maps fixed. Each slot gets its
    STS fit; with `folds` (0/1 per row, `text_folds`) also its cross-fitted ECE, and then:

        method "sts"               STS everywhere (the paper's, with offsets if `bias_grid`)
        method "platt"/"isotonic"  that map everywhere
        method "auto"              STS where its cross-fitted ECE ≤ threshold; elsewhere whichever of STS,
                                   Platt and isotonic has the lowest cross-fitted ECE (ties: that order)

    The chosen map is then refitted on all rows. Slots without data keep the raw head (T = 1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto" and folds is None:
        raise ValueError("method 'auto' chooses on cross-fitted ECE: pass folds (text_folds)")
    fitters = {"sts": lambda z, y, a: fit_sts_slot(z, y, a, grid, bins, bias_grid, refine),
               "platt": fit_platt, "isotonic": lambda z, y, a: fit_isotonic(z, y, a, iso_rows)}
    g = conf_logits.shape[1]
    out = MapFit([], [], [], {kind: [None] * g for kind in KINDS})
    prev = np.ones(conf_logits.shape[0])
    for k in range(g):
        m = observed[:, k]
        if not m.any():
            out.maps.append(IDENTITY)
            out.temperatures.append(1.0)
            out.biases.append(0.0)
            continue
        z, y, a = conf_logits[m, k], survived[m, k], prev[m]
        sts = fitters["sts"](z, y, a)
        out.temperatures.append(sts.temperature)
        out.biases.append(sts.offset)
        if folds is not None:
            xf = out.crossfit
            xf["sts"][k] = _crossfit(fitters["sts"], z, y, a, folds[m], bins)
            if method == "auto" and xf["sts"][k] is not None and xf["sts"][k] > threshold:
                tried = KINDS
            else:
                tried = (method,) if method in ("platt", "isotonic") else ()
            for kind in tried:
                if xf[kind][k] is None:
                    xf[kind][k] = _crossfit(fitters[kind], z, y, a, folds[m], bins)
        kind = method
        if method == "auto":
            scored = [(out.crossfit[kd][k], i, kd) for i, kd in enumerate(KINDS) if out.crossfit[kd][k] is not None]
            kind = min(scored)[2] if scored else "sts"
        chosen = sts if kind == "sts" else fitters[kind](z, y, a)
        out.maps.append(chosen)
        prev = prev * chosen(conf_logits[:, k])
    return out


def fit_sts(conf_logits: np.ndarray, survived: np.ndarray, observed: np.ndarray, grid: Sequence[float],
            bins: int = 20, bias_grid: Optional[Sequence[float]] = None, refine: int = 24
            ) -> tuple[list[float], list[float]]:
    """The paper's sequential temperature scaling (+ offsets with `bias_grid`): (temperatures, offsets)."""
    fit = fit_maps(conf_logits, survived, observed, grid, bins, bias_grid, "sts", refine=refine)
    return fit.temperatures, fit.biases


def position_metrics(conf_logits: np.ndarray, survived: np.ndarray, observed: np.ndarray,
                     maps: Sequence[SlotMap] = (), bins: int = 20) -> dict:
    """Per position: ECE, AUROC, Brier of the prefix survival a_k (per-slot `maps`; none: the raw head) against
    the observed survival, plus the reliability bins and the number of rounds."""
    a = survival(conf_logits, maps)
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
