"""The adaptive policy for the machine the decoder runs on (docs/method.md §4; docs/lab-notes.md, 2026-11-30).

calibration.json's adaptive thresholds maximise committed tokens per second under the cost curve SPS(B) of the
machine that ran `dspark calibrate`, recorded with its machine key (`cost_profile.machine`: CPU model or GPU
name, the CPU flags that decide matmul speed, threads, dtype). Under the same key the decoder uses the policy as
tuned. Under another key (another machine, dtype or thread count) it is re-tuned here, not reused blindly:

- SPS(B) is measured on this machine (the cached profiler, `scheduler.cost_profile`);
- the round cost beside the verify forward is measured here (`measure_round_cost`: drafting rounds at width 1 and
  at the probe's width, so each candidate policy is charged for the nodes it drafts; the held-out rounds'
  bookkeeping, measured on the calibrating machine, scaled by the ratio of drafting times);
- the tuner's threshold search (adaptive.py, numpy only) re-runs on the held-out rounds calibration.json stores.

The calibrated confidences (the per-slot maps, slotmaps.py) carry over; the cost curve does not. The search takes
seconds to a minute on a CPU, so the re-tuned policy is cached next to the SPS profiles, keyed by the calibration,
the target and the machine.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..policy.adaptive import RoundCost, tune_adaptive
from ..policy.calibration import AdaptivePolicy, HeldoutStats, read_calibration
from ..layout import check_version, read_json, write_atomic
from ..policy.slotmaps import read_maps
from .sampling import SamplingParams
from .scheduler import SPSProfile, cache_root, cost_profile, machine_key
from .tree import TreePolicy, draft_tree

POLICY_VERSION = 1  # of a cached re-tuned policy (policy_<hash>.json)


@torch.no_grad()
def measure_draft_seconds(target, drafter, width: int, context: int = 64, repeats: int = 7, warmup: int = 2
                          ) -> float:
    """Median seconds of one probe-shaped drafting round on this machine: the backbone pass, the sequential head
    expanding `width` candidates at each of γ depths, and the context extension by one committed position."""
    dev = target.device
    ids = torch.randint(0, target.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(dev)
    out = target.forward_features(ids)
    state = drafter.init_state(batch_size=1)
    drafter.extend_context(state, out.features, out.last_hidden, ids)
    gamma = drafter.config.block_size
    probe = TreePolicy([width] * gamma, beam=1, node_budget=width * gamma)
    greedy = SamplingParams(0.0, 1.0, 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        draft_tree(drafter, state, int(ids[0, -1]), probe, greedy, gamma)
        drafter.extend_context(state, out.features[:, -1:], out.last_hidden[:, -1:], ids[:, -1:])
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def measure_round_cost(target, drafter, width: int, stats: Optional[HeldoutStats] = None,
                       scale: float = 1.0) -> RoundCost:
    """The round cost model on this machine: drafting rounds timed at width 1 and `width` (γ depths each) give a
    base (backbone, context extension) and a per-node cost (head steps); the held-out rounds' bookkeeping (mask,
    acceptance, cache update; their median, times `scale` when it was measured on another machine) joins the
    base."""
    gamma = drafter.config.block_size
    one = measure_draft_seconds(target, drafter, 1)
    wide = measure_draft_seconds(target, drafter, width) if width > 1 else one
    per_node = max(0.0, (wide - one) / ((width - 1) * gamma)) if width > 1 else 0.0
    book = float(np.nanmedian(stats.t_book)) * scale if stats is not None and len(stats) else 0.0
    return RoundCost(max(0.0, one - per_node * gamma) + book, per_node)


def retune(target, drafter, cal: dict, cache_dir: Optional[Path] = None) -> dict:
    """Re-run the adaptive threshold search for this machine on calibration.json's held-out rounds (see the
    module docstring). Returns {"policy", "expected", "cost_profile", "draft_time_scale"}."""
    stats = HeldoutStats.from_dict(cal["data"]["stats"])
    tuning = cal["data"].get("tuning") or {}
    max_width = int(tuning.get("max_width", stats.width))
    max_nodes = int(tuning.get("max_nodes", stats.width * stats.gamma))
    max_b = min(max_nodes, stats.width * stats.gamma) + 1
    context = int(((cal.get("cost_profile") or {}).get("meta") or {}).get("context", 256))
    cost = cost_profile(target, max_b, context, cache_dir=cache_dir)
    sps = SPSProfile(cost["tokens"], cost["steps_per_s"]).table(max_b)
    recorded = float(np.nanmedian(stats.t_draft)) if len(stats) else 0.0
    scale = measure_draft_seconds(target, drafter, stats.width) / recorded if recorded > 0 else 1.0
    rounds = measure_round_cost(target, drafter, stats.width, stats, scale)
    policy, expected = tune_adaptive(stats, read_maps(cal), sps, max_width, max_nodes, cost=rounds)
    return {"policy": asdict(policy), "expected": expected.to_dict(), "draft_time_scale": round(scale, 4),
            "round_cost": asdict(rounds), "cost_profile": {k: v for k, v in cost.items() if k != "batches"}}


def policy_for_machine(target, drafter, calibration: Union[str, Path, dict], cache_dir: Optional[Path] = None
                    ) -> tuple[TreePolicy, dict]:
    """The decoder's adaptive TreePolicy for this machine, and a record of where it came from: `source`
    ("calibration.json" or "re-tuned on this machine"), `why`, this `machine` and the one it was `calibrated_on`,
    the `policy` knobs (plus `expected` tokens/s, the local `cost_profile` and `draft_time_scale` when
    re-tuned)."""
    cal = read_calibration(calibration)
    gamma = drafter.config.block_size
    here, there = machine_key(target), (cal.get("cost_profile") or {}).get("machine")
    info = {"machine": here, "calibrated_on": there}
    stats = (cal.get("data") or {}).get("stats")
    if there == here or not stats or not (cal.get("maps") or cal.get("temperatures")):
        why = ("its cost profile was measured on this machine" if there == here else
               "it stores no held-out rounds to re-tune on (its policy is used as is)")
        return TreePolicy.from_calibration(cal, gamma), {
            **info, "source": "calibration.json", "why": why,
            "policy": asdict(AdaptivePolicy.from_json(cal.get("adaptive") or {}, gamma))}
    blob = json.dumps([POLICY_VERSION, [m.to_json() for m in read_maps(cal)], cal["data"].get("tuning"), stats,
                       here, target.fingerprint(), torch.__version__], sort_keys=True, default=str)
    path = cache_root(cache_dir) / f"policy_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    why = (f"calibration.json was tuned on {_describe(there)}, this is {_describe(here)}: the cost curve does "
           "not carry over")
    if path.is_file():
        tuned = read_json(path)
        check_version(tuned, path, POLICY_VERSION, "delete it to re-tune")
    else:
        print(f"adaptive policy: {why}; re-tuning on this machine (SPS(B) and drafting measured here, the "
              "threshold search re-run on the stored held-out rounds; cached)", file=sys.stderr, flush=True)
        tuned = retune(target, drafter, cal, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"format_version": POLICY_VERSION, **tuned}, indent=1))
    tuned.pop("format_version", None)
    policy = TreePolicy.from_calibration({**cal, "adaptive": tuned["policy"]}, gamma)
    return policy, {**info, "source": "re-tuned on this machine", "why": why, **tuned}


def _describe(key: Optional[dict]) -> str:
    if not key:
        return "an unrecorded machine"
    threads = f", {key['threads']} threads" if key.get("threads") else ""
    flags = f" ({', '.join(key['flags'])})" if key.get("flags") else ""
    return f"{key['device']} {key['name']}{flags}{threads}, {key['dtype']}"
