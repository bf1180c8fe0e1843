"""The adaptive policy for the machine the decoder runs on (docs/method.md §4; docs/lab-notes.md, 2026-11-30).

calibration.json's adaptive thresholds maximise committed tokens per second under the cost curve SPS(B) of the
machine that ran `dspark calibrate`, recorded with its machine key (`cost_profile.machine`: CPU model or GPU
name, the CPU flags that decide matmul speed, threads, dtype). Under the same key the decoder uses the policy as
tuned. Under another key (another machine, dtype or thread count) it is re-tuned here, not reused blindly:

- SPS(B) is measured on this machine (the cached profiler, `scheduler.cost_profile`);
- the round cost beside the verify forward is measured here (`measure_round_cost`: real decode rounds of plain
  decoding, short and full chains and the probe's tree, so each candidate policy is charged for the nodes it drafts
  and plain decoding for its own bookkeeping, on the cost curve's time scale whatever the load while measuring);
- the tuner's threshold search (adaptive.py, numpy only) re-runs on the held-out rounds calibration.json stores.

The calibrated confidences (the per-slot maps, slotmaps.py) carry over; the cost curve does not. The search takes
seconds to a minute on a CPU, so the re-tuned policy is cached next to the SPS profiles, keyed by the calibration,
the target and the machine.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..policy.adaptive import PLAIN, RoundCost, evaluate_policy, tune_adaptive
from ..policy.calibration import AdaptivePolicy, HeldoutStats, read_calibration
from ..layout import check_version, read_json, write_atomic
from ..policy.slotmaps import read_maps
from .scheduler import SPSProfile, cache_root, cost_profile, machine_key
from .tree import TreePolicy

POLICY_VERSION = 2  # of a cached re-tuned policy (policy_<hash>.json; 2: round costs from real decode rounds)


@torch.no_grad()
def measure_round_cost(generate: Callable, target, drafter, width: int, sps: Callable[[int], float],
                       prompt: Optional[Sequence[int]] = None, max_new_tokens: int = 32, repeats: int = 2
                       ) -> RoundCost:
    """The round cost beside the verify forward on this machine, from real greedy decode rounds (`generate`: the
    SpeculativeDecoder's) of one prompt (default: 64 random tokens): plain decoding, a one-node chain, the full
    chain and the probe-shaped tree (`width` candidates at each of γ depths), `repeats` times in turn.

    Each round's overhead (drafting, mask, acceptance, KV and context update: t_draft + t_book) is divided by how
    much slower than the cost curve the machine ran that round, t_verify·SPS(B) of its own verify forward: outside
    load while measuring moves the overhead and the curve alike, so it does not move the tuner's decision (a profile
    timed quiet and drafting timed under load once made the demo's tuner choose plain decoding). The drafted
    policies' medians (nodes, overhead) give base + per_node·nodes by least squares; plain rounds give `plain`."""
    gamma = drafter.config.block_size
    if prompt is None:
        prompt = torch.randint(0, target.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    policies = {"plain": TreePolicy([1] * gamma, node_budget=0), "chain-1": TreePolicy.chain(1),
                "chain": TreePolicy.chain(gamma),
                "probe": TreePolicy([width] * gamma, beam=1, node_budget=width * gamma)}
    generate(prompt, max_new_tokens=4, policy=policies["probe"], eos_token_id=[])  # warm-up
    rounds: dict[str, list] = {name: [] for name in policies}
    for _ in range(repeats):
        for name, policy in policies.items():
            rounds[name] += generate(prompt, max_new_tokens=max_new_tokens, policy=policy, eos_token_id=[]).rounds

    def overhead(r) -> float:
        return (r.t_draft + r.t_book) / max(r.t_verify * sps(r.verified + 1), 1e-9)
    plain = float(np.median([overhead(r) for r in rounds["plain"]]))
    points = [(float(np.median([r.verified for r in rs])), float(np.median([overhead(r) for r in rs])))
              for name, rs in rounds.items() if name != "plain" and rs]
    n, o = np.array(points).T
    per_node = max(0.0, float(np.polyfit(n, o, 1)[0])) if np.ptp(n) > 0 else 0.0
    base = max(0.0, float(np.mean(o - per_node * n)))
    return RoundCost(base, per_node, plain)


def retune(target, drafter, cal: dict, generate: Callable, cache_dir: Optional[Path] = None) -> dict:
    """Re-run the adaptive threshold search for this machine on calibration.json's held-out rounds (see the
    module docstring). Returns {"policy", "expected", "expected_plain", "round_cost", "cost_profile"}."""
    stats = HeldoutStats.from_dict(cal["data"]["stats"])
    tuning = cal["data"].get("tuning") or {}
    max_width = int(tuning.get("max_width", stats.width))
    max_nodes = int(tuning.get("max_nodes", stats.width * stats.gamma))
    max_b = min(max_nodes, stats.width * stats.gamma) + 1
    context = int(((cal.get("cost_profile") or {}).get("meta") or {}).get("context", 256))
    cost = cost_profile(target, max_b, context, cache_dir=cache_dir)
    sps = SPSProfile(cost["tokens"], cost["steps_per_s"])
    rounds = measure_round_cost(generate, target, drafter, stats.width, sps)
    maps, table = read_maps(cal), sps.table(max_b)
    policy, expected = tune_adaptive(stats, maps, table, max_width, max_nodes, cost=rounds)
    return {"policy": asdict(policy), "expected": expected.to_dict(),
            "expected_plain": evaluate_policy(stats, maps, PLAIN, table, rounds).to_dict(),
            "round_cost": asdict(rounds), "cost_profile": {k: v for k, v in cost.items() if k != "batches"}}


def policy_for_machine(target, drafter, calibration: Union[str, Path, dict], cache_dir: Optional[Path] = None, *,
                       generate: Callable) -> tuple[TreePolicy, dict]:
    """The decoder's adaptive TreePolicy for this machine, and a record of where it came from: `source`
    ("calibration.json" or "re-tuned on this machine"), `why`, this `machine` and the one it was `calibrated_on`,
    the `policy` knobs (plus `expected` tokens/s, the local `cost_profile` and `round_cost` when re-tuned).
    `generate`: the decoder's, which times the decode rounds the round cost is measured from."""
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
        tuned = retune(target, drafter, cal, generate, cache_dir)
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
