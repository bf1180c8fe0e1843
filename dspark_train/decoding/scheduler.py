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

SPS_VERSION = 1  # of the cached profile's JSON


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


def prefix_schedule(survival: Sequence[Sequence[float]], sps: Callable[[int], float], early_stop: bool = True
                    ) -> list[int]:
    """Algorithm 1: per-request verification lengths ℓ_r from prefix survival a_{r,j} (j = 1..γ, non-increasing).

    B counts every verified token including each request's anchor; τ* = R + Σ admitted a_{r,j}."""
    r_count = len(survival)
    cands = sorted(((a, j, r) for r, row in enumerate(survival) for j, a in enumerate(row, 1) if a > 0),
                   key=lambda c: (-c[0], c[1], c[2]))
    ell = [0] * r_count
    best_ell = list(ell)
    b, tau = r_count, float(r_count)
    best = tau * sps(b)
    for a, j, r in cands:
        if j != ell[r] + 1:  # unreachable with non-increasing survival; guards malformed input
            raise ValueError("survival must be non-increasing along each request's positions")
        ell[r] = j
        b += 1
        tau += a
        theta = tau * sps(b)
        if theta > best:
            best, best_ell = theta, list(ell)
        elif early_stop:
            break
    return best_ell


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


@torch.no_grad()
def measure_sps(target, max_tokens: int = 32, context: int = 256, repeats: int = 5, warmup: int = 2,
                batch_size: int = 1, attempts: int = 2) -> SPSProfile:
    """Time one target forward of B new tokens on top of a `context`-token KV cache (median over sweeps).
    batch_size R > 1: R rows of n tokens each, B = R·n ≤ max_tokens (the batched scheduler's case).
    A curve that fails the plausibility check (`disturbance`) is measured again, up to `attempts` times; the
    last one is returned with the reason in `meta["disturbed"]` (not trusted from the cache: see
    `load_or_measure_sps`)."""
    for attempt in range(attempts):
        prof = _measure_once(target, max_tokens, context, repeats, warmup, batch_size)
        why = disturbance(prof)
        if why is None:
            return prof
        print(f"SPS(B) profile disturbed ({why}: something else is using the CPU?); "
              + ("measuring again" if attempt + 1 < attempts else "keeping it, flagged"), file=sys.stderr)
    prof.meta["disturbed"] = why
    return prof


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
    sps = [1.0 / sorted(t)[len(t) // 2] for t in times]
    return SPSProfile([R * n for n in range(1, per_row + 1)], sps,
                      {"target": target.name, "device": str(dev), "dtype": str(target.dtype), "context": context,
                       "batch_size": R, "threads": torch.get_num_threads(), "machine": machine_key(target),
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


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
        if disturbance(cached) is None:
            return cached
        print(f"{path}: a disturbed SPS(B) profile; measuring again", file=sys.stderr)
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
        out[r] = {"tokens": list(p.tokens), "steps_per_s": [round(x, 4) for x in smooth_sps(p.steps_per_s)],
                  "raw_steps_per_s": [round(x, 4) for x in p.steps_per_s], "meta": p.meta or {}}
    return {**out[1], "machine": machine_key(target), "batches": {str(r): v for r, v in out.items() if r > 1}}
