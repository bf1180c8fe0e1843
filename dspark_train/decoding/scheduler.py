"""Verification-length control: the profiled cost curve SPS(B) and the prefix scheduler (paper, Algorithm 1).

SPS(B) = target forward steps per second when B tokens are verified in one pass. It is measured once per
target and machine key (`machine_key`: CPU model or GPU name, the CPU flags that decide matmul speed, thread
count, dtype; hardware.py) and cached as JSON (default ~/.cache/dspark/sps_<hash>.json): a curve measured under
one key is never used under another. The hash covers the format version; a reader refuses a newer one,
naming the file. A curve no forward could produce (B tokens costing more than B one-token steps: timed under
outside load) is measured again and never trusted from the cache.

The scheduler admits (request, position) pairs in descending calibrated survival a_{r,j} while the expected
throughput Θ = τ*·SPS(B) improves, and stops at the first non-improvement. The stop is what keeps it
lossless: admitting draft j then depends on c_1..c_j only, never on x_j (c_{j+1} depends on x_j). The
retrospective variant (`early_stop=False`, global argmax over the whole greedy path) exists to demonstrate
the bias of Appendix A and must not be used for decoding.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..hardware import detect
from ..layout import ArtifactError, check_version, read_json, write_atomic
from ..policy.calibration import describe_noise

SPS_VERSION = 2  # of the cached profile's JSON (2: lower quartile of the sweeps, noise recorded)


@dataclass
class SPSProfile:
    """tokens[i] verified tokens cost 1/steps_per_s[i] seconds per target forward."""

    tokens: list[int]
    steps_per_s: list[float]
    meta: Optional[dict] = None

    def __post_init__(self):
        self._sec = [1.0 / s for s in self.steps_per_s]  # step times: what is interpolated

    def __call__(self, b: int) -> float:
        """SPS(B); linear in step time between points, extrapolated linearly in step time beyond the last."""
        ts, sec = self.tokens, self._sec
        if b <= ts[0]:
            return self.steps_per_s[0]
        for i in range(1, len(ts)):
            if b <= ts[i]:
                w = (b - ts[i - 1]) / (ts[i] - ts[i - 1])
                return 1.0 / (sec[i - 1] + w * (sec[i] - sec[i - 1]))
        slope = (sec[-1] - sec[-2]) / (ts[-1] - ts[-2]) if len(ts) > 1 else 0.0
        return 1.0 / (sec[-1] + max(slope, 0.0) * (b - ts[-1]))

    def relative_cost(self) -> list[float]:
        """t(B)/t(1) for each profiled B."""
        return [self.steps_per_s[0] / s for s in self.steps_per_s]

    def table(self, max_b: int) -> np.ndarray:
        """SPS at B = 0..max_b (index B; B = 0 reads as 1): the tuner's lookup table."""
        return np.array([self(max(b, 1)) for b in range(max_b + 1)])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"format_version": SPS_VERSION, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "SPSProfile":
        """A saved profile; a malformed or newer file is one line naming it."""
        data = read_json(path)
        check_version(data, path, SPS_VERSION, "delete it to measure again")
        try:
            return cls(list(data["tokens"]), list(data["steps_per_s"]), data.get("meta"))
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: not an SPS profile ({type(e).__name__}: {e}); delete it to measure again") \
                from None


