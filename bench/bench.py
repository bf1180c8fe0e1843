"""`make bench`: DSpark (chain, tree, adaptive, hybrid) vs DFlash vs Medusa vs prompt lookup on the embedded default.

Trains the two baselines with the demo's recipe, data and step budget (`--set drafter.head=none`,
`--set drafter.kind=medusa`), reusing runs that already finished, then measures everything side by side with
the eval harness. Writes runs/bench/report.{json,md} (chain-mode comparison) and runs/bench/{tree,adaptive}/;
runs/bench/hybrid/ has hybrid adaptive next to drafter-only adaptive, prompt lookup and copy drafting alone.
Usage: python -m bench.bench [--n 6] [--max-new-tokens 96] [--benchmarks gsm8k,mt-bench]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dspark_train.demo import RECIPE, run
from dspark_train.layout import REPORT_MD, WEIGHTS, RunDir
from dspark_train.runrecord import read_run

REPO = Path(__file__).resolve().parent.parent

BASELINES = {"dflash": ["drafter.head=none"], "medusa": ["drafter.kind=medusa", "drafter.init=random"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", default="runs/demo")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--n", default="6")
    p.add_argument("--max-new-tokens", default="96")
    p.add_argument("--benchmarks", default="gsm8k,mt-bench")
    args = p.parse_args()
    dspark = [sys.executable, "-m", "dspark_train.cli"]
    demo, out = RunDir(args.demo_dir), Path(args.out)  # relative to the repo root, as `make bench` runs
    if not (REPO / demo.artifact / WEIGHTS).is_file():
        run([sys.executable, "-m", "dspark_train.demo"])
    # same budget as the DSpark drafter (its wall-clock minutes and step cap): the demo run's resolved recipe, with
    # only the drafter kind changed
    demo_recipe = read_run(REPO / demo.root).recipe
    budget = [f"train.max_steps={demo_recipe.train.max_steps}",
              f"train.max_minutes={demo_recipe.train.max_minutes or 'null'}",
              f"data.conversations={demo_recipe.data.conversations}"]
    artifacts = []
    for name, change in BASELINES.items():
        baseline = RunDir(out / name)
        sets = [a for s in [f"train.output_dir={baseline.root}", *budget, *change] for a in ("--set", s)]
        if not (REPO / baseline.final / WEIGHTS).is_file():
            run(dspark + ["train", RECIPE] + sets)
        if not (REPO / baseline.artifact / WEIGHTS).is_file():
            run(dspark + ["export", str(baseline.root), str(baseline.artifact), "--force"])
        artifacts.append(str(baseline.artifact))
    common = ["--n", args.n, "--max-new-tokens", args.max_new_tokens, "--benchmarks", args.benchmarks]
    run(dspark + ["eval", str(demo.artifact), "--mode", "chain", "--compare", *artifacts,
                  "--out", str(out)] + common)
    for mode in ("tree", "adaptive"):
        run(dspark + ["eval", str(demo.artifact), "--mode", mode, "--baselines", "",
                      "--out", str(out / mode)] + common)
    # hybrid: copy branches merged into the adaptive trees, with the same drafter without them, prompt lookup
    # and our copy drafter alone measured in the same run
    run(dspark + ["eval", str(demo / "artifact"), "--mode", "hybrid", "--baselines",
                  "prompt-lookup,drafter-only,copy-only", "--out", str(out / "hybrid")] + common)
    for sub in ("", "tree", "adaptive", "hybrid"):
        print(f"\n## {sub or 'chain (DSpark vs DFlash vs Medusa)'}\n")
        print((REPO / out / sub / REPORT_MD).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
