"""`make curve`: held-out τ against wall-clock training minutes for named recipe variants (issue [I]'s instrument).

    python -m bench.learning_curve                                   # the default variants at 2, 5, 10, 20, 40 min
    python -m bench.learning_curve --minutes 1,2 --variants baseline,kl_to_l1 --parallel 2    # a smoke version
    python -m bench.learning_curve --list                            # the built-in variants and what they change

Every variant is `dspark train RECIPE --set …` (the variant's overrides over the recipe, plus `--set` given
here for all) with a wall-clock budget of the last point (`train.max_minutes`) and held-out evaluations at each
point (`train.eval_at_minutes`), so one run per variant gives its whole curve. All variants share the data, the
held-out split and its evaluation anchors (`data.eval_anchors_per_seq` pinned), and run on this machine in one
invocation; with `--parallel N` N variants train at once with cpu_count // N threads each (2 cores, --parallel 2:
one thread each, so the two share the machine fairly). The training clock excludes evaluation, checkpoints and
setup (schedule.py); the feature cache is per run (each cache variant pays its own online first epoch inside its
budget) unless a shared `data.feature_cache_dir` is passed, which curve.md then flags.

The points of one run are its *anytime* curve: at 10 of 40 minutes the cosine has not decayed yet, so a run
budgeted at 10 minutes ends better than the 10-minute point of a 40-minute run.

Writes <out>/curve.json (everything, per variant and point), curve.md (tables) and curve.png (τ_sim and
τ_greedy against minutes, one line per variant); each variant's run directory is <out>/<variant>/ (its log in
train.log). Finished variants are reused on a rerun (same minutes), unfinished ones resume from their checkpoint;
--force retrains.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from dspark_train.hardware import cpu_info  # torch-free until a function asks
from dspark_train.layout import write_atomic
from dspark_train.runrecord import read_run

REPO = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2_135m.yaml"
MINUTES = (2, 5, 10, 20, 40)
EVAL_ANCHORS = 64  # held-out anchors per sequence for every variant (the recipe's training default)

# name -> (what it changes, overrides). `baseline` is the recipe as shipped.
VARIANTS = {
    "baseline": ("the recipe as shipped: KL → L1 by mid-horizon, target init, 32 anchors, online features, AdamW, "
                 "1 layer", []),
    "l1": ("the paper's L1 alone (the recipe before round 3's blend curve)", ["train.loss=l1"]),
    "kl": ("forward KL(p_t ‖ p_d) instead of L1", ["train.loss=kl"]),
    "kl_to_l1": ("(1−α)·KL + α·L1, α = the slot's acceptance estimate", ["train.loss=kl_to_l1",
                                                                         "train.blend=acceptance"]),
    "init_random": ("random init (the recipe: draft layer, fc, norms from the target's layer after the last "
                    "feature layer)", ["drafter.init=random"]),
    "cache_bf16": ("feature cache (bf16): epochs ≥ 2 skip the target forward", ["data.feature_cache=bfloat16"]),
    "cache_int8": ("feature cache (int8 + per-row scale)", ["data.feature_cache=int8"]),
    "layers2": ("2 draft layers", ["drafter.num_layers=2"]),
    "qk_ones": ("q/k norm weights left at one after target init (round 2's init)", ["drafter.qk_norm_init=ones"]),
    "qk_off": ("no q/k norms: the copied layer exactly (not exportable to the engines)", ["drafter.qk_norm=false"]),
    "anchors16": ("16 anchors per sequence (cheaper steps, fewer supervised slots)", ["data.anchors_per_seq=16"]),
    "anchors64": ("64 anchors per sequence (the recipe before make curve chose 32)", ["data.anchors_per_seq=64"]),
    "anchors128": ("128 anchors per sequence (more supervised slots per target forward)",
                   ["data.anchors_per_seq=128"]),
    "batch8": ("8 sequences per step", ["train.batch_size=8"]),
    "lr1e-3": ("learning rate 1e-3 (recipe: 4e-3)", ["train.lr=1e-3"]),
    "lr2e-3": ("learning rate 2e-3 (the recipe before make curve chose 4e-3)", ["train.lr=2e-3"]),
    "lr8e-3": ("learning rate 8e-3", ["train.lr=8e-3"]),
    "muon": ("Muon for the 2-D hidden weights, AdamW for the rest", ["train.optimizer=muon"]),
    "vocab4k": ("4,096-token draft vocabulary (recipe: 8,192)", ["drafter.draft_vocab_size=4096"]),
    "combo": ("kl_to_l1 + cache_bf16", ["train.loss=kl_to_l1", "train.blend=acceptance",
                                        "data.feature_cache=bfloat16"]),
}
DEFAULT = ("baseline", "anchors16", "anchors64", "kl_to_l1", "cache_bf16", "layers2", "lr8e-3")


# --------------------------------------------------------------------------- running
def common_overrides(minutes: list[float], threads: int) -> list[str]:
    return [f"train.max_minutes={max(minutes)}", f"train.eval_at_minutes=[{','.join(f'{m:g}' for m in minutes)}]",
            "train.max_steps=1000000000", "train.eval_every=1000000000", f"train.num_threads={threads}",
            f"data.eval_anchors_per_seq={EVAL_ANCHORS}", "logging.progress_bar=false"]


def finished(run: Path, minutes: list[float]) -> bool:
    """A finished run of the same budget (its summary exists and its recipe asked for these points)."""
    if not (run / "train_summary.json").is_file() or not (run / "recipe.yaml").is_file():
        return False
    train = read_run(run).recipe.train
    return train.max_minutes == max(minutes) and train.eval_at_minutes == [float(m) for m in minutes]


def train_variant(name: str, overrides: list[str], args, threads: int) -> dict:
    run = Path(args.out) / name
    if args.force and run.exists():
        shutil.rmtree(run)
    if finished(run, args.minutes):
        print(f"[{name}] finished run found in {run} (--force retrains)", flush=True)
        return {"name": name, "reused": True, "wall_s": 0.0, "rc": 0}
    if run.exists() and not (run / "checkpoints" / "latest").is_file():
        shutil.rmtree(run)  # an earlier attempt that died before its first checkpoint: start clean
    run.mkdir(parents=True, exist_ok=True)
    sets = [*overrides, *common_overrides(args.minutes, threads), *args.overrides, f"train.output_dir={run}"]
    cmd = [sys.executable, "-m", "dspark_train.train", args.recipe] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(run / "train.log", "a") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    status = "done" if rc == 0 else f"FAILED (exit {rc}, see {run / 'train.log'})"
    print(f"[{name}] {status} in {wall / 60:.1f} min", flush=True)
    return {"name": name, "reused": False, "wall_s": wall, "rc": rc}


# --------------------------------------------------------------------------- reading the runs
def read_points(run: Path, minutes: list[float]) -> list[dict]:
    """The evaluation standing for each point (the last one tagged with it), plus the step-0 one as minute 0."""
    from dspark_train.layout import read_jsonl  # lines end at \n only; a line torn by a kill is skipped

    metrics = run / "metrics.jsonl"
    records = [r for r in (read_jsonl(metrics, skip_bad=True, quiet=True) if metrics.is_file() else [])
               if "eval/tau" in r]
    points = []
    start = [r for r in records if r["step"] == 0]
    tagged = {m: [r for r in records if m in r.get("eval/at_minutes", [])] for m in minutes}
    for m, r in [(0.0, start[-1] if start else None)] + [(m, rs[-1] if rs else None) for m, rs in tagged.items()]:
        if r is None:
            continue
        G = len([k for k in r if k.startswith("eval/acc_")])
        points.append({"minutes": m, "train_seconds": r.get("eval/train_seconds", 0.0), "steps": r["step"],
                       "tokens": r.get("eval/tokens", 0), "tau": r["eval/tau"], "tau_greedy": r.get("eval/tau_greedy"),
                       "acc": [r[f"eval/acc_{k}"] for k in range(1, G + 1)],
                       "survival_greedy": [r.get(f"eval/survival_greedy_{k}") for k in range(1, G + 1)],
                       "l1": r["eval/l1"], "ce": r["eval/ce"], "eval_seconds": r.get("eval/seconds")})
    return points


def run_facts(run: Path) -> tuple:
    """(threads, finish time) of a run as it trained: a reused run may come from another invocation."""
    threads = read_run(run).recipe.train.num_threads if (run / "recipe.yaml").is_file() else None
    summary = run / "train_summary.json"
    when = datetime.fromtimestamp(summary.stat().st_mtime, timezone.utc).isoformat(timespec="minutes") \
        if summary.is_file() else None
    return threads, when


def collect(args, results: list[dict], started: dict) -> dict:
    variants = {}
    for res in results:
        name = res["name"]
        run = Path(args.out) / name
        summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
        threads, trained_at = run_facts(run)
        variants[name] = {"description": args.table[name][0], "overrides": args.table[name][1], "rc": res["rc"],
                          "reused": res["reused"], "wall_s": res["wall_s"], "points": read_points(run, args.minutes),
                          "steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
                          "tokens": summary.get("tokens"), "schedule": summary.get("schedule"),
                          "feature_cache": summary.get("feature_cache"), "threads": threads, "trained_at": trained_at}
    return {**started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_end": list(os.getloadavg()), "variants": variants}


# --------------------------------------------------------------------------- writing
def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


def curve_markdown(curve: dict) -> str:
    minutes = curve["minutes"]
    names = list(curve["variants"])
    lines = [f"# Learning curve: {Path(curve['recipe']).name}", "",
             f"{curve['cpu']}, {curve['cores']} cores, {curve['parallel']} variant(s) at a time × "
             f"{curve['threads']} thread(s); load average {curve['load_average_start'][0]:.1f} at the start, "
             f"{curve['load_average_end'][0]:.1f} at the end; {curve['created']}. Common overrides: "
             f"`{' '.join(curve['overrides']) or 'none'}`.", "",
             "Minutes are training-clock minutes (evaluation, checkpoints and setup excluded); each point is the "
             "held-out evaluation of the run budgeted at the last point (an anytime curve). τ_sim = 1 + Σ_k Π acc_i "
             "with acc_k = E[Σ min(p_d, p_t)] (sampling acceptance); τ_greedy = 1 + Σ_k P(draft argmax = target "
             "argmax at slots 1..k), the estimate to compare with greedy dev-set τ.", ""]
    reused = [n for n in names if curve["variants"][n].get("reused")]
    if reused:
        lines += [f"**Note:** {len(reused)} of {len(names)} variants were trained by earlier invocations (reused: "
                  f"{', '.join(reused)}); the line above describes this one. Each run's threads and finish time are "
                  "in the Variants table.", ""]
    if curve.get("shared_feature_cache"):
        lines += ["**Note:** a shared `data.feature_cache_dir` was set: cache variants after the first may have "
                  "skipped the online first epoch that the first one paid for.", ""]
    for key, title in (("tau_greedy", "τ_greedy"), ("tau", "τ_sim (soft)")):
        lines += [f"## {title} by training minutes", "",
                  "| variant | " + " | ".join(f"{m:g} min" for m in minutes) + " |", "|---|" + "---|" * len(minutes)]
        for n in names:
            at = {p["minutes"]: p for p in curve["variants"][n]["points"]}
            lines.append(f"| {n} | " + " | ".join(_f(at.get(m, {}).get(key)) for m in minutes) + " |")
        lines.append("")
    lines += ["## Every point", "",
              "| variant | min | steps | tokens seen | τ_sim | τ_greedy | acc@1 | acc@2 | acc@3 | acc@4 | "
              "greedy surv@1 | surv@2 | surv@3 | surv@4 |", "|---|" + "---|" * 13]
    for n in names:
        for p in curve["variants"][n]["points"]:
            acc = (p["acc"] + [None] * 4)[:4]
            surv = (p["survival_greedy"] + [None] * 4)[:4]
            lines.append(f"| {n} | {p['minutes']:g} | {p['steps']} | {p['tokens']:,} | {_f(p['tau'])} | "
                         f"{_f(p['tau_greedy'])} | " + " | ".join(_f(a, ".2f") for a in acc + surv) + " |")
    lines += ["", "## Variants", "", "| variant | changes | overrides | steps | train min | threads | trained at | "
              "feature cache |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        v = curve["variants"][n]
        fc = v.get("feature_cache")
        cache = "—" if not fc else (f"{fc['format']}, {fc['bytes_per_token']:,} B/token, {fc['bytes'] / 2**30:.2f} GiB,"
                                    f" {fc['hits']} hits / {fc['misses']} misses")
        status = "" if v["rc"] == 0 else f" **(failed: exit {v['rc']})**"
        lines.append(f"| {n}{status} | {v['description']} | `{' '.join(v['overrides']) or '—'}` | {v['steps']} | "
                     f"{_f((v['train_seconds'] or 0) / 60, '.1f')} | {v.get('threads') or '—'} | "
                     f"{v.get('trained_at') or '—'} | {cache} |")
    return "\n".join(lines) + "\n"


def curve_plot(curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in zip(axes, ("tau_greedy", "tau"), ("τ_greedy (held-out)", "τ_sim, soft (held-out)")):
        for name, v in curve["variants"].items():
            pts = [p for p in v["points"] if p["minutes"] > 0 and p.get(key) is not None]
            if pts:
                ax.plot([p["minutes"] for p in pts], [p[key] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xticks(curve["minutes"], [f"{m:g}" for m in curve["minutes"]])
        ax.minorticks_off()
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("τ")
    axes[1].legend(fontsize=8, loc="best")
    ran = {v.get("threads") for v in curve["variants"].values()} - {None}  # as the runs trained (some reused)
    threads = ran.pop() if len(ran) == 1 else curve["threads"] if not ran else "mixed"
    fig.suptitle(f"{Path(curve['recipe']).name}: {curve['cpu']}, {threads} thread(s) per variant", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(curve: dict, out: Path) -> None:
    write_atomic(out / "curve.json", json.dumps(curve, indent=1))
    write_atomic(out / "curve.md", curve_markdown(curve))
    curve_plot(curve, out / "curve.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(DEFAULT), help="comma-separated names (see --list)")
    ap.add_argument("--minutes", default=",".join(map(str, MINUTES)), help="training-clock evaluation points")
    ap.add_argument("--parallel", type=int, default=1, help="variants trained at once (one thread each on 2 cores)")
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--out", default="runs/curve")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every variant, e.g. --set target.dtype=float32 (repeatable)")
    ap.add_argument("--variant", dest="extra", action="append", default=[], metavar="NAME=K=V[;K=V…]",
                    help="an extra variant: a name and its overrides separated by ';' (repeatable)")
    ap.add_argument("--force", action="store_true", help="retrain variants that already finished")
    ap.add_argument("--result", metavar="NAME", help="also commit-ready: eval/results/curve-<cpu>-NAME.{json,md,png}")
    ap.add_argument("--list", action="store_true", help="print the built-in variants and exit")
    args = ap.parse_args(argv)
    table = dict(VARIANTS)
    for spec in args.extra:
        name, _, sets = spec.partition("=")
        table[name] = (f"custom: {sets}", [s for s in sets.split(";") if s])
    if args.list:
        for name, (what, sets) in table.items():
            print(f"{name:18s} {what}\n{'':18s} {' '.join(sets) or '(no overrides)'}")
        return 0
    names = [n for n in args.variants.split(",") if n] + [s.partition("=")[0] for s in args.extra
                                                           if s.partition("=")[0] not in args.variants.split(",")]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"error: --variants: unknown {', '.join(unknown)} (known: {', '.join(table)})", file=sys.stderr)
        return 2
    try:
        args.minutes = sorted({float(m) for m in args.minutes.split(",") if m})
    except ValueError:
        print(f"error: --minutes: expected comma-separated numbers, got {args.minutes!r}", file=sys.stderr)
        return 2
    if not args.minutes or min(args.minutes) <= 0 or args.parallel < 1:
        print("error: --minutes must be positive and --parallel >= 1", file=sys.stderr)
        return 2
    args.table = table
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.parallel)
    waves = -(-len(names) // args.parallel)
    print(f"learning curve: {len(names)} variants × {max(args.minutes):g} training minutes, {args.parallel} at a time "
          f"× {threads} thread(s): ≥ {waves * max(args.minutes):.0f} min of training plus setup and evaluations",
          flush=True)
    cpu, flags = cpu_info()
    started = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "recipe": args.recipe,
               "minutes": args.minutes, "parallel": args.parallel, "threads": threads, "cores": cores,
               "cpu": f"{cpu} · {', '.join(flags) or 'no bf16 flags'}",
               "load_average_start": list(os.getloadavg()), "overrides": args.overrides,
               "shared_feature_cache": any(o.startswith("data.feature_cache_dir=") for o in args.overrides)}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda n: train_variant(n, table[n][1], args, threads), names))
    curve = collect(args, results, started)
    write_outputs(curve, out)
    if args.result:
        from bench.resultfile import write_result
        from dspark_train.hardware import Capabilities, detect
        machine = {**detect().to_dict(), "threads": threads}
        stem = REPO / "eval" / "results" / f"curve-{Capabilities.from_dict(machine).slug}-{args.result}"
        write_result(stem, curve, curve_markdown(curve), f"make curve: {args.result}", machine)
        curve_plot(curve, stem.with_suffix(".png"))
    print("\n" + curve_markdown(curve))
    print(f"written: {out / 'curve.json'}, {out / 'curve.md'}, {out / 'curve.png'}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
