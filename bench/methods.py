"""`make methods`: the method table (the DSpark paper's Table 1 on our own runs): DSpark (Markov head), DFlash,
EAGLE-3 and Medusa trained by our trainer on the same data at an equal wall-clock budget, each evaluated in chain
mode and in its best tree mode on the dev sets.

    python -m bench.methods --minutes 10 [--n 8] [--max-new-tokens 128] [--benchmarks gsm8k,mt-bench,humaneval,mbpp]
                            [--modes chain,tree,adaptive]

Methods run one after another on this machine (equal load as far as the machine is otherwise idle: the 1-minute
load average is recorded around every training). Each is `dspark train` of its recipe (`--recipe` for DSpark,
DFlash (`drafter.head=none`) and Medusa (`drafter.kind=medusa`), `--eagle3-recipe` for EAGLE-3) with
`train.max_minutes` = the budget, then `dspark calibrate` (so the adaptive policy applies; skipped when `--modes`
leaves adaptive out), `dspark export` and `dspark eval` in chain, tree and adaptive modes (greedy, lossless checked
against plain decoding). The best tree mode is the one of higher mean τ over the dev sets. Per method: held-out τ
(the trainer's final evaluation), steps and supervised tokens/s of training, and per dev set τ (accepted tokens per
verify round: the per-token view) and speedup over plain decoding (the per-second view: an autoregressive drafter
pays a forward per drafted depth, DSpark one backbone pass and its head). Runs are reused when their final weights
exist, evaluations when the same command finished (`--fresh` redoes both).
Writes eval/results/methods-<cpu>-<minutes>min.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent
DEV_SETS = "gsm8k,mt-bench,humaneval,mbpp"
METHODS = {  # name -> (which recipe, overrides)
    "dspark-markov": ("recipe", ["drafter.kind=dspark", "drafter.head=markov"]),
    "dflash": ("recipe", ["drafter.kind=dspark", "drafter.head=none"]),
    "eagle3": ("eagle3_recipe", ["drafter.kind=eagle3"]),
    "medusa": ("recipe", ["drafter.kind=medusa", "drafter.init=random"]),
}
TREE_MODES = ("tree", "adaptive")


def dspark(*args: str) -> None:
    """One `dspark` command: `train` in a process of its own (it becomes the accelerate launcher), the others in
    this one (no interpreter and import per command)."""
    print("$ dspark " + " ".join(args), flush=True)
    if args[0] == "train":
        rc = subprocess.run([sys.executable, "-m", "dspark_train.cli", *args]).returncode
    else:
        from dspark_train.cli import main as cli_main
        rc = cli_main(list(args))
    if rc:
        raise SystemExit(f"dspark {' '.join(args)} exited {rc}")


def train(name: str, recipe: str, sets: list[str], root: Path, fresh: bool, calibrate: bool) -> dict:
    """Train (or reuse), calibrate (for the adaptive mode) and export one method; its training summary and the load
    around it."""
    run, artifact, load_file = root / name, root / name / "artifact", root / name / "methods-load.json"
    if fresh or not (run / "final" / "model.safetensors").is_file():
        load = os.getloadavg()[0]
        dspark("train", recipe, *[a for s in [*sets, f"train.output_dir={run}"] for a in ("--set", s)])
        load_file.write_text(json.dumps([round(load, 2), round(os.getloadavg()[0], 2)]))
    if calibrate and (fresh or not (run / "calibration.json").is_file()):
        dspark("calibrate", str(run))
    dspark("export", str(run), str(artifact), "--force")
    summary = json.loads((run / "train_summary.json").read_text())
    return {"run": str(run), "artifact": str(artifact), "steps": summary["steps"],
            "train_seconds": round(summary["train_seconds"], 1),
            "train_tokens_per_s": round(summary["tokens_per_s"], 1),
            "heldout_tau": summary["final"].get("tau"), "heldout_tau_greedy": summary["final"].get("tau_greedy"),
            "heldout_acc_by_position": [round(x, 3) for x in summary["final"].get("acc_by_position") or []],
            "load": json.loads(load_file.read_text()) if load_file.is_file() else None}


def evaluate(artifact: str, mode: str, out: Path, common: list[str], fresh: bool) -> dict:
    """`dspark eval` of one artifact in one mode (reused where the same command already finished there); per dev
    set τ, speedup, tokens/s and losslessness."""
    argv = ["eval", artifact, "--mode", mode, "--baselines", "", "--no-fastest-plain", "--no-progress",
            "--out", str(out), *common]
    stamp = out / "methods-argv.json"
    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == argv and (out / "report.json").is_file():
        print(f"reusing {out}: `dspark {' '.join(argv)}` finished there", flush=True)
    else:
        dspark(*argv)
        stamp.write_text(json.dumps(argv))
    report = json.loads((out / "report.json").read_text())
    return {b: {"tau": r["tau"], "speedup": r["speedup"], "tokens_per_s": r["tokens_per_s"], "lossless": r["lossless"]}
            for b, r in report["benchmarks"].items()}


def mean_tau(per_set: dict) -> float:
    return statistics.fmean(r["tau"] for r in per_set.values())


def table(rows: dict, dev_sets: list[str]) -> list[str]:
    head = "| method | steps | train tok/s | held-out τ | mode | " + " | ".join(f"{b} τ / speedup" for b in dev_sets)
    md = [head + " |", "|---" * (5 + len(dev_sets)) + "|"]
    for name, r in rows.items():
        for label, mode in (("chain", "chain"), ("best tree", r["best_tree_mode"])):
            cells = [f"{r['modes'][mode][b]['tau']:.2f} / {r['modes'][mode][b]['speedup']:.2f}×" for b in dev_sets]
            ht = r["heldout_tau_greedy"]
            md.append(f"| {name} | {r['steps']} | {r['train_tokens_per_s']:.0f} | "
                      f"{'–' if ht is None else f'{ht:.2f}'} | {label} ({mode}) | " + " | ".join(cells) + " |")
    return md


def plot(rows: dict, dev_sets: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(rows))
    for ax, key, label in ((axes[0], "tau", "τ (accepted tokens per round)"), (axes[1], "speedup", "speedup vs plain")):
        for i, (name, r) in enumerate(rows.items()):
            best = r["modes"][r["best_tree_mode"]]
            ax.bar([j + i * width for j in range(len(dev_sets))], [best[b][key] for b in dev_sets], width,
                   label=f"{name} ({r['best_tree_mode']})")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(dev_sets))], dev_sets)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per method")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2_135m.yaml"))
    ap.add_argument("--eagle3-recipe", default=str(REPO / "recipes" / "smollm2_135m_eagle3.yaml"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--benchmarks", default=DEV_SETS)
    ap.add_argument("--n", default="8", help="prompts per dev set")
    ap.add_argument("--max-new-tokens", default="128")
    ap.add_argument("--modes", default="chain,tree,adaptive",
                    help="decoding modes evaluated (chain and at least one tree mode; adaptive needs a calibration)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every method's training (after the budget)")
    ap.add_argument("--runs", default=None, help="run directories (default runs/methods-<minutes>min)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    ap.add_argument("--out", default=None, help="stem (default eval/results/methods-<cpu>-<minutes>min)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)} (known: {', '.join(METHODS)})")
    modes = args.modes.split(",")
    trees = [m for m in TREE_MODES if m in modes]
    if "chain" not in modes or not trees or set(modes) - {"chain", *TREE_MODES}:
        raise SystemExit(f"--modes {args.modes}: chain and at least one of {', '.join(TREE_MODES)}, nothing else")
    budget = f"{args.minutes:g}min"
    root = Path(args.runs or f"runs/methods-{budget}").resolve()
    dev_sets = args.benchmarks.split(",")
    common = ["--benchmarks", args.benchmarks, "--n", args.n, "--max-new-tokens", args.max_new_tokens,
              "--dtype", "float32"]
    rows = {}
    for name in methods:
        which, sets = METHODS[name]
        recipe = getattr(args, which)
        row = train(name, recipe, [*sets, f"train.max_minutes={args.minutes}", "train.max_steps=1000000",
                                   *args.overrides], root, args.fresh, "adaptive" in modes)
        row["recipe"] = recipe
        row["modes"] = {mode: evaluate(row["artifact"], mode, root / name / f"eval-{mode}", common, args.fresh)
                        for mode in ("chain", *trees)}
        row["best_tree_mode"] = max(trees, key=lambda m: mean_tau(row["modes"][m]))
        rows[name] = row
    from dspark_train.hardware import detect
    machine = detect("cpu")
    lossless = all(r["lossless"] for row in rows.values() for m in row["modes"].values() for r in m.values())
    title = f"Method table: {', '.join(rows)} at {budget} of training each"
    md = [f"{machine.describe()}; {budget} wall-clock training per method, one after another; greedy fp32 decoding, "
          f"{args.n} prompts × {args.max_new_tokens} new tokens per dev set; lossless (every output = plain "
          f"greedy): {lossless}", "", *table(rows, dev_sets), "",
          "τ: accepted tokens per verify round, bonus included (per token); speedup: tokens/s over plain decoding "
          "(per second). Training load average (1 min) around each run: "
          + ", ".join(f"{n} {'–'.join(map(str, r['load'])) if r['load'] else 'not recorded'}" for n, r in rows.items()),
          "", "Held-out acceptance by position (the trainer's final evaluation): "
          + "; ".join(f"{n} {' '.join(f'{x:.2f}' for x in r['heldout_acc_by_position'])}" for n, r in rows.items())]
    stem = Path(args.out) if args.out else REPO / "eval" / "results" / f"methods-{machine.slug}-{budget}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, dev_sets, stem.with_suffix(".png"), title)
    write_result(stem, {"minutes": args.minutes, "dev_sets": dev_sets, "n": int(args.n),
                        "max_new_tokens": int(args.max_new_tokens), "lossless": lossless, "methods": rows},
                 "\n".join(md), title, machine.to_dict(), ["python -m bench.methods " + " ".join(sys.argv[1:])])
    print("\n".join(md))
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