class BatchSPS:
    """SPS of batched forwards: a profile per measured row count R (R rows × n tokens each, B = R·n; `cost_profile`'s
    `batches`). A batched forward reads R rows of KV cache besides the weights, so it is not a one-row forward of
    R·n tokens. `for_rows(R)` is the curve over B for R rows: a measured R's own, else step times interpolated
    linearly in R between the measured row counts around it (beyond the largest, scaled by R)."""

    def __init__(self, profiles: dict[int, SPSProfile]):
        if 1 not in profiles:
            raise ValueError("BatchSPS needs the one-row profile (R = 1)")
        self.profiles = dict(sorted(profiles.items()))

    @classmethod
    def from_cost_profile(cls, cost: dict) -> "BatchSPS":
        """From `cost_profile`'s record (smoothed curves): one row at the top level, R rows under `batches`."""
        profiles = {1: SPSProfile(cost["tokens"], cost["steps_per_s"], cost.get("meta"))}
        for r, c in (cost.get("batches") or {}).items():
            profiles[int(r)] = SPSProfile(c["tokens"], c["steps_per_s"], c.get("meta"))
        return cls(profiles)

    def for_rows(self, rows: int) -> Callable[[int], float]:
        if rows in self.profiles:
            return self.profiles[rows]
        below = max(r for r in self.profiles if r < rows)
        above = [r for r in self.profiles if r > rows]

        def sps(b: int) -> float:
            n = b / rows
            t_lo = 1.0 / self.profiles[below](max(1, round(below * n)))
            if not above:
                return 1.0 / (t_lo * rows / below)
            hi = above[0]
            t_hi = 1.0 / self.profiles[hi](max(1, round(hi * n)))
            return 1.0 / (t_lo + (rows - below) / (hi - below) * (t_hi - t_lo))
        return sps


def prefix_schedule(survival: Sequence[Sequence[float]], sps: Callable[[int], float], early_stop: bool = True,
                    overhead: float = 0.0, padded: bool = False) -> list[int]:
    """Algorithm 1: per-request verification lengths ℓ_r from prefix survival a_{r,j} (j = 1..γ, non-increasing).

    B counts every verified token including each request's anchor; τ* = R + Σ admitted a_{r,j}. `overhead`:
    seconds the round costs beside its target forward (drafting, bookkeeping), so Θ = τ*/(overhead + 1/SPS(B))
    (0: the paper's Θ = τ*·SPS(B)).

    `padded`: the forward computes R rows of the longest row's length (rows right-padded, as decoding/batch.py
    verifies them), so B = R·(1 + max ℓ): the cost moves only when a depth (a column) opens, and a draft in an open
    column is free. Admitting pairs one by one would then stop at the first pair that cannot pay for a whole
    column alone; instead whole columns are admitted (depth j for every request that drafted it) while Θ improves,
    stopping at the first column that does not. Lossless alike: column j's admission reads a_{r,j'} for j' ≤ j
    only, which depend on drafts before j, never on x_j."""
    return _admit(survival, sps, early_stop, overhead, padded)[0]


def _admit(survival: Sequence[Sequence[float]], sps: Callable[[int], float], early_stop: bool, overhead: float,
           padded: bool = False) -> tuple[list[int], float]:
    """prefix_schedule's lengths and the Θ they reach."""
    def throughput(tau: float, b: int) -> float:
        return tau * sps(b) if overhead == 0 else tau / (overhead + 1.0 / sps(b))

    r_count = len(survival)
    ell = [0] * r_count
    best_ell = list(ell)
    b, tau = r_count, float(r_count)
    best = throughput(tau, b)
    if padded:
        for j in range(1, max((len(row) for row in survival), default=0) + 1):
            col = [r for r, row in enumerate(survival) if len(row) >= j and row[j - 1] > 0 and ell[r] == j - 1]
            if not col:
                break
            for r in col:
                ell[r] = j
            tau += sum(survival[r][j - 1] for r in col)
            theta = throughput(tau, r_count * (1 + j))
            if theta > best:
                best, best_ell = theta, list(ell)
            elif early_stop:
                break
        return best_ell, best
    cands = sorted(((a, j, r) for r, row in enumerate(survival) for j, a in enumerate(row, 1) if a > 0),
                   key=lambda c: (-c[0], c[1], c[2]))
    for a, j, r in cands:
        if j != ell[r] + 1:  # unreachable with non-increasing survival; guards malformed input
            raise ValueError("survival must be non-increasing along each request's positions")
        ell[r] = j
        b += 1
        tau += a
        theta = throughput(tau, b)
        if theta > best:
            best, best_ell = theta, list(ell)
        elif early_stop:
            break
    return best_ell, best


