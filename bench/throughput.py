"""Training throughput before/after, side by side in one run: supervised tokens per second of the same drafter on
the same machine, this tree's trainer against an earlier commit's.

    python -m bench.throughput --before /tmp/before-tree [--steps 24] [--rounds 2] [--threads 2]

`--before` is a checkout of the earlier commit (e.g. `git worktree add /tmp/before-tree c3b771b`); each tree's own
bench/profile_step.py (eval/profile_step.py in older trees) profiles its own trainer's step on the same recipe
(recipes/smollm2_135m.yaml, dtype auto), in alternating order over --rounds rounds so drift cancels: before (online
target forward), after (online), after with the feature cache (a later epoch's step: features read from disk).
Writes eval/results/throughput-<cpu>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2_135m.yaml"


def profile(tree: Path, steps: int, threads: int, sets: list[str]) -> dict:
    """One run of `tree`'s profile_step (its own dspark_train first on the path; bench/ in trees since the
    benchmarks became a package, eval/ before); its JSON."""
    script = ["-m", "bench.profile_step"] if (tree / "bench" / "profile_step.py").is_file() else \
        [str(tree / "eval" / "profile_step.py")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile"
        cmd = [sys.executable, *script, str(tree / RECIPE), "--steps", str(steps), "--threads", str(threads),
               "--out", str(out.with_suffix(".json")), *[a for s in sets for a in ("--set", s)]]
        env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        print(proc.stdout, flush=True)
        return json.loads(out.with_suffix(".json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout of the earlier commit")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default=str((REPO / ".." / "shared" / "data").resolve()),
                    help="data.root for both trees (a worktree elsewhere has no ../shared beside it)")
    ap.add_argument("--out", default=None, help="stem (default eval/results/throughput-<cpu>)")
    args = ap.parse_args()
    before = Path(args.before).resolve()
    commit = subprocess.run(["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    here = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    root = [f"data.root={args.data_root}"]
    variants = {f"before ({commit}), online": (before, root), f"after ({here}), online": (REPO, root),
                f"after ({here}), feature cache (epoch ≥ 2)": (REPO, [*root, "data.feature_cache=bfloat16"])}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            tree, sets = variants[name]
            runs[name].append(profile(tree, args.steps, args.threads, sets))
    rows = {}
    for name, ps in runs.items():
        rates = [p["tokens_per_step"] / (p["step_ms"] / 1e3) for p in ps]
        rows[name] = {"tokens_per_s": round(statistics.fmean(rates), 1), "per_round": [round(x, 1) for x in rates],
                      "step_ms": round(statistics.fmean(p["step_ms"] for p in ps), 1),
                      "tokens_per_step": round(statistics.fmean(p["tokens_per_step"] for p in ps), 1)}
    base = rows[next(iter(rows))]["tokens_per_s"]
    for r in rows.values():
        r["ratio"] = round(r["tokens_per_s"] / base, 3)
    from dspark_train.hardware import detect
    machine = detect("cpu")
    md = [f"{machine.describe()}, {RECIPE} (dtype auto), mean of {args.steps} profiled steps "
          f"× {args.rounds} alternating rounds", "",
          "| trainer | ms / step | tokens / step | supervised tok/s | × before |", "|---|---|---|---|---|"]
    md += [f"| {n} | {r['step_ms']:.0f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}× |"
           for n, r in rows.items()]
    cmd = "python " + " ".join(sys.argv)
    stem = Path(args.out) if args.out else REPO / "eval" / "results" / f"throughput-{machine.slug}"
    write_result(stem, {"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "recipe": RECIPE,
                        "rows": rows, "profiles": runs}, "\n".join(md), "Training throughput, before and after",
                 machine.to_dict(), [cmd])
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
