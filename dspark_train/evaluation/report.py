"""The eval report (docs/method.md §7, binding: other tools and the model card read it): its fields computed from
timed samples (τ, acceptance by position, verify rate, tokens/s, speedup, lossless, divergences), the report
dict, report.md, the plots and outputs.jsonl. Measuring is evaluate.py's job; nothing here imports torch.

Definitions: τ = mean committed tokens per verify round, bonus included; acceptance at position k = share of
rounds that verified position k whose drafts 1..k all survived; conditional acceptance = the same given 1..k−1
survived; verify rate = committed ÷ tokens in the verify passes (anchor included); speedup = tokens/s ÷ plain
decoding's tokens/s at the same precision on the same prompts in the same run (the papers' convention);
speedup_vs_fastest_plain = tokens/s ÷ the fastest plain decoding measured among float32/bfloat16 (what a user
of this machine would otherwise run); `lossless` = every greedy output is shown to be plain greedy decoding's, bit
for bit (evaluation/lossless.py; False on any error, None when sampling or when a divergence cannot be shown to
be rounding on this device), `lossless_evidence` = what that rests on. With copy branches (hybrid decoding):
per source (drafter, copy, both = a node both proposed) the verified and accepted draft nodes, acceptance =
accepted ÷ verified, each source's share of the accepted draft tokens, and the share of rounds that skipped the
drafter's forward.

Long because the report's fields, report.md and its tables (lossless evidence, the tuner's expectation beside the
measurement) are one schema read in one place; the plots are a few lines each.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..policy.calibration import Calibration, plot_reliability
from ..hardware import Capabilities
from ..layout import REPORT_JSON, REPORT_MD, atomic_path, write_atomic

ACCEPTANCE_PLOT, SPEEDUP_PLOT, RELIABILITY_PLOT = "acceptance_by_position.png", "speedup.png", "reliability.png"
SETTINGS = ("temperature", "mode", "hybrid", "top_p", "top_k", "seed", "max_new_tokens", "multi_turn",  # EvalConfig
            "truncate_prompts")
SOURCES = ("drafter", "copy", "both")  # who proposed a draft node (decoding.decoder.SOURCE_NAMES)


# --------------------------------------------------------------------------- fields from timed samples
@dataclass
class RoundStat:
    """One draft-verify round of a speculative decoder."""

    verified: int  # tokens in the target's verify pass: the anchor plus every drafted node
    accepted: int  # drafted tokens accepted (the bonus/correction token excluded)
    depth: int  # draft positions that were verified (chain: drafted length; tree: deepest level)
    sources: Optional[dict] = None  # hybrid: {source: [verified nodes, accepted nodes]}
    skipped: bool = False  # hybrid: a confident copy match made the drafter's forward unnecessary
    seconds: float = 0.0  # the round's measured time (draft + verify + bookkeeping): decode-only tokens/s


@dataclass
class Sample:
    """One timed generation of one method on one prompt turn."""

    ids: list[int]
    seconds: float
    rounds: list[RoundStat] = field(default_factory=list)
    record: Any = None  # decoding.record.PassRecord of a greedy pass, until the lossless check has used it
    check: Optional[dict] = None  # evaluation/lossless.py's verdict on this generation


def acceptance_metrics(rounds: Sequence[RoundStat]) -> dict:
    """τ (bonus included), prefix survival and conditional acceptance by position, verify rate.

    Position k's denominators count only rounds that verified position k, so adaptive depths are not
    read as rejections. Survival: accepted ≥ k. Conditional: accepted ≥ k given accepted ≥ k−1.
    """
    if not rounds:
        return {"tau": None, "accept_rate_by_position": [], "conditional_accept_by_position": [],
                "verify_rate": None, "rounds": 0}
    depth = max(r.depth for r in rounds)
    survival, conditional = [], []
    for k in range(1, depth + 1):
        reached = [r for r in rounds if r.depth >= k]
        survived = sum(r.accepted >= k for r in reached)
        survival.append(survived / len(reached))
        alive = sum(r.accepted >= k - 1 for r in reached)
        conditional.append(survived / alive if alive else None)
    committed = sum(r.accepted + 1 for r in rounds)
    out = {"tau": committed / len(rounds), "accept_rate_by_position": survival,
           "conditional_accept_by_position": conditional,
           "verify_rate": committed / sum(r.verified for r in rounds), "rounds": len(rounds)}
    if any(r.sources is not None for r in rounds):
        out.update(source_metrics(rounds))
    return out


def source_metrics(rounds: Sequence[RoundStat]) -> dict:
    """Per source: verified and accepted draft nodes, acceptance (accepted ÷ verified), share of all accepted
    draft tokens; the share of rounds that skipped the drafter's forward."""
    totals = {s: [0, 0] for s in SOURCES}
    for r in rounds:
        for s, (v, a) in (r.sources or {}).items():
            totals[s][0] += v
            totals[s][1] += a
    accepted = sum(a for _, a in totals.values())
    return {"sources": {s: {"verified": v, "accepted": a, "acceptance": a / v if v else None,
                            "share_of_accepted": a / accepted if accepted else None} for s, (v, a) in totals.items()},
            "drafter_skipped_rounds": sum(r.skipped for r in rounds) / len(rounds)}


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (a length difference counts), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _throughput(samples: Sequence[Sample]) -> tuple[int, float, float]:
    tokens = sum(len(s.ids) for s in samples)
    seconds = sum(s.seconds for s in samples)
    return tokens, seconds, tokens / seconds if seconds > 0 else 0.0


