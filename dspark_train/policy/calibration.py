"""calibration.json: the one schema its writer (`dspark calibrate`) and every reader share.

Readers: the decoder's adaptive mode (`decoding.tree.TreePolicy.from_calibration`), the artifact loader
(`artifact.load_artifact`), the model card (`export`) and the eval report (`report`). Each goes through
`read_calibration` (or `Calibration.from_json`), which refuses a newer `format_version` in one line naming
the file. This module imports nothing above `config`/`layout` and no torch, so the decoder may import it.

Fields (slot k = 1..γ; per-position lists have γ entries):

    format_version                       FORMAT_VERSION of the writer (1: no `maps`, STS everywhere)
    block_size                           γ
    maps: [{kind, ...} × γ]              the map slot k uses, c_k = map(z_k): sts (temperature, offset),
                                         platt (slope, offset) or isotonic (knots z, c); slotmaps.py
    temperatures: [T_1..T_γ]             the STS fit of slot k (earlier slots at their chosen maps): what
    biases: [b_1..b_γ] (may be empty)    `maps` holds where it says sts, and what a format-1 file means
    ece_crossfit                         {sts|platt|isotonic: [ECE per slot or null]}: ECE of a_k fitted on
                                         one half of the held-out texts, scored on the other (the map choice)
    adaptive: {depth_threshold, width_threshold (or null), max_width, node_budget, beam}  (AdaptivePolicy)
    ece_/auroc_/brier_ before, after     per-position metrics of the prefix survival a_k = Π_{i≤k} c_i
    expected, measured                   simulated / decoded τ, verified tokens, tokens/s of the tuned policy
    cost_profile                         SPS(B): tokens, steps_per_s (smoothed), raw, meta, batches, and the
                                         `machine` key it was measured under (device, name, flags, threads,
                                         dtype): under another key the decoder re-tunes `adaptive`
    reliability                          {"before"|"after": {"k": [[mean predicted, observed, count], ...]}}
    data                                 what it was fitted on, including the probe's per-round `stats`
    copy (optional)                      the copy drafter's acceptance prior for hybrid decoding: per feature
                                         cell (match-length bucket × agreement, `cells`) `hits` and `trials`
                                         of copy drafting replayed over the held-out greedy answers, shrunk to
                                         `weight` pseudo-trials (decoding/copy_drafter.py `CopyPrior`)

The decoder needs only `maps` (or `temperatures` and `biases`) and `adaptive` (`read_adaptive`): a
hand-written file may hold just those. Hybrid decoding also reads `copy` and, under the same machine key,
`cost_profile`; a file without `copy` gives the default prior (older readers ignore the key). The adaptive
width/depth rule itself (`child_widths`) lives here too, next to the knobs it reads, so the decoder's `draft_tree`
and the tuner's replay (`adaptive.simulate`) call one function, as they call one map function
(`slotmaps.SlotMap.__call__`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..layout import CALIBRATION, ArtifactError, atomic_path, check_version, read_json, write_atomic
from .slotmaps import IDENTITY, SlotMap, read_maps

FORMAT_VERSION = 2  # 2: per-slot `maps` (and `ece_crossfit`); 1: STS from temperatures/biases only
STATS_FORMAT_VERSION = 1  # calibration_stats.npz: the optional `text` array (cross-fit folds) needs no bump


# =========================================================================== the adaptive policy
@dataclass
class AdaptivePolicy:
    """The decoder's adaptive TreePolicy knobs (decoding/tree.py): a node gets children while the calibrated
    survival through their slot ≥ depth_threshold; `max_width` candidates where the top draft probability is
    < width_threshold (None: everywhere), else 1; at most node_budget draft nodes (0: plain decoding, the
    drafter does not run); `beam` nodes expanded per depth."""

    depth_threshold: float = 0.0
    width_threshold: Optional[float] = None
    max_width: int = 1
    node_budget: int = 32
    beam: int = 1

    @classmethod
    def from_json(cls, obj: dict, node_budget: int = 32) -> "AdaptivePolicy":
        """calibration.json's `adaptive` object; a missing key takes the default (`node_budget` given)."""
        wt = obj.get("width_threshold")
        return cls(float(obj.get("depth_threshold", 0.0)), None if wt is None else float(wt),
                   int(obj.get("max_width", 1)), int(obj.get("node_budget", node_budget)), int(obj.get("beam", 1)))