class LoadAwareScheduler:
    """Algorithm 1 for a batch of requests, charged what drafting costs on this machine, and told when not to draft.

    Verification lengths follow `prefix_schedule` with the round's measured overhead (drafting: sunk once the
    drafts exist, but it makes a round's extra tokens relatively cheaper). Before a round, `should_draft(R)`
    compares plain decoding's Θ = R·SPS(R) with the Θ the scheduler would reach on survival rows of recent rounds
    (a pool of the last `history` requests' rows) at the drafting cost measured for R requests: where SPS(B) says
    verification is no longer free (many requests on a CPU) and drafting does not pay for itself, the round is
    plain decoding and the drafter does not run. Every `probe_every` plain rounds one drafted round refreshes the
    pool and the cost. Both decisions use only what earlier rounds revealed (and, within a round, confidences in
    Algorithm 1's order), never a draft's own token, so sampled output keeps the target's law (Appendix A).

    `sps`: an SPSProfile (B = the tokens of any forward) or a BatchSPS (a curve per row count).
    `draft_cost`: seconds a drafted round costs beside a plain round as a function of R (None: measured online, the
    median of the recent rounds' drafting time at the nearest R that drafted). `padded`: B counts the padded
    tokens the batched forward computes (prefix_schedule)."""

    def __init__(self, sps, early_stop: bool = True, history: int = 64, probe_every: int = 16,
                 draft_cost: Optional[Callable[[int], float]] = None, padded: bool = True):
        self.sps, self.early_stop, self.probe_every, self.padded = sps, early_stop, probe_every, padded
        self.pool: list[list[float]] = []
        self.history = history
        self.fixed_cost = draft_cost
        self.costs: dict[int, list[float]] = {}  # R -> recent drafting seconds of drafted rounds
        self.plain_streak = 0
        self._decided: dict[int, bool] = {}  # should_draft's answers since the pool and costs last changed

    def draft_cost(self, r_count: int) -> Optional[float]:
        if self.fixed_cost is not None:
            return self.fixed_cost(r_count)
        if not self.costs:
            return None
        near = min(self.costs, key=lambda r: (abs(r - r_count), -r))
        return float(np.median(self.costs[near]))

    def should_draft(self, r_count: int) -> bool:
        cost = self.draft_cost(r_count)
        if not self.pool or cost is None or self.plain_streak >= self.probe_every:
            return True
        if r_count not in self._decided:  # plain rounds change neither the pool nor the costs: decided once per R
            rows = [self.pool[-1 - (i % len(self.pool))] for i in range(r_count)]
            curve = self.curve(r_count)
            _, theta = _admit(rows, curve, self.early_stop, cost, self.padded)
            self._decided[r_count] = theta > r_count * curve(r_count)
        return self._decided[r_count]

    def curve(self, r_count: int) -> Callable[[int], float]:
        """SPS over B for a forward of r_count rows (a BatchSPS's, else the one curve given)."""
        return self.sps.for_rows(r_count) if isinstance(self.sps, BatchSPS) else self.sps

    def lengths(self, survival: Sequence[Sequence[float]]) -> list[int]:
        """This round's ℓ_r (its drafts exist: their cost is part of the round)."""
        ell = prefix_schedule(survival, self.curve(len(survival)), self.early_stop,
                              self.draft_cost(len(survival)) or 0.0, self.padded)
        self.pool = (self.pool + [list(row) for row in survival])[-self.history:]
        self._decided.clear()
        return ell

    def record(self, r_count: int, drafted: bool, draft_seconds: float = 0.0) -> None:
        """After a round: whether it drafted, and what drafting cost (drafter passes, head steps, scheduling)."""
        if drafted:
            self.plain_streak = 0
            if self.fixed_cost is None:
                self.costs[r_count] = (self.costs.get(r_count, []) + [draft_seconds])[-8:]
                self._decided.clear()
        else:
            self.plain_streak += 1


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


def machine_key(target) -> dict:
    """The machine key of this target's cost: its device's capabilities (hardware.py) and its dtype."""
    return detect(target.device.type).key(str(target.dtype).removeprefix("torch."))


