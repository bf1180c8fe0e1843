"""Calibration metrics of a predicted probability p against a 0/1 outcome y: ECE (equal-width bins), AUROC,
Brier score and the reliability bins the diagram draws (docs/method.md §4, §6). numpy only."""
from __future__ import annotations

from typing import Optional

import numpy as np


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
