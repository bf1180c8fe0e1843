"""Under load and at temperature ([T]): the serving-condition measurements of a drafter, as committed result files.

    python -m bench.load runs/demo/artifact --run runs/demo                 # all three parts, the [T] goals checked

Parts (`--parts`, default all), each the `dspark` commands a user would type, run back to back on one machine:

- `concurrency`: `dspark eval ARTIFACT --concurrency 1,2,4,8,16 --benchmarks gsm8k,mt-bench,humaneval,mbpp --n 16
  --max-new-tokens 64 --no-progress` (greedy): per dev set and R, speculative (load-aware scheduler, batched
  drafting) against the faster of our batched plain decoding and transformers' batched generate; the
  speedup-vs-R plot. Writes eval/results/concurrency-<cpu>.{json,md,png}.
- `temperature`: `dspark eval ARTIFACT --mode adaptive --hybrid --temperature T --baselines drafter-only
  --no-fastest-plain --n 8 --max-new-tokens 64` for T = 0, 0.7, 1.0: τ and speedup per dev set (hybrid and the
  drafter alone), and, from the greedy run, the tuner's expected tokens/s next to the measured. Writes
  eval/results/temperature-<cpu>.{json,md}.
- `stability`: `dspark calibrate RUN --out DIR` three times, each with its own SPS(B) cache (DSPARK_CACHE), the
  second while another process keeps one core busy: the adaptive policy each chooses, its expected tokens/s, the
  profile's noise, the plain-vs-drafting check where it ran. Writes eval/results/calibration-stability-<cpu>.{json,md}.

Goals checked (on the CPU the files name): speculative ≥ 0.98× plain at every R, ≥ 1.3× at R = 4 on GSM8K, every
request identical (greedy, fp32); the drafter's forward per round at R = 16 ≤ 3× its time at R = 1; at T = 1 hybrid
≥ 1.35× on GSM8K and HumanEval, ≥ 1.1× on MT-Bench; the tuner's expectation within 10 % of the measurement (the
cost model on each dev set's own rounds, and the held-out figure against all dev sets pooled); the same policy in
all calibrations.

Run time on a 2-core AVX2 EPYC (SmolLM2-135M fp32, the demo drafter), estimated from plain decoding at ~13 tok/s
at R = 1 and a demo calibration's ~6.5 min there (eval/results/history-2026-12-01-amd-epyc-avx2-demo.json):
concurrency ~40 min (SPS profiles for 5 row counts, then per dev set 16 requests × ≤ 64 tokens × 3 decoders × 5 R,
~9 min), temperature ~25 min (3 evals × 4 dev sets × 8 prompts × 3 decoders), stability ~25 min (3 calibrations, one
slowed by the busy core): about 1.5 h. Run it on a quiet machine: every figure is a wall-clock measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dspark_train.artifacts.reader import HUB_ID
from dspark_train.hardware import Capabilities
from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = "gsm8k,mt-bench,humaneval,mbpp"
PARTS = ("concurrency", "temperature", "stability")
HOG = "while True: pass"  # another process keeping one core busy


def dspark(*args: str, env: dict | None = None) -> str:
    """`python -m dspark_train.cli ARGS` in the current directory, printed first; its stdout (stops on failure)."""
    cmd = [sys.executable, "-m", "dspark_train.cli", *args]
    shown = "dspark " + " ".join(args)
    print(f"\n$ {shown}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shown}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def concurrency(args, work: Path) -> tuple[dict, str, list[str], Path]:
    out = work / "concurrency"
    cmd = [args.artifact, "--concurrency", args.concurrency, "--benchmarks", args.benchmarks, "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), "--no-progress", *args.eval_args]
    dspark("eval", *cmd)
    report = json.loads((out / "concurrency.json").read_text())
    goals, rows = {}, {}
    for b, e in report["benchmarks"].items():
        by = e["by_concurrency"]
        rows[b] = {r: x["speedup"] for r, x in by.items()}
        goals[f"{b}: speculative ≥ 0.98× plain at every R"] = all(x["speedup"] >= 0.98 for x in by.values())
        goals[f"{b}: identical to plain one-at-a-time, every request, every R"] = all(
            x["speculative"]["lossless"] for x in by.values())
    if "gsm8k" in report["benchmarks"] and "4" in report["benchmarks"]["gsm8k"]["by_concurrency"]:
        goals["gsm8k: ≥ 1.3× at R = 4"] = report["benchmarks"]["gsm8k"]["by_concurrency"]["4"]["speedup"] >= 1.3
    lo, hi = min(report["concurrency"]), max(report["concurrency"])
    fwd = {r: [e["by_concurrency"][str(r)]["speculative"]["drafter_forward_s_per_round"]
               for e in report["benchmarks"].values()] for r in (lo, hi)}
    ratio = None
    if all(v is not None for vs in fwd.values() for v in vs) and lo != hi:
        ratio = (sum(fwd[hi]) / len(fwd[hi])) / (sum(fwd[lo]) / len(fwd[lo]))
        goals[f"drafter forward per round at R = {hi} ≤ 3× at R = {lo} ({ratio:.2f}×)"] = ratio <= 3.0
    md = (out / "concurrency.md").read_text() + "\n" + _goals_md(goals)
    return {"report": report, "goals": goals, "speedup_by_r": rows, "drafter_forward_ratio": ratio}, md, \
        ["dspark eval " + " ".join(cmd)], out / "speedup_vs_concurrency.png"


def temperature(args, work: Path) -> tuple[dict, str, list[str]]:
    reports, commands = {}, []
    for t in args.temperatures.split(","):
        out = work / f"eval-t{t}"
        cmd = [args.artifact, "--mode", "adaptive", "--hybrid", "--temperature", t, "--baselines", "drafter-only",
               "--no-fastest-plain", "--benchmarks", args.benchmarks, "--n", str(args.n_sampled), "--max-new-tokens",
               str(args.max_new_tokens), "--out", str(out), "--no-progress", *args.eval_args]
        dspark("eval", *cmd)
        commands.append("dspark eval " + " ".join(cmd))
        reports[float(t)] = json.loads((out / "report.json").read_text())
    table = {}
    for t, rep in reports.items():
        for b, e in rep["benchmarks"].items():
            alone = e["baselines"].get("drafter-only") or {}
            table.setdefault(b, {})[str(t)] = {"tau": e["tau"], "speedup": e["speedup"], "drafter_only_tau":
                                               alone.get("tau"), "drafter_only_speedup": alone.get("speedup"),
                                               "tuner": e.get("tuner")}
    goals = {}
    hot = table and all("1.0" in v for v in table.values())
    for b, need in (("gsm8k", 1.35), ("humaneval", 1.35), ("mt-bench", 1.1)):
        if hot and b in table:
            goals[f"{b}: hybrid ≥ {need}× at T = 1"] = table[b]["1.0"]["speedup"] >= need
    greedy = reports.get(0.0)
    tuner = {b: e.get("tuner") for b, e in (greedy or {}).get("benchmarks", {}).items() if e.get("tuner")}
    if tuner:
        goals["the cost model within 10 % of the measurement on every dev set"] = all(
            abs((x.get("cost_model_over_measured") or 0) - 1) <= 0.10 for x in tuner.values())
        pooled = _pooled(tuner)
        goals[f"the tuner's expectation within 10 % of the dev sets' pooled measurement ({pooled:.2f})"] = \
            abs(pooled - 1) <= 0.10
    temps = [str(t) for t in reports]
    lines = ["τ and speedup over plain decoding (same precision), hybrid adaptive (the drafter alone in "
             "parentheses), by temperature:", "", "| dev set | " + " | ".join(f"T = {t}" for t in temps) + " |",
             "|" + "---|" * (len(temps) + 1)]
    for b, v in table.items():
        lines.append(f"| {b} | " + " | ".join(
            f"τ {_fmt(v[t]['tau'])}, {_fmt(v[t]['speedup'])}× (τ {_fmt(v[t]['drafter_only_tau'])}, "
            f"{_fmt(v[t]['drafter_only_speedup'])}×)" if t in v else "—" for t in temps) + " |")
    if tuner:
        lines += ["", "The tuner's expectation (greedy run) next to the measurement, decode-only:", "",
                  "| dev set | expected tok/s | measured tok/s | expected ÷ measured | cost model ÷ measured | "
                  "expected speedup | measured speedup |", "|---|---|---|---|---|---|---|"]
        for b, x in tuner.items():
            lines.append(f"| {b} | {_fmt(x['expected_tokens_per_s'], '.1f')} | "
                         f"{_fmt(x['measured_decode_tokens_per_s'], '.1f')} | {_fmt(x['expected_over_measured'])} | "
                         f"{_fmt(x.get('cost_model_over_measured'))} | {_fmt(x['expected_speedup'])}× | "
                         f"{_fmt(x['measured_speedup'])}× |")
    md = "\n".join(lines) + "\n\n" + _goals_md(goals)
    machine = next(iter(reports.values()))["machine"]
    return {"table": table, "goals": goals, "machine": machine, "reports": {str(t): r for t, r in reports.items()}}, \
        md, commands


def _pooled(tuner: dict) -> float:
    """The tuner's held-out expectation over the dev sets' measured decode-only tokens/s, pooled (mean rate)."""
    measured = [x["measured_decode_tokens_per_s"] for x in tuner.values() if x["measured_decode_tokens_per_s"]]
    return next(iter(tuner.values()))["expected_tokens_per_s"] / (sum(measured) / len(measured))


def stability(args, work: Path) -> tuple[dict, str, list[str]]:
    runs, commands = [], []
    for i in range(args.calibrations):
        out = work / f"calibration-{i + 1}"
        env = {**_env(), "DSPARK_CACHE": str(work / f"cache-{i + 1}")}  # a fresh SPS(B) profile each time
        cmd = [args.run, "--out", str(out), *[a for s in args.calibrate_set for a in ("--set", s)]]
        loaded = i == 1 and args.calibrations > 1
        hog = subprocess.Popen([sys.executable, "-c", HOG]) if loaded else None
        try:
            t0 = time.perf_counter()
            dspark("calibrate", *cmd, env=env)
        finally:
            if hog is not None:
                hog.terminate()
                hog.wait()
        commands.append(("(another process busy on one core) " if loaded else "") + "dspark calibrate " + " ".join(cmd))
        cal = json.loads((out / "calibration.json").read_text())
        cp = cal["cost_profile"]
        noise = (cp.get("meta") or {}).get("noise") or []
        runs.append({"loaded": loaded, "seconds": round(time.perf_counter() - t0, 1), "policy": cal["adaptive"],
                     "expected": cal["expected"].get("adaptive"), "expected_plain": cal["expected"].get("plain"),
                     "guard": (cal["data"].get("tuning") or {}).get("guard"),
                     "round_cost": (cal["data"].get("tuning") or {}).get("round_cost"),
                     "sps": cp["steps_per_s"], "sps_noise_max": max(noise) if noise else None,
                     "sps_flags": {k: cp["meta"][k] for k in ("disturbed", "noisy") if cp.get("meta", {}).get(k)},
                     "machine": cal["data"]["hardware"]["machine"]})
    same = all(r["policy"] == runs[0]["policy"] for r in runs)
    goals = {f"the same policy in all {len(runs)} calibrations": same}
    lines = ["| calibration | load | policy | expected tok/s (plain) | SPS(1), SPS(8) /s | noise max | "
             "plain-vs-drafting check |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        p, s, g = r["policy"], r["sps"], r["guard"]
        pol = "plain" if p["node_budget"] == 0 else (f"width {p['max_width']}, budget {p['node_budget']}, depth "
                                                     f"threshold {p['depth_threshold']}")
        lines.append(f"| {i} | {'one core busy' if r['loaded'] else 'none'} | {pol} | "
                     f"{_fmt((r['expected'] or {}).get('tokens_per_s'), '.1f')} "
                     f"({_fmt((r['expected_plain'] or {}).get('tokens_per_s'), '.1f')}) | {_fmt(s[0], '.1f')}, "
                     f"{_fmt(s[min(7, len(s) - 1)], '.1f')} | {_fmt(r['sps_noise_max'], '.1%')} | "
                     + (f"plain {g['plain']['tokens_per_s']:.1f} vs drafting {g['drafting']['tokens_per_s']:.1f} → "
                        f"{g['chosen']}" if g else "—") + " |")
    md = "\n".join(lines) + "\n\n" + _goals_md(goals)
    return {"calibrations": runs, "goals": goals, "machine": runs[0]["machine"]}, md, commands


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _goals_md(goals: dict) -> str:
    return "Goals:\n\n" + "\n".join(f"- {'met' if ok else '**not met**'}: {g}" for g, ok in goals.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="the drafter artifact (the demo's: runs/demo/artifact)")
    ap.add_argument("--run", help="its training run, for the calibrations (the demo's: runs/demo)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--benchmarks", default=BENCHMARKS)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--n", type=int, default=16, help="requests per dev set (concurrency)")
    ap.add_argument("--n-sampled", type=int, default=8, help="prompts per dev set (temperature)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,0.7,1.0")
    ap.add_argument("--calibrations", type=int, default=3)
    ap.add_argument("--calibrate-set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for the calibrations (e.g. calibrate.texts=0 for a quick check)")
    ap.add_argument("--eval-arg", dest="eval_args", action="append", default=[],
                    help="one more `dspark eval` argument (repeatable), e.g. --eval-arg=--dtype --eval-arg=float32")
    ap.add_argument("--out-dir", default=str(REPO / "eval" / "results"), help="where the result files go")
    ap.add_argument("--label", default="", help="a suffix for the result files' names")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown or ("stability" in parts and not args.run):
        ap.error(f"unknown parts {sorted(unknown)}" if unknown else "--run is needed for the calibrations")
    # checked now, not after an hour of the other parts: `make demo` writes both (runs/demo, runs/demo/artifact)
    missing = [(what, p) for what, p, hub in (("artifact", args.artifact, True), ("--run", args.run, False))
               if p and not Path(p).is_dir() and not (hub and HUB_ID.match(p))]
    if missing and (missing[0][0] == "artifact" or "stability" in parts):
        what, p = missing[0]
        ap.error(f"{what} {p}: no such directory under {Path.cwd()} (`make demo` writes runs/demo and its artifact)")
    results = Path(args.out_dir)
    suffix = f"-{args.label}" if args.label else ""
    this = "python -m bench.load " + shlex.join(sys.argv[1:])  # each result file's first command
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "concurrency" in parts:
            data, md, commands, plot = concurrency(args, work)
            machine = data["report"]["machine"]
            stem = results / f"concurrency-{Capabilities.from_dict(machine).slug}{suffix}"
            write_result(stem, data, md, "Speculative vs plain decoding under load: R requests decoded together",
                         machine, [this, *commands])
            stem.with_suffix(".png").write_bytes(plot.read_bytes())
            print(md)
        if "temperature" in parts:
            data, md, commands = temperature(args, work)
            stem = results / f"temperature-{Capabilities.from_dict(data['machine']).slug}{suffix}"
            write_result(stem, data, md, "Speedup at temperature: sampled and greedy evals side by side",
                         data["machine"], [this, *commands])
            print(md)
        if "stability" in parts:
            data, md, commands = stability(args, work)
            stem = results / f"calibration-stability-{Capabilities.from_dict(data['machine']).slug}{suffix}"
            write_result(stem, data, md, "The adaptive policy over repeated calibrations, one under outside load",
                         data["machine"], [this, *commands])
            print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
