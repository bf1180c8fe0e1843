"""A long training run as committed data: its held-out curve and its dev-set eval, with the [P] goals checked.

    python -m bench.long_run runs/smollm2_135m_long --eval runs/smollm2_135m_long/eval/report.json
        [--out eval/results/long-<cpu>]

Reads the run's metrics.jsonl (every held-out evaluation: training minutes, supervised tokens, τ_greedy, τ_sim,
L1, acceptance by position), train_summary.json and the `dspark eval --mode adaptive --hybrid` report; writes
<out>.json (everything, with the commands that made it), <out>.md (tables) and <out>.png (τ against training
minutes; acceptance by position at the end). The goals: held-out τ_greedy ≥ 2.0; the drafter alone (adaptive,
no copy branches) faster than prompt lookup on GSM8K and MT-Bench; in hybrid mode the drafter supplies ≥ 40 % of
the accepted draft tokens on GSM8K; the tuned adaptive policy drafts (node budget > 0) rather than decode plainly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_train.hardware import Capabilities, detect
from dspark_train.layout import RunDir, read_jsonl
from dspark_train.runrecord import read_run
from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent


def curve(run: RunDir) -> list[dict]:
    """One row per held-out evaluation, in training order (a resumed run's re-logged steps: the last record)."""
    rows = {}
    for r in read_jsonl(run.metrics, skip_bad=True, quiet=True):
        if "eval/tau_greedy" in r:
            acc = [r[f"eval/acc_{k}"] for k in range(1, 65) if f"eval/acc_{k}" in r]
            rows[r["step"]] = {"step": r["step"], "minutes": r["eval/train_seconds"] / 60, "tokens": r["eval/tokens"],
                               "tau_greedy": r["eval/tau_greedy"], "tau_sim": r["eval/tau"], "l1": r["eval/l1"],
                               "acc_by_position": acc, "at_minutes": r.get("eval/at_minutes")}
    return [rows[s] for s in sorted(rows)]


def dev_sets(report: dict) -> dict:
    """Per benchmark: hybrid adaptive, the drafter alone and prompt lookup (speedup, τ), the drafter's share of
    accepted draft tokens in hybrid mode (alone and counting nodes both proposed), lossless."""
    name = next(iter(report["drafters"]))
    out = {}
    for bench, e in report["drafters"][name]["benchmarks"].items():
        src = e.get("sources") or {}
        share = lambda *keys: sum((src.get(k) or {}).get("share_of_accepted") or 0.0 for k in keys)  # noqa: E731
        b = e.get("baselines") or {}
        out[bench] = {"prompts": e["n_prompts"], "hybrid": {"speedup": e["speedup"], "tau": e["tau"],
                                                            "tokens_per_s": e["tokens_per_s"]},
                      "drafter_only": {k: (b.get("drafter-only") or {}).get(k) for k in ("speedup", "tau")},
                      "prompt_lookup": {"speedup": (b.get("prompt-lookup") or {}).get("speedup")},
                      "copy_only": {k: (b.get("copy-only") or {}).get(k) for k in ("speedup", "tau")},
                      "drafter_share": share("drafter"), "drafter_or_both_share": share("drafter", "both"),
                      "plain_tokens_per_s": e["baseline_tokens_per_s"], "lossless": e["lossless"],
                      "near_ties": e.get("near_ties", 0), "accept_rate_by_position": e["accept_rate_by_position"]}
    return out


def goals(rows: list[dict], sets: dict, policy: dict) -> dict:
    final = rows[-1]["tau_greedy"] if rows else None
    beats = {b: (s["drafter_only"]["speedup"] or 0) > (s["prompt_lookup"]["speedup"] or 0)
             for b, s in sets.items() if b in ("gsm8k", "mt-bench")}
    return {"heldout_tau_greedy_ge_2": {"value": final, "met": final is not None and final >= 2.0},
            "drafter_alone_beats_prompt_lookup": {"value": beats, "met": bool(beats) and all(beats.values())},
            "drafter_share_ge_40pct_gsm8k": {"value": (sets.get("gsm8k") or {}).get("drafter_or_both_share"),
                                             "met": ((sets.get("gsm8k") or {}).get("drafter_or_both_share") or 0)
                                             >= 0.4},
            "tuner_drafts": {"value": policy.get("node_budget"), "met": (policy.get("node_budget") or 0) > 0}}


def markdown(data: dict) -> str:
    m = Capabilities.from_dict(data["machine"]).describe() if data.get("machine") else "unknown machine"
    s = data["summary"]
    lines = [f"# Long run: {data['run']} ({m})", "",
             f"{s['steps']} steps, {s['tokens'] / 1e6:.2f}M supervised tokens, "
             f"{s['train_seconds'] / 3600:.2f} training hours ({s['tokens_per_s']:.0f} tok/s), "
             f"{s.get('epochs', 0):.1f} epochs of {s['train_sequences']} "
             "sequences.", "", "| training minutes | tokens | τ_greedy | τ_sim | L1 |", "|---|---|---|---|---|"]
    for r in data["curve"]:
        if r.get("at_minutes") or r is data["curve"][-1] or r is data["curve"][0]:
            lines.append(f"| {r['minutes']:.1f} | {r['tokens'] / 1e6:.2f}M | {r['tau_greedy']:.3f} | "
                         f"{r['tau_sim']:.3f} | {r['l1']:.3f} |")
    if data.get("dev_sets"):
        lines += ["", f"Dev sets (`dspark eval --mode adaptive --hybrid`, {data['eval_dtype']}): speedup over plain "
                  "decoding, τ in parentheses.", "",
                  "| benchmark | prompts | hybrid | drafter alone | prompt lookup | copy alone | drafter share "
                  "(+ shared nodes) | lossless |", "|---|---|---|---|---|---|---|---|"]
        f = lambda x, spec=".2f": "—" if x is None else format(x, spec)  # noqa: E731
        for b, d in data["dev_sets"].items():
            lines.append(f"| {b} | {d['prompts']} | {f(d['hybrid']['speedup'])}× ({f(d['hybrid']['tau'])}) | "
                         f"{f(d['drafter_only']['speedup'])}× ({f(d['drafter_only']['tau'])}) | "
                         f"{f(d['prompt_lookup']['speedup'])}× | {f(d['copy_only']['speedup'])}× "
                         f"({f(d['copy_only']['tau'])}) | {f(d['drafter_share'], '.0%')} "
                         f"({f(d['drafter_or_both_share'], '.0%')}) | {d['lossless']}"
                         + (f" ({d['near_ties']} near-ties)" if d.get("near_ties") else "") + " |")
        lines += ["", f"Adaptive policy on this machine: {data.get('policy')}"]
    lines += ["", "Goals:", ""] + [f"- {k}: {'met' if g['met'] else 'MISSED'} ({g['value']})"
                                    for k, g in data["goals"].items()]
    lines += ["", "Commands:", ""] + [f"    {c}" for c in data["commands"]]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["curve"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["minutes"] for r in rows], [r["tau_greedy"] for r in rows], "o-", label="τ_greedy (held-out)")
    a.plot([r["minutes"] for r in rows], [r["tau_sim"] for r in rows], "s--", label="τ_sim (soft)")
    a.axhline(2.0, color="grey", lw=0.8, ls=":")
    a.set_xlabel("training minutes")
    a.set_ylabel("τ")
    a.legend()
    a.set_title("held-out τ during training")
    acc = rows[-1]["acc_by_position"]
    b.bar(range(1, len(acc) + 1), acc)
    b.set_xlabel("block position")
    b.set_ylabel("held-out acceptance (soft)")
    b.set_title(f"acceptance by position at {rows[-1]['minutes']:.0f} min")
    fig.suptitle(Capabilities.from_dict(data["machine"]).describe() if data.get("machine") else "")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--eval", default=None, help="report.json of `dspark eval` on the run's artifact")
    ap.add_argument("--command", action="append", default=[], help="a command that made the inputs (repeatable)")
    ap.add_argument("--out", default=None, help="output stem (default eval/results/long-<cpu>)")
    args = ap.parse_args()
    run = RunDir(args.run)
    summary = json.loads(run.train_summary.read_text())
    rows = curve(run)
    report = json.loads(Path(args.eval).read_text()) if args.eval else None
    sets = dev_sets(report) if report else {}
    name = next(iter(report["drafters"])) if report else None
    policy = ((report or {}).get("drafters", {}).get(name) or {}).get("adaptive_policy") or {}
    batch = read_run(run.root).recipe.train.batch_size
    summary["epochs"] = summary["steps"] * batch * summary.get("world_size", 1) / max(1, summary["train_sequences"])
    machine = (report or {}).get("machine") or detect("cpu").to_dict()  # the eval's, else this machine's
    data = {"run": args.run, "machine": machine, "training_machine": (summary.get("hardware") or {}).get("machine"),
            "summary": summary, "curve": rows,
            "dev_sets": sets, "eval_dtype": (report or {}).get("dtype"), "policy": policy.get("policy"),
            "goals": goals(rows, sets, policy.get("policy") or {}),
            "commands": args.command or ["python " + " ".join(sys.argv)]}
    slug = Capabilities.from_dict(machine).slug
    stem = Path(args.out or REPO / "eval" / "results" / f"long-{slug}")
    write_result(stem, data, markdown(data), f"The long recipe: {args.run}", machine, data["commands"])
    plot(data, stem.with_suffix(".png"))
    print(markdown(data))
    print(f"written {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
