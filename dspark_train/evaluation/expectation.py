"""The adaptive tuner's expectation next to what `dspark eval` measures, per dev set.

The tuner (policy/adaptive.py) picks the policy with the most expected tokens/s: held-out rounds replayed under the
machine's cost model (SPS(B) and the measured round cost). If that expectation is far from the measurement, its
choice (chain depth, trees, or plain decoding) is made on the wrong numbers. Two comparisons per dev set, both
decode-only (prefill excluded, as the tuner's): the tuner's figure for the held-out rounds against the measured
tokens/s (different texts: τ differs per dev set), and the cost model applied to this dev set's own measured rounds
(its τ and verified tokens) against the same measurement, which isolates the cost model's error. Also the
expected speedup over plain decoding against the measured one.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..decoding.scheduler import SPSProfile
from ..policy.adaptive import RoundCost
from .report import RoundStat


def tuner_record(adaptive_info: Optional[dict], calibration: Optional[dict]) -> Optional[dict]:
    """What the tuner expected for the adaptive policy a decoder used: the re-tuned record (decoder.adaptive_info
    when re-tuned on this machine), else calibration.json's own (tuned under this machine key)."""
    info = adaptive_info or {}
    if info.get("expected"):
        return {"source": info.get("source"), "policy": info.get("policy") or {}, "expected": info["expected"],
                "plain": info.get("expected_plain"), "round_cost": info.get("round_cost"),
                "cost_profile": info.get("cost_profile")}
    cal = calibration or {}
    if info.get("source") == "calibration.json" and (cal.get("expected") or {}).get("adaptive"):
        tuning = (cal.get("data") or {}).get("tuning") or {}
        return {"source": "calibration.json", "policy": cal.get("adaptive") or {},
                "expected": cal["expected"]["adaptive"], "plain": cal["expected"].get("plain"),
                "round_cost": tuning.get("round_cost"), "cost_profile": cal.get("cost_profile")}
    return None


def compare(record: dict, rounds: Sequence[RoundStat], measured_speedup: Optional[float]) -> dict:
    """Expected vs measured for one dev set's rounds (RoundStat.seconds: each round's measured time)."""
    tokens = sum(r.accepted + 1 for r in rounds)
    seconds = sum(r.seconds for r in rounds)
    measured = tokens / seconds if seconds > 0 else None
    expected = record["expected"]["tokens_per_s"]
    plain = (record.get("plain") or {}).get("tokens_per_s")
    out = {"source": record["source"], "expected_tokens_per_s": expected, "expected_tau": record["expected"]["tau"],
           "measured_decode_tokens_per_s": measured, "measured_tau": tokens / len(rounds) if rounds else None,
           "expected_over_measured": expected / measured if measured else None,
           "expected_speedup": expected / plain if plain else None, "measured_speedup": measured_speedup}
    cost, curve = RoundCost.from_json(record.get("round_cost")), record.get("cost_profile") or {}
    if cost is not None and curve.get("tokens") and rounds:
        sps = SPSProfile(curve["tokens"], curve["steps_per_s"])
        drafting = record["policy"].get("node_budget", 1) > 0  # as the tuner charges: every round drafts, or none
        model = sum((float(cost.seconds(r.verified - 1)) if drafting else cost.plain) + 1.0 / sps(r.verified)
                    for r in rounds)
        out["cost_model_tokens_per_s"] = tokens / model
        out["cost_model_over_measured"] = out["cost_model_tokens_per_s"] / measured if measured else None
    return out


def add_tuner_checks(per_drafter: dict, measured: Sequence, drafters: dict, drafter_only: bool) -> None:
    """`tuner` in each benchmark entry of a drafter that decoded with a tuned adaptive policy: `compare` on its
    rounds (in hybrid runs the drafter-only baseline's: that is the tuned policy; the copy branches are not)."""
    for i, (name, info) in enumerate(drafters.items()):
        record = tuner_record(info.get("adaptive_policy"), info.get("calibration"))
        if record is None:
            continue
        alone = drafter_only and i == 0  # the baselines run beside the first drafter only
        for m in measured:
            entry = per_drafter[name][m.benchmark.name]
            rounds = [r for turns in m.samples["drafter-only" if alone else name] for s in turns for r in s.rounds]
            entry["tuner"] = compare(record, rounds,
                                     entry["baselines"]["drafter-only"]["speedup"] if alone else entry["speedup"])