def child_widths(want: int, top_prob, survival, width_threshold: Optional[float], depth_threshold: float
                 ) -> np.ndarray:
    """Children per expanded node at one depth, before the node budget: `want` candidates, only 1 where the
    drafter is sure (top draft probability ≥ width_threshold: siblings would not pay), none where the
    calibrated survival through the children's slot is < depth_threshold. It depends on the node and its
    slot's confidence, never on the children's tokens (the losslessness rule of decoding/tree.py).

    Arrays in, array out: `decoding.tree.draft_tree` applies it to one frontier, `adaptive.simulate` to every
    held-out round at once, so the tuner's replay of the decoder is exact by construction."""
    top_prob, survival = np.asarray(top_prob, float), np.asarray(survival, float)
    w = np.full(survival.shape, want, np.int64)
    if width_threshold is not None:
        w[top_prob >= width_threshold] = 1
    w[survival < depth_threshold] = 0
    return w


# =========================================================================== held-out statistics
@dataclass
class HeldoutStats:
    """Per round of the probe decode (or per replayed anchor), per depth k = 1..γ of the spine (nan / 0 where
    not drafted). Written into calibration.json (`data.stats`) and, for the many anchor-replay rows, into
    calibration_stats.npz, so a fit can be redone without decoding again.

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
    text: Optional[np.ndarray] = None  # [N] index of the held-out text/prompt (cross-fit folds); None: unknown

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
            if v is None:
                continue
            if isinstance(v, np.ndarray):
                v = enc(v) if v.ndim == 2 else [round(float(x), 6) if v.dtype.kind == "f" else int(x) for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> "HeldoutStats":
        kw = {}
        for f in fields(cls):
            if f.name == "text" and obj.get("text") is None:  # written before text ids were recorded
                continue
            v = obj[f.name]
            if f.name == "width":
                kw[f.name] = int(v)
            elif f.name in ("depth", "n_spine", "rescue", "text"):
                kw[f.name] = np.asarray(v, dtype=np.int64)
            else:
                kw[f.name] = np.asarray([[np.nan if x is None else x for x in row] for row in v] if v and
                                        isinstance(v[0], list) else v, dtype=float)
        return cls(**kw)

    def save(self, path: Path) -> Path:
        """Compressed numpy arrays (no pickle): the STS statistics are too many rows for calibration.json."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        arrays["width"] = np.asarray(self.width)
        arrays["format_version"] = np.asarray(STATS_FORMAT_VERSION)
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "HeldoutStats":
        """calibration_stats.npz; a newer, truncated or foreign file is one line naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise ArtifactError(f"{path}: cannot read the calibration statistics ({type(e).__name__}: {e})") \
                from None
        check_version({"format_version": int(arrays.get("format_version", 1))}, path, STATS_FORMAT_VERSION)
        missing = [f.name for f in fields(cls) if f.name not in arrays and f.name != "text"]  # text: format 2
        if missing:
            raise ArtifactError(f"{path}: not calibration statistics (missing {missing})")
        return cls(**{f.name: (int(arrays[f.name]) if f.name == "width" else arrays[f.name]) for f in fields(cls)
                      if f.name in arrays})


# =========================================================================== calibration.json
def read_calibration(source: Union[str, Path, dict]) -> dict:
    """calibration.json (a path, or its already-parsed dict) as a dict, refusing a format_version newer than
    this code reads. The one-line ArtifactError names the file."""
    if isinstance(source, dict):
        data, name = source, CALIBRATION
    else:
        data, name = read_json(source), str(source)
    check_version(data, name, FORMAT_VERSION, "upgrade dspark-train or re-run `dspark calibrate`")
    return data


def read_adaptive(source: Union[str, Path, dict], depth: int) -> tuple[list[SlotMap], AdaptivePolicy]:
    """What the decoder's adaptive mode reads: (the per-slot maps, policy knobs); a missing node budget
    defaults to `depth`. A malformed map is an ArtifactError naming the file and the slot."""
    cal = read_calibration(source)
    return _maps(cal, source), AdaptivePolicy.from_json(cal.get("adaptive", {}), node_budget=depth)


def _maps(cal: dict, source) -> list[SlotMap]:
    try:
        return read_maps(cal)
    except ValueError as e:
        raise ArtifactError(f"{source if not isinstance(source, dict) else CALIBRATION}: {e}") from None


@dataclass
class Calibration:
    """calibration.json as `dspark calibrate` writes it (fields: the module docstring)."""

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
    maps: list[dict] = field(default_factory=list)  # SlotMap.to_json per slot (empty: STS everywhere)
    ece_crossfit: dict = field(default_factory=dict)  # {kind: [cross-fitted ECE per slot or None]}
    copy: dict = field(default_factory=dict)  # the copy drafter's prior (CopyPrior.to_dict); empty: the default
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, source: Union[dict, str, Path]) -> "Calibration":
        """From a path or a parsed dict; unknown keys are ignored, a missing field is a TypeError."""
        data = read_calibration(source)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> Path:
        """Atomic write (temp file + rename): readers never see half a file."""
        return write_atomic(path, _dumps(self.to_json()) + "\n")

    def policy(self) -> AdaptivePolicy:
        return AdaptivePolicy.from_json(self.adaptive)

    def slot_maps(self) -> list[SlotMap]:
        """The map each slot uses (a file without `maps`: STS from temperatures and biases)."""
        return _maps(asdict(self), CALIBRATION)

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


# =========================================================================== reading it: table and diagram
def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def summary_table(cal: Calibration) -> str:
    """The readable report `dspark calibrate` prints (and the model card quotes)."""
    lines = ["position | blocks | map                  | ECE before → after | cross-fit ECE: STS → map | "
             "AUROC before → after | Brier before → after",
             "---------|--------|----------------------|--------------------|--------------------------|"
             "----------------------|---------------------"]
    counts = cal.data.get("count", [None] * cal.block_size)
    maps = cal.slot_maps()
    xf = cal.ece_crossfit or {}
    for k in range(cal.block_size):
        m = maps[k] if k < len(maps) else IDENTITY
        sts_x, own_x = ((xf.get(kind) or [None] * cal.block_size)[k] for kind in ("sts", m.kind))
        cross = ("—" if sts_x is None else _pct(sts_x) if m.kind == "sts" or own_x is None
                 else f"{_pct(sts_x)} → {_pct(own_x)}")
        lines.append(f"{k + 1:>8} | {counts[k] if counts[k] is not None else '—':>6} | {m.describe():<20} | "
                     f"{_pct(cal.ece_before[k]):>7} → {_pct(cal.ece_after[k]):<8} | {cross:<24} | "
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
    if ad["node_budget"] == 0:
        lines += ["", "adaptive policy: plain decoding (no draft pays under this machine's cost profile)"]
    else:
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
        m, meta = cp.get("machine") or {}, cp.get("meta") or {}
        where = f"{m['device']} {m['name']}" + (f", {m['threads']} threads" if m.get("threads") else "") if m \
            else str(meta.get("device", ""))
        lines += ["", f"cost profile SPS(B) (smoothed, {where}, {m.get('dtype') or meta.get('dtype', '')}): "
                  + ", ".join(f"B={b}: {s[b - 1]:.1f}/s" for b in picks),
                  f"  {describe_noise(cp.get('tokens') or [], meta)}"]
    guard = (cal.data.get("tuning") or {}).get("guard")
    if guard:
        lines += ["", f"the tuner chose plain decoding; measured on {guard['prompts']} probe prompts: plain "
                  f"{guard['plain']['tokens_per_s']:.1f} tok/s, best drafting policy "
                  f"{guard['drafting']['tokens_per_s']:.1f} tok/s → {guard['chosen']}"]
    return "\n".join(lines)


def describe_noise(tokens: list, meta: Optional[dict]) -> str:
    """One line: how noisy an SPS(B) profile's timings were (IQR/median of each B over its sweeps: what calibrate
    and eval print next to the curve, from the profile's `meta`)."""
    noise = (meta or {}).get("noise") or []
    if not noise:
        return "timing noise not recorded"
    i = int(np.argmax(noise))
    flags = "".join(f"; {k}: {meta[k]}" for k in ("disturbed", "noisy") if meta.get(k))
    return (f"timing noise (IQR/median over sweeps) median {float(np.median(noise)):.1%}, max {noise[i]:.1%} at "
            f"B={tokens[i]}, {meta.get('attempts', 1)} measurement(s){flags}")


def plot_reliability(cal: Calibration, path: Path) -> Path:
    """One panel per position: predicted vs observed prefix survival before/after the slot's map (its kind in
    the title), bin counts shaded (`dspark calibrate` writes it into the run; `dspark eval` redraws it from the
    artifact's file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = cal.block_size
    maps = cal.slot_maps()
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
        title = f"position {k + 1}" + (f" ({maps[k].kind})" if k < len(maps) else "")
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)
