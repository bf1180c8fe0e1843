"""Training throughput of drafter kinds side by side: supervised tokens per second of the demo recipe's DSpark
drafter and of the same recipe's EAGLE-3 drafter, on one machine, in alternating runs.

    python -m bench.kind_throughput [--steps 12] [--rounds 3] [--threads 1]

Each run is bench/profile_step.py in its own process (the trainer's own setup, data and loss; the time of each
phase of a step), on recipes/smollm2_135m.yaml and recipes/smollm2_135m_eagle3.yaml, each online (epoch 1: the
target's forward in every step) and from the feature cache (a later epoch: features read from disk, so the step
is the drafter's and the ratio is the drafters' own); the order alternates from round to round so that drift and
other processes' load fall on all. The 1-minute load average is recorded before and after every run: on a
shared machine the spread over rounds says how far to trust a ratio.
Writes eval/results/throughput-kinds-<cpu>.{json,md}. `--dspark`/`--eagle3` name other recipes (each run sets its
drafter.kind: `--dspark tiny --eagle3 tiny` compares the kinds on the tiny recipe).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent

RECIPES = {"dspark": "recipes/smollm2_135m.yaml", "eagle3": "recipes/smollm2_135m_eagle3.yaml"}
FEEDS = {"online": [], "feature cache": ["data.feature_cache=bfloat16"]}


def profile(recipe: str, steps: int, threads: int, sets: list[str], peak_size: int) -> dict:
    """One bench.profile_step run of `recipe` (a path or a shipped name) in a fresh process; its JSON plus the load
    around it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile"
        cmd = [sys.executable, "-m", "bench.profile_step", recipe, "--steps", str(steps), "--threads", str(threads),
               "--peak-size", str(peak_size), "--out", str(out), *[a for x in sets for a in ("--set", x)]]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(threads)}
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        print(proc.stdout, flush=True)
        return {**json.loads(out.with_suffix(".json").read_text()), "load_before": load,
                "load_after": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=str((REPO / ".." / "shared" / "data").resolve()))
    ap.add_argument("--dspark", default=str(REPO / RECIPES["dspark"]), help="the DSpark recipe")
    ap.add_argument("--eagle3", default=str(REPO / RECIPES["eagle3"]), help="the EAGLE-3 recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to both recipes")
    ap.add_argument("--peak-size", type=int, default=2048, help="profile_step's matmul peak size")
    ap.add_argument("--out", default=None, help="stem (default eval/results/throughput-kinds-<cpu>)")
    args = ap.parse_args()
    recipes = {"dspark": args.dspark, "eagle3": args.eagle3}
    variants = {f"{kind}, {feed}": (kind, sets) for feed, sets in FEEDS.items() for kind in recipes}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            kind, sets = variants[name]
            runs[name].append(profile(recipes[kind], args.steps, args.threads,
                                      [f"data.root={args.data_root}", f"drafter.kind={kind}", *args.overrides, *sets],
                                      args.peak_size))
    rows = {}
    for kind, ps in runs.items():
        rates = [p["tokens_per_s"] for p in ps]
        phases = {name: round(statistics.fmean(p["phases"][name]["ms"] for p in ps), 1) for name in ps[0]["phases"]}
        rows[kind] = {"tokens_per_s": round(statistics.fmean(rates), 1), "per_round": [round(x, 1) for x in rates],
                      "step_ms": round(statistics.fmean(p["step_ms"] for p in ps), 1),
                      "tokens_per_step": round(statistics.fmean(p["tokens_per_step"] for p in ps), 1),
                      "phases_ms": phases, "load": [[round(p["load_before"], 1), round(p["load_after"], 1)]
                                                    for p in ps]}
    ratios = {}
    for feed in FEEDS:
        a, b = rows[f"dspark, {feed}"], rows[f"eagle3, {feed}"]
        pairs = [x / y for x, y in zip(a["per_round"], b["per_round"])]
        ratios[feed] = {"mean": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                        "per_round": [round(x, 3) for x in pairs], "min": round(min(pairs), 3),
                        "max": round(max(pairs), 3)}
    from dspark_train.hardware import detect
    machine = detect("cpu")
    loads = [x for r in rows.values() for pair in r["load"] for x in pair]
    md = [f"{machine.describe()}, {args.threads} thread(s), demo recipe (dtype auto), mean of {args.steps} profiled "
          f"steps × {args.rounds} alternating rounds; 1-min load average {min(loads):.1f}–{max(loads):.1f} on "
          f"{os.cpu_count()} cores during the runs", "",
          "| drafter | ms / step | tokens / step | supervised tok/s | per round |", "|---|---|---|---|---|"]
    md += [f"| {k} | {r['step_ms']:.0f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
           + ", ".join(f"{x:.0f}" for x in r["per_round"]) + " |" for k, r in rows.items()]
    md += [""] + [f"DSpark / EAGLE-3 tokens/s, {feed}: {r['mean']:.2f}× (rounds {r['min']:.2f}–{r['max']:.2f}×)"
                  for feed, r in ratios.items()]
    phases = list(dict.fromkeys(name for r in rows.values() for name in r["phases_ms"]))
    md += ["", "| phase (ms / step) | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    md += [f"| {name} | " + " | ".join(f"{r['phases_ms'].get(name, 0):.0f}" for r in rows.values()) + " |"
           for name in phases]
    stem = Path(args.out) if args.out else REPO / "eval" / "results" / f"throughput-kinds-{machine.slug}"
    write_result(stem, {"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "recipes": recipes,
                        "rows": rows, "ratio_dspark_over_eagle3": ratios, "profiles": runs}, "\n".join(md),
                 "Training throughput: DSpark vs EAGLE-3 drafters", machine.to_dict(),
                 ["python -m bench.kind_throughput " + " ".join(sys.argv[1:])])
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
