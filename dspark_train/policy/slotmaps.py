"""Per-slot calibration maps (docs/method.md §4): how slot k's raw confidence logit z_k becomes the calibrated
conditional survival c_k, and the one function every reader applies to it.

    sts        c = σ(z / T + b)             the paper's temperature (+ our offset), fitted by ECE grid search
    platt      c = σ(a·z + b), a > 0        the same family, fitted by maximum likelihood of the prefix survival
    isotonic   c through knots (z_j, c_j)   both strictly increasing; linear between knots; beyond the end knots
                                            the logit of c keeps rising with slope TAIL_SLOPE

Every kind is strictly increasing in z, so within a slot the calibrated confidence ranks rounds exactly as the
raw head does (AUROC, the depth threshold's cut, Algorithm 1's sort see the head's own order); only the
absolute values the scheduler multiplies change. Isotonic exists because a trained head's miscalibration need
not be sigmoidal: the demo drafter under-predicts greedy acceptance by 10–20 points above 0.65 and is close
below, a shape no (T, b) pair fits (`sts.fit_maps` picks per slot, on cross-fitted ECE).

`SlotMap.__call__` is the one function: `conditional`/`survival` here (the tuner's replay, the metrics) and
`decoding.tree.TreePolicy.confidence` (chain, tree, adaptive and the batched scheduler) all call it. numpy only,
no torch: the decoder imports it through the calibration.json schema (calibration.py).

calibration.json (format_version ≥ 2) lists one object per slot under `maps`:
{"kind": "sts", "temperature": T, "offset": b}, {"kind": "platt", "slope": a, "offset": b} or
{"kind": "isotonic", "z": [z_1..z_m], "c": [c_1..c_m]}. A file without `maps` means STS at every slot from
`temperatures` and `biases` (`read_maps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

KINDS = ("sts", "platt", "isotonic")
TAIL_SLOPE = 1e-3  # isotonic: logit(c) per unit of z beyond the end knots (strictly increasing, nearly flat)


def sigmoid(x):
    """σ(x) = (1 + tanh(x/2)) / 2: no overflow for large |x|, nan stays nan (arrays or scalars)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, float)))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class SlotMap:
    """One slot's order-preserving map z → c (the fields its kind uses; the rest keep their defaults)."""

    kind: str = "sts"
    temperature: float = 1.0  # sts
    slope: float = 1.0  # platt
    offset: float = 0.0  # sts, platt
    z: tuple = ()  # isotonic knots, strictly increasing
    c: tuple = ()  # isotonic values in (0, 1), strictly increasing

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"map kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("temperature", "slope", "offset"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{self.kind} map: {name} must be finite, got {getattr(self, name)!r}")
        if self.temperature <= 0 or self.slope <= 0:
            raise ValueError(f"{self.kind} map: temperature and slope must be > 0 (order-preserving)")
        if self.kind == "isotonic":
            z, c = np.asarray(self.z, float), np.asarray(self.c, float)
            if z.ndim != 1 or not len(z) or z.shape != c.shape or not np.isfinite(z).all():
                raise ValueError("isotonic map: z and c must be equally long, non-empty lists of finite numbers")
            if (np.diff(z) <= 0).any() or (np.diff(c) <= 0).any() or not ((c > 0) & (c < 1)).all():
                raise ValueError("isotonic map: knots z and values c must be strictly increasing, c in (0, 1)")

    def __call__(self, logit):
        """Calibrated conditional survival c = map(z), elementwise (nan stays nan)."""
        x = np.asarray(logit, float)
        if self.kind == "sts":
            return sigmoid(x / self.temperature + self.offset)
        if self.kind == "platt":
            return sigmoid(self.slope * x + self.offset)
        z, c = self.z, self.c
        below = _logit(c[0]) + TAIL_SLOPE * (x - z[0])
        above = _logit(c[-1]) + TAIL_SLOPE * (x - z[-1])
        inner = np.interp(x, z, c)
        return np.where(x < z[0], sigmoid(below), np.where(x > z[-1], sigmoid(above), inner))

    def describe(self) -> str:
        if self.kind == "sts":
            return f"sts T={self.temperature:.2f} b={self.offset:+.2f}"
        if self.kind == "platt":
            return f"platt a={self.slope:.2f} b={self.offset:+.2f}"
        return f"isotonic {len(self.z)} knots"

    def to_json(self) -> dict:
        if self.kind == "sts":
            return {"kind": "sts", "temperature": self.temperature, "offset": self.offset}
        if self.kind == "platt":
            return {"kind": "platt", "slope": self.slope, "offset": self.offset}
        return {"kind": "isotonic", "z": list(self.z), "c": list(self.c)}

    @classmethod
    def from_json(cls, obj: dict) -> "SlotMap":
        """One entry of calibration.json's `maps`; a bad entry is a ValueError saying what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"a map must be an object, got {type(obj).__name__}")
        kind = obj.get("kind")
        allowed = {"sts": ("temperature", "offset"), "platt": ("slope", "offset"), "isotonic": ("z", "c")}
        if kind not in allowed:
            raise ValueError(f"map kind must be one of {KINDS}, got {kind!r}")
        try:
            if kind == "isotonic":
                return cls(kind, z=tuple(float(v) for v in obj["z"]), c=tuple(float(v) for v in obj["c"]))
            return cls(kind, **{k: float(obj.get(k, 0.0 if k == "offset" else 1.0)) for k in allowed[kind]})
        except (KeyError, TypeError) as e:
            raise ValueError(f"{kind} map: missing or non-numeric {e}") from None


IDENTITY = SlotMap()  # c = σ(z): the raw head


def sts_maps(temperatures: Sequence[float], biases: Optional[Sequence[float]] = None) -> list[SlotMap]:
    """The STS maps (c_k = σ(z_k / T_k + b_k)) of per-slot temperatures and offsets (none: b = 0)."""
    biases = list(biases) if biases else [0.0] * len(temperatures)
    return [SlotMap("sts", temperature=float(t), offset=float(b)) for t, b in zip(temperatures, biases)]


def read_maps(cal: dict) -> list[SlotMap]:
    """The per-slot maps of a parsed calibration.json: `maps` when present (format_version ≥ 2), else STS from
    `temperatures` and `biases` (format 1, or a hand-written file). A bad entry names its slot."""
    if cal.get("maps"):
        out = []
        for k, obj in enumerate(cal["maps"]):
            try:
                out.append(SlotMap.from_json(obj))
            except ValueError as e:
                raise ValueError(f"maps[{k}] (slot {k + 1}): {e}") from None
        return out
    return sts_maps(cal.get("temperatures") or [], cal.get("biases"))


def conditional(conf_logits: np.ndarray, maps: Sequence[SlotMap]) -> np.ndarray:
    """c_k = maps[k](z_k) for every row [N, γ]; slots beyond the maps get the raw σ(z) (nan stays nan)."""
    z = np.asarray(conf_logits, float)
    return np.stack([(maps[k] if k < len(maps) else IDENTITY)(z[:, k]) for k in range(z.shape[1])], axis=1) \
        if z.shape[1] else z.copy()


def survival(conf_logits: np.ndarray, maps: Sequence[SlotMap]) -> np.ndarray:
    """a_k = Π_{i≤k} c_i: calibrated prefix survival [N, γ] (nan propagates past the drafted depth)."""
    return np.cumprod(conditional(conf_logits, maps), axis=1)