def method_metrics(plain: list[list[Sample]], ours: list[list[Sample]], greedy: bool, drafter: bool = True) -> dict:
    """Metrics of one method against plain decoding on one benchmark; samples are [prompt][turn].

    `drafter`: add acceptance statistics and the divergences (prompt, turn, position, tokens; the caller adds
    the target's top-2 logit gap). A prompt agrees when all its turns are identical."""
    flat_plain = [s for turns in plain for s in turns]
    flat_ours = [s for turns in ours for s in turns]
    tokens, seconds, tps = _throughput(flat_ours)
    base_tokens, base_seconds, base_tps = _throughput(flat_plain)
    same = [all(p.ids == o.ids for p, o in zip(pt, ot)) for pt, ot in zip(plain, ours)]
    out = {"n_prompts": len(plain), "n_generations": len(flat_ours)}
    if drafter:
        out.update(acceptance_metrics([r for s in flat_ours for r in s.rounds]))
    out.update({
        "tokens_per_s": tps, "baseline_tokens_per_s": base_tps,
        "speedup": tps / base_tps if base_tps > 0 else None,
        "lossless": all(same) if greedy else None,
        "agreement": sum(same) / len(same),
        "generated_tokens": tokens, "seconds": seconds,
        "baseline_generated_tokens": base_tokens, "baseline_seconds": base_seconds,
    })
    if drafter:  # sampled outputs differ by design: no divergence analysis
        out["divergences"] = None if not greedy else [
            {"prompt": i, "turn": turn, "position": pos, "plain_token": _at(p.ids, pos),
             "drafter_token": _at(o.ids, pos)}
            for i, (pt, ot) in enumerate(zip(plain, ours)) for turn, (p, o) in enumerate(zip(pt, ot))
            if (pos := first_divergence(p.ids, o.ids)) is not None]
    return out


def fastest_plain(plain_by_dtype: dict[str, list[list[Sample]]]) -> dict:
    """Plain decoding's tokens/s per dtype (samples [prompt][turn]) and the fastest of them."""
    tps = {d: _throughput([s for turns in samples for s in turns])[2] for d, samples in plain_by_dtype.items()}
    best = max(tps, key=tps.get)
    return {"plain_tokens_per_s_by_dtype": tps, "fastest_plain": {"dtype": best, "tokens_per_s": tps[best]}}


def speedup_over(tokens_per_s: float, fastest: dict) -> Optional[float]:
    """tokens/s ÷ the fastest plain decoding's (`fastest_plain`'s record)."""
    base = fastest["fastest_plain"]["tokens_per_s"]
    return tokens_per_s / base if base > 0 else None