def profile_key(target, max_tokens: int, context: int, batch_size: int = 1) -> str:
    """The cache key of one profile: target fingerprint, machine key, torch version and the profile's shape."""
    blob = json.dumps([SPS_VERSION, target.fingerprint(), machine_key(target), torch.__version__, max_tokens,
                       context, batch_size],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def disturbance(profile: SPSProfile) -> Optional[str]:
    """Why a measured curve cannot be the target's own cost, or None. One forward over B tokens reads the
    weights once, so it never costs more than B one-token forwards; a curve saying so was timed while
    something else used the CPU (a demo's curve once said 2 tokens cost 3.2 steps, and the tuner chose plain
    decoding from it)."""
    for b, rel in zip(profile.tokens, profile.relative_cost()):
        if b > profile.tokens[0] and rel > b / profile.tokens[0]:
            return f"verifying {b} tokens timed at {rel:.1f}× the cost of {profile.tokens[0]}"
    return None


SPS_QUANTILE = 0.25  # of one B's timings across sweeps: outside load only ever adds time, so the low side is the cost
NOISE_LIMIT = 0.10  # IQR/median of one B's timings above which a profile is measured again (and flagged if it stays)


def estimate_sps(times: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Steps per second per B from its timings over the interleaved sweeps (their lower quartile), and the noise
    of each B: the interquartile range over the median."""
    sps, noise = [], []
    for t in times:
        q1, med, q3 = np.quantile(np.asarray(t, float), [SPS_QUANTILE, 0.5, 0.75])
        sps.append(1.0 / float(q1))
        noise.append(float((q3 - q1) / med))
    return sps, noise


def noisiness(profile: SPSProfile) -> Optional[str]:
    """Why a measured curve's timings are too spread to decide on, or None (profiles without recorded noise:
    None)."""
    noise = (profile.meta or {}).get("noise") or []
    if not noise or max(noise) <= NOISE_LIMIT:
        return None
    i = int(np.argmax(noise))
    return f"timings at B={profile.tokens[i]} spread {noise[i]:.0%} (IQR/median; limit {NOISE_LIMIT:.0%})"


@torch.no_grad()
def measure_sps(target, max_tokens: int = 32, context: int = 256, repeats: int = 7, warmup: int = 2,
                batch_size: int = 1, attempts: int = 2) -> SPSProfile:
    """Time one target forward of B new tokens on top of a `context`-token KV cache, in sweeps over B (so bursts
    of outside load hit every B alike), each B's cost the lower quartile of its sweeps (`estimate_sps`), its
    noise recorded in `meta["noise"]`. batch_size R > 1: R rows of n tokens each, B = R·n ≤ max_tokens (the
    batched scheduler's case).
    A curve that fails the plausibility check (`disturbance`) or whose timings spread beyond NOISE_LIMIT
    (`noisiness`) is measured again, up to `attempts` times; the least noisy plausible one is returned, with the
    reason in `meta["disturbed"]` / `meta["noisy"]` if it still fails (a disturbed one is not trusted from the
    cache: see `load_or_measure_sps`; a noisy one is, its noise stated wherever the curve is printed)."""
    best, best_key = None, None
    for attempt in range(attempts):
        prof = _measure_once(target, max_tokens, context, repeats, warmup, batch_size)
        disturbed, noisy = disturbance(prof), noisiness(prof)
        key = (disturbed is not None, max((prof.meta or {}).get("noise") or [0.0]))
        if best is None or key < best_key:
            best, best_key, why = prof, key, (disturbed, noisy)
        if disturbed is None and noisy is None:
            break
        print(f"SPS(B) profile {'disturbed' if disturbed else 'noisy'} ({disturbed or noisy}: something else is "
              "using the CPU?); " + ("measuring again" if attempt + 1 < attempts else "keeping the best, flagged"),
              file=sys.stderr)
    best.meta = {**(best.meta or {}), "attempts": attempt + 1}
    if why[0]:
        best.meta["disturbed"] = why[0]
    if why[1]:
        best.meta["noisy"] = why[1]
    return best


def _measure_once(target, max_tokens: int, context: int, repeats: int, warmup: int, batch_size: int
                  ) -> SPSProfile:
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .cache import keep_slots

    dev = target.device
    g = torch.Generator().manual_seed(0)
    R, per_row = batch_size, max(1, max_tokens // batch_size)
    ids = torch.randint(0, target.vocab_size, (R, context + per_row), generator=g).to(dev)
    cache = DynamicCache(config=target.config)
    target.forward_features(ids[:, :context], cache=cache)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in range(per_row)]
    bar = tqdm(total=(warmup + repeats) * per_row, desc=f"SPS(B) profile, B ≤ {R * per_row}", unit="forward",
               dynamic_ncols=True, disable=None)  # shown on a terminal only
    for rep in range(warmup + repeats):  # sweeps over B, so bursts of outside load hit every B alike
        for n in range(1, per_row + 1):
            pos = torch.arange(context, context + n, device=dev)[None].expand(R, n)
            sync()
            t0 = time.perf_counter()
            out = target.forward_features(ids[:, context:context + n], position_ids=pos, cache=cache)
            target.logits(out.last_hidden)
            sync()
            if rep >= warmup:
                times[n - 1].append(time.perf_counter() - t0)
            keep_slots(cache, context, [])
            bar.update()
    bar.close()
    sps, noise = estimate_sps(times)
    return SPSProfile([R * n for n in range(1, per_row + 1)], sps,
                      {"target": target.name, "device": str(dev), "dtype": str(target.dtype), "context": context,
                       "batch_size": R, "threads": torch.get_num_threads(), "machine": machine_key(target),
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": repeats,
                       "estimate": f"quantile {SPS_QUANTILE} of the sweeps", "noise": [round(x, 4) for x in noise]})


def cache_root(cache_dir: Optional[Path] = None) -> Path:
    """Where measured profiles (and policies re-tuned from them) are cached: `cache_dir`, $DSPARK_CACHE or
    ~/.cache/dspark."""
    return Path(cache_dir or os.environ.get("DSPARK_CACHE", "~/.cache/dspark")).expanduser()


def load_or_measure_sps(target, max_tokens: int = 32, context: int = 256, cache_dir: Optional[Path] = None,
                        refresh: bool = False, batch_size: int = 1) -> SPSProfile:
    """The cached profile for this target and machine key, measured on first use (and again while the cached
    one fails the plausibility check)."""
    path = cache_root(cache_dir) / f"sps_{profile_key(target, max_tokens, context, batch_size)}.json"
    if path.is_file() and not refresh:
        cached = SPSProfile.load(path)
        why = disturbance(cached)  # a noisy one (flagged in its meta) is the best its measurement got: kept
        if why is None:
            return cached
        print(f"{path}: an SPS(B) profile timed under outside load ({why}); measuring again", file=sys.stderr)
    prof = measure_sps(target, max_tokens, context, batch_size=batch_size)
    prof.save(path)
    return prof


def cost_profile(target, max_tokens: int, context: int, batch_sizes: Sequence[int] = (1,),
                 cache_dir: Optional[Path] = None, refresh: bool = False) -> dict:
    """The cost profile as calibration.json records it: SPS(B) for B = 1..max_tokens on this machine (cached
    profiles), raw and smoothed, batch 1 at the top level with its `machine` key, R > 1 requests (B = R·n
    tokens) under `batches`."""
    out = {}
    for r in sorted(set(batch_sizes) | {1}):
        p = load_or_measure_sps(target, max_tokens, context, cache_dir, refresh, batch_size=r)
        print(f"SPS(B) profile, {r} row{'s' if r > 1 else ''}: {describe_noise(p.tokens, p.meta)}", file=sys.stderr)
        out[r] = {"tokens": list(p.tokens), "steps_per_s": [round(x, 4) for x in smooth_sps(p.steps_per_s)],
                  "raw_steps_per_s": [round(x, 4) for x in p.steps_per_s], "meta": p.meta or {}}
    return {**out[1], "machine": machine_key(target), "batches": {str(r): v for r, v in out.items() if r > 1}}
