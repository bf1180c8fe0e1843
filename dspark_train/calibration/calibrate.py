"""`dspark calibrate`: held-out acceptance statistics → sequential temperature scaling → cost profile →
adaptive-k tuning → calibration.json (read by the decoder's `adaptive` mode, the eval harness and the card).

This module is the command; each step lives in a module named for it: heldout.py (which prompts, greedy
answers, anchor replay, probe traces), sts.py (temperature scaling) with metrics.py (ECE/AUROC/Brier),
adaptive.py (the exact replay and the threshold search), calibration.py (the file's schema, its table and
reliability diagram). The cost profile is the decoder's SPS(B) profiler, smoothed here.

Why each step (paper §3.2, docs/method.md §4):
- The confidence head predicts c_k = P(draft k survives | 1..k−1 survived). The scheduler needs the absolute
  value of the prefix survival a_k = Π_{i≤k} c_i, and raw heads are over-confident, so STS fits one
  temperature per slot, left to right, minimising the 20-bin ECE of a_k with the earlier ones fixed; by
  default jointly with an offset b_k (c_k = σ(z_k/T_k + b_k)), because the head is trained on the soft
  sampling label Σ min(p_t, p_d) and a temperature cannot move its mean onto greedy acceptance. Where that
  still leaves a cross-fitted ECE above `calibrate.map_threshold`, `calibrate.map: auto` lets the slot use
  Platt or isotonic instead if they do better on held-out texts (sts.fit_maps; `map: sts` is the paper's).
- ECE over 20 bins needs many samples: a perfectly calibrated score still shows ~4 % ECE on 700 rounds. The
  STS statistics therefore come from the target's own greedy answers to held-out prompts, with greedy
  drafting replayed at every anchor (`anchor_stats`: one target forward per answer, tens of thousands of
  blocks in minutes on a CPU), not from one decode round per sample.
- Whether verifying more tokens pays depends on the machine: SPS(B), target steps per second at B verified
  tokens, is profiled once per machine key (CPU model or GPU name, CPU flags, threads, dtype: the decoder's
  `cost_profile`, cached), smoothed to be non-increasing, and recorded with its key. The decoder re-tunes the
  policy on these held-out rounds where it runs under another key (decoding/retune.py).
- Depth and width thresholds are chosen to maximise committed tokens per second, Σ τ / Σ round time, on the
  held-out rounds themselves; plain decoding is a candidate, so the policy never expects to lose to it.
- The dtype (`calibrate.dtype`, default auto) is bf16 only where the hardware computes it (hardware.py).

The adaptive-k statistics come from one greedy *probe* decode per held-out prompt (its rounds start where
the previous round stopped, and carry measured drafting times): a beam-1 tree whose spine is exactly
the chain (full depth γ, so every position's survival is observed) and which also offers the top-W
siblings at every depth. Because the decoder's adaptive policy with beam 1 only ever prunes that tree
(depth by the calibrated survival, width by the top draft probability, a node budget), its τ and verified
size on each held-out round can be replayed exactly for any thresholds (`adaptive.simulate`), without
re-decoding.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..policy.adaptive import PLAIN, best_fixed_chain, evaluate_policy, tune_adaptive
from ..drafters.loading import load_local
from ..policy.calibration import AdaptivePolicy, Calibration, plot_reliability, summary_table
from ..hardware import detect
from ..decoding import SpeculativeDecoder, SPSProfile, TreePolicy, cost_profile
from ..decoding.retune import measure_round_cost
from .heldout import anchor_stats, copy_prior, greedy_texts, heldout_prompts, stats_from_traces
from ..layout import CALIBRATION_STATS, RunDir
from ..runlock import holds_lock
from ..runrecord import read_run
from .sts import BIAS_GRID, fit_maps, position_metrics, text_folds
from ..target import load_target


# =========================================================================== the command
def _measure(decoder, prompts: list[list[int]], max_new_tokens: int, **kw) -> tuple[dict, list]:
    """Decode every prompt; τ and decode-only tokens/s (prefill excluded, as in the simulation)."""
    traces = [decoder.generate(p, max_new_tokens=max_new_tokens, **kw) for p in prompts]
    return _summary(traces), traces


def _summary(traces: list) -> dict:
    """τ, verified tokens per round, decode-only and end-to-end tokens/s of some decode traces."""
    rounds = [r for trace in traces for r in trace.rounds]
    secs = sum(r.t_draft + r.t_verify + r.t_book for r in rounds)
    committed = sum(r.committed for r in rounds)
    return {"tau": round(sum(r.n_accepted + 1 for r in rounds) / max(1, len(rounds)), 4),
            "verified": round(sum(r.verified + 1 for r in rounds) / max(1, len(rounds)), 4),
            "tokens_per_s": round(committed / secs, 4) if secs else 0.0,
            "end_to_end_tokens_per_s": round(sum(len(tr.tokens) for tr in traces)
                                             / sum(tr.t_total for tr in traces), 4),
            "rounds": len(rounds), "tokens": committed}


GUARD_PROMPTS = 8  # probe prompts the plain-vs-drafting check decodes (only when the tuner picks plain decoding)


def guard_plain(decoder, prompts: list[list[int]], max_new_tokens: int, drafting: AdaptivePolicy, maps, gamma: int
                ) -> dict:
    """The tuner's pick of plain decoding, checked by measurement: plain decoding and the best drafting policy
    decode the same prompts in turn (order alternating per prompt, so drift hits both alike); decode-only tokens/s
    of each (prefill excluded, as the tuner's expectation) and which is chosen: drafting wherever it measures
    faster, so a cost curve timed under load cannot make the artifact slower than its own drafter."""
    pols = {"plain": TreePolicy([1] * gamma, node_budget=0),
            "drafting": TreePolicy([drafting.max_width] * gamma, drafting.beam, drafting.node_budget, maps,
                                   drafting.depth_threshold, drafting.width_threshold)}
    traces: dict[str, list] = {name: [] for name in pols}
    for i, p in enumerate(prompts):
        for name in (list(pols) if i % 2 == 0 else list(pols)[::-1]):
            traces[name].append(decoder.generate(p, max_new_tokens=max_new_tokens, policy=pols[name]))
    out = {name: _summary(trs) for name, trs in traces.items()}
    out["chosen"] = "drafting" if out["drafting"]["tokens_per_s"] > out["plain"]["tokens_per_s"] else "plain"
    out["prompts"] = len(prompts)
    return out


@holds_lock(lambda run_or_artifact, overrides=(), prompts=None, out=None, quiet=False: out or run_or_artifact,
            "dspark calibrate")
def run_calibration(run_or_artifact: Union[str, Path], overrides: Sequence[str] = (), prompts: Optional[int] = None,
                    out: Optional[Union[str, Path]] = None, quiet: bool = False) -> Calibration:
    """Calibrate a training run (<run>/final + recipe.yaml) or an exported artifact in place: writes
    calibration.json and the reliability PNG next to the weights' recipe (or into `out`)."""
    t_start = time.perf_counter()
    record = read_run(run_or_artifact, overrides)
    root, recipe = record.root, record.recipe
    cc = recipe.calibrate
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    recipe.target.dtype = cc.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = load_target(recipe.target, device)  # calibrate.dtype auto: bf16 only where the hardware computes it
    target.model.to(device)
    drafter = load_local(root, target)
    gamma = drafter.config.block_size
    width = cc.max_width
    names, prompt_list, source = heldout_prompts(record, target.tokenizer, max(prompts or cc.prompts, cc.texts))
    probe_prompts = prompt_list[:prompts or cc.prompts]
    caps = detect(device)
    say(f"calibrating {root}: {len(prompt_list)} held-out prompts ({source}), γ={gamma}, probe width {width}, "
        f"dtype {target.precision}, {caps.describe()}")

    # 1. STS statistics: the target's greedy answers, with greedy drafting replayed at every anchor
    # (and the copy drafter's acceptance prior, copy drafting replayed over the same answers)
    sts_stats, sts_source, copy = None, "probe rounds", {}
    if cc.texts:
        t0 = time.perf_counter()
        texts = greedy_texts(target, prompt_list[:cc.texts], cc.max_new_tokens, cc.batch_size, progress=not quiet)
        sts_stats = anchor_stats(target, drafter, texts, progress=not quiet)
        sts_source = f"anchor replay over greedy answers to {len(texts)} prompts"
        copy = copy_prior(texts).to_dict()
        say(f"{sts_source}: {len(sts_stats)} blocks in {time.perf_counter() - t0:.1f}s")

    # 2. probe decode: the chain at full depth plus top-W siblings at every depth
    decoder = SpeculativeDecoder(target, drafter)
    probe = TreePolicy([width] * gamma, beam=1, node_budget=width * gamma)
    decoder.generate(probe_prompts[0], max_new_tokens=min(8, cc.max_new_tokens), policy=probe)  # warm-up
    t0 = time.perf_counter()
    probe_measured, traces = _measure(decoder, probe_prompts, cc.max_new_tokens, policy=probe, record_probs=True)
    stats = stats_from_traces(traces, gamma, width)
    say(f"probe decode: {len(stats)} rounds on {len(probe_prompts)} prompts, τ {probe_measured['tau']:.2f} in "
        f"{time.perf_counter() - t0:.1f}s")
    if sts_stats is None:
        sts_stats = stats

    # sequential calibration: STS per slot, or Platt/isotonic where STS's cross-fitted ECE stays too high
    t0 = time.perf_counter()
    z, y, obs = sts_stats.conf_logits, sts_stats.survived(), sts_stats.observed()
    fit = fit_maps(z, y, obs, cc.temperature_grid, cc.bins, BIAS_GRID if cc.bias else None, cc.map,
                   cc.map_threshold, text_folds(sts_stats.text, len(sts_stats)))
    maps, fit_s = fit.maps, time.perf_counter() - t0
    say(f"calibration maps ({cc.map}): " + ", ".join(m.kind for m in maps) + f" in {fit_s:.1f}s")
    before = position_metrics(z, y, obs, [], cc.bins)
    after = position_metrics(z, y, obs, maps, cc.bins)
    on_probe = position_metrics(stats.conf_logits, stats.survived(), stats.observed(), maps, cc.bins)

    # 3. cost profile
    max_b = min(cc.max_nodes, width * gamma) + 1
    cost = cost_profile(target, max_b, context=cc.profile_context, batch_sizes=cc.profile_batch_sizes)
    curve = SPSProfile(cost["tokens"], cost["steps_per_s"], cost.get("meta"))  # smoothed: non-increasing in B
    sps = curve.table(max_b)

    # 4. adaptive-k tuning on the held-out rounds, each policy charged the round cost of the nodes it drafts
    # (measured from real decode rounds, on the cost curve's time scale), plain decoding its own bookkeeping
    rounds = measure_round_cost(decoder.generate, target, drafter, width, curve, prompt=probe_prompts[0])
    policy, expected = tune_adaptive(stats, maps, sps, cc.max_width, cc.max_nodes, cost=rounds)
    chain_d, chain_expected = best_fixed_chain(stats, sps, rounds)
    guard = None
    if policy.node_budget == 0:  # never plain where the drafter measures faster: decode both, side by side
        drafting, drafting_expected = tune_adaptive(stats, maps, sps, cc.max_width, cc.max_nodes, cost=rounds,
                                                    plain=False)
        guard = guard_plain(decoder, probe_prompts[:GUARD_PROMPTS], cc.max_new_tokens, drafting, maps, gamma)
        guard["expected"] = {"plain": expected.to_dict(), "drafting": drafting_expected.to_dict()}
        say(f"the tuner chose plain decoding; measured plain {guard['plain']['tokens_per_s']:.1f} tok/s vs the best "
            f"drafting policy {guard['drafting']['tokens_per_s']:.1f} tok/s: "
            + ("keeping plain" if guard["chosen"] == "plain" else "drafting"))
        if guard["chosen"] == "drafting":
            policy, expected = drafting, drafting_expected

    cal = Calibration(
        block_size=gamma, temperatures=fit.temperatures, biases=fit.biases, maps=[m.to_json() for m in maps],
        ece_crossfit=fit.crossfit,
        ece_before=before["ece"], ece_after=after["ece"], auroc_before=before["auroc"], auroc_after=after["auroc"],
        brier_before=before["brier"], brier_after=after["brier"], adaptive=asdict(policy), copy=copy,
        expected={"adaptive": expected.to_dict(), "best_chain_depth": chain_d, "best_chain": chain_expected.to_dict(),
                  "plain": evaluate_policy(stats, maps, PLAIN, sps, rounds).to_dict()},
        cost_profile=cost, reliability={"before": before["reliability"], "after": after["reliability"]},
        data={"source": str(root), "heldout": source, "prompt_ids": names, "n_prompts": len(prompt_list),
              "sts": {"source": sts_source, "blocks": len(sts_stats), "map": cc.map, "map_threshold": cc.map_threshold,
                      "folds": "alternate held-out texts" if sts_stats.text is not None else "halves of the rows",
                      "seconds": round(fit_s, 1),
                      **({"file": CALIBRATION_STATS} if sts_stats is not stats else {})}, "count": after["count"],
              "max_new_tokens": cc.max_new_tokens, "decoding": "greedy", "dtype": target.precision.value,
              "hardware": {"machine": caps.to_dict(), "dtype": target.precision.to_dict()},
              "tuning": {"max_width": cc.max_width, "max_nodes": cc.max_nodes, "round_cost": asdict(rounds),
                         **({"guard": guard} if guard else {})},
              "probe": {"width": width, "beam": 1, "depth": gamma, "prompts": len(probe_prompts),
                        "rounds": len(stats), "ece_after": on_probe["ece"], "auroc_after": on_probe["auroc"]},
              "target": target.fingerprint(), "threads": torch.get_num_threads(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stats": stats.to_dict()})

    # 5. measure: the tuned adaptive policy and the best fixed chain, same prompts
    if cc.measure:
        tuned = SpeculativeDecoder(target, drafter, calibration=cal.to_json())
        cal.measured = {"probe": probe_measured,
                        "adaptive": _measure(tuned, probe_prompts, cc.max_new_tokens, mode="adaptive")[0],
                        "best_chain": _measure(decoder, probe_prompts, cc.max_new_tokens,
                                               policy=TreePolicy.chain(chain_d))[0]}
    else:
        cal.measured = {"probe": probe_measured}

    dest = RunDir(out if out else root)
    dest.root.mkdir(parents=True, exist_ok=True)
    if sts_stats is not stats:
        sts_stats.save(dest.calibration_stats)
    cal.data["seconds"] = round(time.perf_counter() - t_start, 1)  # the whole command, measure included
    cal.save(dest.calibration)
    plot_reliability(cal, dest.reliability_plot)
    say(summary_table(cal))
    say(f"wrote {dest.calibration} and {dest.reliability_plot} ({cal.data['seconds']:.0f}s)")
    return cal