def _at(ids: Sequence[int], i: int) -> Optional[int]:
    return ids[i] if i < len(ids) else None


# --------------------------------------------------------------------------- the report
def assemble(per_drafter: dict[str, dict], drafters: dict[str, dict], settings, environment: dict) -> dict:
    """The §7 report: the first drafter's fields at the top level, every drafter under `drafters`.

    per_drafter[name][benchmark]: method_metrics' entry (plus the target's top-2 gaps and the baselines);
    drafters[name]: {"drafter", "calibration", kind, head, block_size}; settings: the run's EvalConfig
    (its SETTINGS fields are copied); environment: target, device, device_name, machine (hardware.Capabilities),
    dtype, dtype_choice (what was asked, chosen and why), threads, versions, exact_attention (how many layers
    verified row-exact and why, evaluate.exact_attention_choice), generation_rules (decoding/rules.py)."""
    primary = next(iter(drafters))
    env = environment
    return {
        "target": env["target"], "drafter": drafters[primary]["drafter"], "device": env["device"],
        "device_name": env["device_name"], "machine": env.get("machine"), "dtype": env["dtype"],
        "dtype_choice": env.get("dtype_choice"),
        **{k: getattr(settings, k) for k in SETTINGS}, "threads": env["threads"],
        "benchmarks": per_drafter[primary],
        "drafters": {name: {**{k: v for k, v in info.items() if k != "calibration"},
                            "calibration": calibration_summary(info.get("calibration")),
                            "benchmarks": per_drafter[name]} for name, info in drafters.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": env["versions"],
        "exact_attention": env.get("exact_attention"), "generation_rules": env.get("generation_rules"),
    }


def calibration_summary(cal: Optional[dict]) -> Optional[dict]:
    if cal is None:
        return None
    keys = ("maps", "temperatures", "biases", "ece_before", "ece_after", "auroc_before", "auroc_after", "adaptive")
    return {k: cal[k] for k in keys if k in cal}


def write_outputs(measured: Sequence, tok, path: Path) -> None:
    """One line per benchmark prompt turn: the prompt and every method's ids, text and seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for m in measured:
            for i, turns in enumerate(m.prompts):
                for turn, prompt in enumerate(turns):
                    row = {"benchmark": m.benchmark.name, "prompt": i, "turn": turn,
                           "prompt_text": tok.decode(prompt),
                           "outputs": {name: {"ids": s[i][turn].ids, "text": tok.decode(s[i][turn].ids),
                                              "seconds": s[i][turn].seconds} for name, s in m.samples.items()}}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- report files


def _fmt(x, spec=".2f", none="—") -> str:
    return none if x is None else format(x, spec)


def lossless_cell(e: dict, dtype: str) -> str:
    """The lossless column: yes (every output identical, the checks bit-exact); yes with the divergences shown to
    be rounding; unproven; **NO** with the errors."""
    if e["lossless"] is None and e.get("divergences") is None:
        return "n/a (sampling)"
    ev = e.get("lossless_evidence") or {}
    if e["lossless"] is False:
        n = ev.get("errors", "?")
        return f"**NO** ({n} error{'s' if n != 1 else ''})"
    if e["lossless"] is None:
        return f"unproven ({dtype}: {ev.get('unproven')} divergence{'s' if ev.get('unproven') != 1 else ''})"
    n = ev.get("rounding") or 0
    return f"yes ({dtype}: {n} rounding divergence{'s' if n != 1 else ''}, replayed exactly)" if n else "yes"


def lossless_errors(report: dict) -> list[str]:
    """Every failed lossless check: '<drafter> <benchmark> prompt i turn t: what differed'."""
    return [f"{name} {b} {m}" for name, dr in report["drafters"].items() for b, e in dr["benchmarks"].items()
            for m in (e.get("lossless_evidence") or {}).get("mismatches", [])]


def _evidence(report: dict) -> list[str]:
    """What the lossless column rests on (evaluation/lossless.py), in one paragraph."""
    ex = report.get("exact_attention")
    evs = [e.get("lossless_evidence") for dr in report["drafters"].values() for e in dr["benchmarks"].values()]
    evs = [x for x in evs if x]
    if not evs:
        return []
    tokens, slots = sum(x["tokens_compared"] for x in evs), sum(x["cache_slots_compared"] for x in evs)
    layers = max(x["cache_layers_compared"] for x in evs)
    text = (f"Lossless evidence: every emitted token is the argmax of the logits row the decoder computed for it, "
            f"and up to the first differing token ({tokens} tokens) the decoder's KV cache equals plain decoding's "
            f"bit for bit in {layers} layer{'s' if layers != 1 else ''} ({slots} slots)")
    if ex:
        every = ex["layers"] >= ex["of"]
        text += (f"; verification attention row-exact in {ex['layers']} of {ex['of']} layers ({ex['reason']})"
                 + (", so every chosen logits row equals plain decoding's bit for bit" if every else ""))
        m = ex.get("measured") or {}
        if m:
            text += (f". Measured here: a stock verify pass of {m['tokens']} tokens {m['stock_ms']:.1f} ms, with the "
                     f"first layer row-exact {m['check_ms']:.1f} ms, every layer {m['exact_ms']:.1f} ms (a decode "
                     f"step {m['step_ms']:.1f} ms)")
    replays = sum(x["replays"] for x in evs)
    if replays:
        text += (f". {replays} diverging output{'s were' if replays != 1 else ' was'} decoded again with row-exact "
                 "attention in every layer (untimed) and compared in full")
    rules = report.get("generation_rules") or {}
    if rules.get("honoured") or rules.get("disabled"):
        text += (f". The target's generation_config: {rules.get('honoured') or 'nothing'} applied by both sides; "
                 f"{rules.get('disabled') or 'nothing'} turned off for both (the decoder cannot reproduce it)")
    return ["", text + "."]


def render_markdown(report: dict) -> str:
    """report.md: settings, one table per drafter, acceptance by position, divergences, comparison."""
    turns = "all turns" if report["multi_turn"] else "first turn"
    machine = report.get("machine")
    where = (Capabilities.from_dict(machine).describe() if machine else
             f"{report['device']} ({report['device_name']}, {report['threads']} threads)")
    choice = report.get("dtype_choice") or {}
    dtype = report["dtype"] + (f" ({choice['setting']}: {choice['reason']})" if choice.get("setting") == "auto" else "")
    lines = [f"# Speculative decoding eval: {report['drafter']} on {report['target']}", "",
             f"machine {where} · dtype {dtype} · temperature {report['temperature']} · mode {report['mode']}"
             f"{' + copy branches' if report.get('hybrid') and report['mode'] != 'hybrid' else ''} · "
             f"max_new_tokens {report['max_new_tokens']} · {turns}", "",
             "speedup: against plain decoding at the same precision (the papers' convention); × fastest plain: "
             "against the fastest plain decoding measured here among float32/bfloat16 (what this machine would "
             "otherwise run).", ""]
    for name, drafter in report["drafters"].items():
        baselines = sorted({b for e in drafter["benchmarks"].values() for b in e["baselines"]})
        lines += [f"## {name}", "",
                  "| benchmark | prompts | τ | verify rate | tok/s | plain tok/s | speedup | fastest plain tok/s | "
                  "× fastest plain | lossless | agreement |" + "".join(f" {b} tok/s (×) |" for b in baselines),
                  "|" + "---|" * (11 + len(baselines))]
        for bname, e in drafter["benchmarks"].items():
            lossless = lossless_cell(e, report["dtype"])
            fastest = e.get("fastest_plain") or {}
            cells = [bname, str(e["n_prompts"]), _fmt(e["tau"]), _fmt(e["verify_rate"]), _fmt(e["tokens_per_s"], ".1f"),
                     _fmt(e["baseline_tokens_per_s"], ".1f"), _fmt(e["speedup"], ".2f") + "×",
                     f"{_fmt(fastest.get('tokens_per_s'), '.1f')} ({fastest.get('dtype', '—')})",
                     _fmt(e.get("speedup_vs_fastest_plain"), ".2f") + "×", lossless, _fmt(e["agreement"], ".0%")]
            cells += [f"{_fmt(e['baselines'][b]['tokens_per_s'], '.1f')} ({_fmt(e['baselines'][b]['speedup'])}×"
                      + (f", τ {_fmt(e['baselines'][b]['tau'])}" if e["baselines"][b].get("tau") else "") + ")"
                      if b in e["baselines"] else "—" for b in baselines]
            lines.append("| " + " | ".join(cells) + " |")
        depth = max((len(e["accept_rate_by_position"]) for e in drafter["benchmarks"].values()), default=0)
        if depth:
            lines += ["", "Acceptance by position (prefix survival / conditional):", "",
                      "| benchmark | " + " | ".join(str(k) for k in range(1, depth + 1)) + " |",
                      "|" + "---|" * (depth + 1)]
            for bname, e in drafter["benchmarks"].items():
                pairs = list(zip(e["accept_rate_by_position"], e["conditional_accept_by_position"]))
                cells = [f"{_fmt(s)} / {_fmt(c)}" for s, c in pairs] + ["—"] * (depth - len(pairs))
                lines.append(f"| {bname} | " + " | ".join(cells) + " |")
        lines += _source_table(drafter["benchmarks"])
        divs = [(b, x) for b, e in drafter["benchmarks"].items() for x in e["divergences"] or []]
        if divs:
            lines += ["", f"Divergences from plain greedy ({len(divs)}): first differing position, each pass's own "
                      "top-2 logit gap there, and the verdict (rounding: the output replayed with row-exact "
                      "attention in every layer is plain decoding's, bit for bit):", ""]
            lines += [f"- {b} prompt {x['prompt']} turn {x['turn']}: position {x['position']}: "
                      + ("**ERROR**" if x.get("kind") == "error" else str(x.get("kind")))
                      + f", top-2 gap plain {_fmt(x.get('plain_gap'), '.4f')} / ours "
                      + _fmt(x.get("drafter_gap"), ".4f")
                      + (f" ({x['mismatch']})" if x.get("mismatch") else "")
                      for b, x in divs]
        lines += _tuner_table(drafter["benchmarks"])
        policy = drafter.get("adaptive_policy")
        if policy:
            lines += ["", f"Adaptive policy: {_policy_text(policy.get('policy') or {})}; from {policy['source']} "
                      f"({policy['why']})."]
        cal = drafter.get("calibration")
        if cal and cal.get("ece_before"):
            pairs = ", ".join(f"{_fmt(b, '.1%')} → {_fmt(a, '.1%')}"
                              for b, a in zip(cal["ece_before"], cal["ece_after"]))
            lines += ["", f"Confidence calibration (ECE by position, before → after STS): {pairs}"]
        lines.append("")
    lines += _evidence(report)
    if len(report["drafters"]) > 1:
        names = list(report["drafters"])
        lines += ["## Comparison (τ / speedup / × fastest plain)", "", "| benchmark | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for bname in report["benchmarks"]:
            es = [report["drafters"][n]["benchmarks"][bname] for n in names]
            cells = [f"{_fmt(e['tau'])} / {_fmt(e['speedup'])}× / {_fmt(e.get('speedup_vs_fastest_plain'))}×"
                     for e in es]
            lines.append(f"| {bname} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _source_table(benchmarks: dict) -> list[str]:
    """Where accepted draft tokens came from, and each source's acceptance (accepted ÷ verified nodes)."""
    rows = [(b, e["sources"], e["drafter_skipped_rounds"]) for b, e in benchmarks.items() if e.get("sources")]
    if not rows:
        return []

    def cell(x):
        return f"{_fmt(x['share_of_accepted'], '.0%')} ({x['accepted']}/{x['verified']} = {_fmt(x['acceptance'])})"
    lines = ["", "Accepted draft tokens by source: share of all accepted (accepted / verified nodes = acceptance; "
             "both = nodes the drafter and the copy drafter proposed alike):", "",
             "| benchmark | drafter | copy | both | rounds without a drafter forward |", "|---|---|---|---|---|"]
    lines += [f"| {b} | {cell(src['drafter'])} | {cell(src['copy'])} | {cell(src['both'])} | {_fmt(skip, '.0%')} |"
              for b, src, skip in rows]
    return lines


def _tuner_table(benchmarks: dict) -> list[str]:
    """The adaptive tuner's expected tokens/s and speedup next to the measured ones (decode-only; evaluation/
    expectation.py)."""
    rows = [(b, e["tuner"]) for b, e in benchmarks.items() if e.get("tuner")]
    if not rows:
        return []
    lines = ["", f"The tuner's expectation ({rows[0][1]['source']}; decode-only tok/s, held-out τ "
             f"{_fmt(rows[0][1]['expected_tau'])}) against this run's measurement of the tuned policy; the cost model "
             "applied to each dev set's own measured rounds isolates the cost model from the difference in τ:", "",
             "| benchmark | expected tok/s | measured tok/s (τ) | expected ÷ measured | cost model at this τ "
             "(÷ measured) | expected speedup | measured speedup |", "|---|---|---|---|---|---|---|"]
    for b, t in rows:
        lines.append(f"| {b} | {_fmt(t['expected_tokens_per_s'], '.1f')} | "
                     f"{_fmt(t['measured_decode_tokens_per_s'], '.1f')} ({_fmt(t['measured_tau'])}) | "
                     f"{_fmt(t['expected_over_measured'])} | "
                     f"{_fmt(t.get('cost_model_tokens_per_s'), '.1f')} ({_fmt(t.get('cost_model_over_measured'))}) | "
                     f"{_fmt(t['expected_speedup'])}× | {_fmt(t['measured_speedup'])}× |")
    return lines


def _policy_text(p: dict) -> str:
    if p.get("node_budget") == 0:
        return "plain decoding (no draft pays under this machine's cost curve)"
    width = p.get("max_width", 1)
    return (f"depth threshold {_fmt(p.get('depth_threshold'))}, width {width}"
            + (f" where top draft prob < {p['width_threshold']}" if width > 1 and p.get("width_threshold") else "")
            + f", node budget {p.get('node_budget')}")


def write_report(report: dict, out: Path, calibration: Optional[dict]) -> list[Path]:
    """report.json, report.md and the PNG plots; returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / REPORT_MD, render_markdown(report))
    return plot_report(report, out, calibration)


def plot_report(report: dict, out: Path, calibration: Optional[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    benches = list(report["benchmarks"])
    drafters = report["drafters"]

    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], benches):
        for i, (name, drafter) in enumerate(drafters.items()):
            e = drafter["benchmarks"][b]
            ks = range(1, len(e["accept_rate_by_position"]) + 1)
            color = f"C{i}"
            ax.plot(ks, e["accept_rate_by_position"], "o-", color=color, label=f"{name} survival")
            ax.plot(ks, [c if c is not None else float("nan") for c in e["conditional_accept_by_position"]],
                    "x--", color=color, alpha=0.6, label=f"{name} conditional")
        ax.set_title(f"{b} (τ " + ", ".join(_fmt(dr['benchmarks'][b]['tau']) for dr in drafters.values()) + ")")
        ax.set_xlabel("draft position k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("acceptance")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / ACCEPTANCE_PLOT))

    bars = {name: [dr["benchmarks"][b]["speedup"] for b in benches] for name, dr in drafters.items()}
    for base in sorted({x for e in report["benchmarks"].values() for x in e["baselines"]}):
        bars[base] = [report["benchmarks"][b]["baselines"].get(base, {}).get("speedup") for b in benches]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(benches) * max(1, len(bars)) / 2), 3.6))
    width = 0.8 / len(bars)
    for i, (name, ys) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(benches))]
        bars_i = ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=name, color=f"C{i}")
        ax.bar_label(bars_i, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel(f"speedup vs plain {report['dtype']} decoding")
    ax.set_title(f"{report['target']} · {report['device']} · T={report['temperature']} · {report['mode']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / SPEEDUP_PLOT))

    if calibration and calibration.get("reliability"):  # the calibrator's own diagram, from calibration.json
        paths.append(plot_reliability(Calibration.from_json(calibration), out / RELIABILITY_PLOT))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
