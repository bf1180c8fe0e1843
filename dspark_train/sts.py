"""Sequential temperature scaling (paper §3.2, docs/method.md §4): per-slot temperatures (and offsets) that
calibrate the confidence head's prefix survival a_k = Π_{i≤k} σ(z_i/T_i + b_i), fitted left to right, and the
per-position metrics before and after. numpy only."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .metrics import auroc, brier, ece, reliability

BIAS_GRID = [round(0.1 * i, 1) for i in range(-20, 21)]  # STS offsets b_k searched with calibrate.bias


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def conditional(conf_logits: np.ndarray, temperatures: Sequence[float],
                biases: Optional[Sequence[float]] = None) -> np.ndarray:
    """c_k = σ(z_k / T_k + b_k): calibrated survival of slot k given slots 1..k−1 survived [N, γ]."""
    g = conf_logits.shape[1]
    temps = np.asarray(temperatures, float)[None, :g]
    offsets = np.asarray(biases, float)[None, :g] if biases is not None and len(biases) else 0.0
    return _sigmoid(conf_logits / temps + offsets)


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
    grid = sorted(float(temp) for temp in grid if temp > 0)
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
        score = lambda temp, bias: ece(a * _sigmoid(z / temp + bias), y, bins)  # noqa: E731
        errs = np.array([[score(temp, bias) for bias in bgrid] for temp in grid])
        i, j = np.unravel_index(int(np.argmin(errs)), errs.shape)
        fine_t, fine_b = _refined(grid, i, refine), _refined(bgrid, j, refine // 4 if len(bgrid) > 1 else 0)
        t_best, b_best = min(((temp, bias) for temp in fine_t for bias in fine_b),
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
