"""`make demo`: the whole pipeline on the embedded default (SmolLM2-135M-Instruct), on a CPU.

Each stage is the `dspark` command a user would type, printed before it runs; finished stages are reused on a
rerun. Everything lands under runs/demo/ of the current directory (`make demo`: the checkout's root). The recipe is
the shipped one, by name: in a checkout, recipes/smollm2_135m.yaml (its data beside the checkout, ../shared/data).
DEMO_FAST=1 runs a few-minute smoke version (used by one CI test).
A stage never outlives the demo (runlock.run_tied): stopped (Ctrl-C, SIGTERM as `make` passes it on, SIGHUP), the
demo stops the running stage, waits for it and exits 128 + the signal; killed, it takes the stage with it.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .config import load_recipe
from .layout import REPORT_JSON, REPORT_MD, WEIGHTS, RunDir, read_json
from .runlock import run_tied, stop_signals

RECIPE = "smollm2_135m"
BENCHMARKS = "gsm8k,mt-bench,humaneval,mbpp"
SAMPLED = (1.0, 0.7)  # temperatures of the sampled evals beside the greedy one


def settings(fast: bool) -> dict:
    """Budgets: the full demo fits a coffee break on 2 cores; the fast one only proves the wiring."""
    if fast:
        return dict(train=["train.max_minutes=null", "train.max_steps=12", "train.checkpoint_every=6",
                           "train.eval_every=6", "data.max_prompts=64", "data.heldout=8", "data.anchors_per_seq=16"],
                    calibrate=["calibrate.prompts=3", "calibrate.texts=8", "calibrate.max_new_tokens=24",
                               "calibrate.measure=false"],
                    eval=["--n", "2", "--max-new-tokens", "24", "--benchmarks", "gsm8k,mt-bench"])
    return dict(train=[], calibrate=[],
                eval=["--n", "6", "--max-new-tokens", "96", "--benchmarks", BENCHMARKS])


def run(cmd: list[str]) -> None:
    shown = " ".join(["dspark"] + cmd[3:]) if cmd[1:3] == ["-m", "dspark_train.cli"] else " ".join(cmd)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    rc = run_tied(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, what="the stage")
    if rc != 0:
        print(f"demo: stage failed (exit {rc}): {shown}", file=sys.stderr)
        raise SystemExit(rc)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def _recommend(report_file: Path) -> str:
    """Which decoding the measurement favours, hybrid adaptive or adaptive without copy branches (tokens/s
    summed over the benchmarks of the demo's eval)."""
    benches = read_json(report_file)["benchmarks"].values()
    ours = sum(b["tokens_per_s"] for b in benches)
    alone = sum(b["baselines"].get("drafter-only", {}).get("tokens_per_s") or 0.0 for b in benches)
    if not alone:
        return ""
    pick = "mode='hybrid'" if ours >= alone else "mode='adaptive' (without copy branches)"
    return f"measured here: hybrid adaptive {ours / alone:.2f}× the tokens/s of adaptive alone; use {pick}"


def temperature_table(reports: dict[float, Path]) -> str:
    """τ and speedup over plain decoding per dev set at each temperature (hybrid, and the drafter alone)."""
    data = {t: read_json(d / REPORT_JSON) for t, d in reports.items() if (d / REPORT_JSON).is_file()}
    if not data:
        return ""
    temps = list(data)
    lines = ["τ and speedup over plain decoding, hybrid adaptive (drafter alone in parentheses), by temperature:", "",
             "| dev set | " + " | ".join(f"T = {t:g}" for t in temps) + " |", "|" + "---|" * (len(temps) + 1)]
    for bench in data[temps[0]]["benchmarks"]:
        cells = []
        for t in temps:
            e = data[t]["benchmarks"].get(bench)
            alone = (e or {}).get("baselines", {}).get("drafter-only") or {}
            cells.append("—" if not e else f"τ {e['tau']:.2f}, {e['speedup']:.2f}× ("
                         + (f"τ {alone['tau']:.2f}, {alone['speedup']:.2f}×" if alone.get("tau") else "—") + ")")
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    try:
        with stop_signals():
            return demo()
    except KeyboardInterrupt as e:  # the running stage has ended (run_tied)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"demo: stopped ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


def demo() -> int:
    fast = os.environ.get("DEMO_FAST", "") not in ("", "0")
    run_dir = Path(os.environ.get("DEMO_DIR", "runs/demo-fast" if fast else "runs/demo"))
    root = Path.cwd() / run_dir
    cfg = settings(fast)
    dspark = [sys.executable, "-m", "dspark_train.cli"]
    sets = ["--set", f"train.output_dir={run_dir}"]
    for item in cfg["train"]:
        sets += ["--set", item]

    recipe = load_recipe(RECIPE, [s for s in sets if s != "--set"])
    conversations = recipe.resolve_data_path(recipe.data.conversations[0]) if recipe.data.conversations else None
    shown, files = RunDir(run_dir), RunDir(root)  # paths as the user typed them; the same, absolute
    run(dspark + ["fetch-target", RECIPE])
    if conversations is None or not conversations.is_file():
        print(f"\nno regenerated conversations at {conversations}: regenerating a small set with the target")
        data_sets = sets + ["--set", "data.conversations=null", "--set", f"data.output={shown.data}",
                            "--set", "data.max_prompts=" + ("32" if fast else "400")]
        run(dspark + ["data", RECIPE] + data_sets)
        sets += ["--set", f"data.conversations={files.data.resolve()}"]
    else:
        print(f"\nusing target-regenerated conversations: {conversations}")

    if (files.final / WEIGHTS).is_file():
        print(f"\ntrained drafter found: {shown.final} (delete it to retrain)")
    else:
        run(dspark + ["train", RECIPE] + sets)

    if not files.calibration.is_file():
        run(dspark + ["calibrate", str(run_dir)] + [a for s in cfg["calibrate"] for a in ("--set", s)])
    if not (files.eval / REPORT_JSON).is_file():
        run(dspark + ["export", str(run_dir), str(shown.artifact), "--force"])
        # adaptive trees with copy branches, and the same drafter without them (drafter-only) in the same run
        run(dspark + ["eval", str(shown.artifact), "--mode", "adaptive", "--hybrid", "--out", str(shown.eval)]
            + cfg["eval"])
    for t in SAMPLED:  # what users mostly run, and the paper's Table 1 setting (T = 1): the same eval, sampled
        out = shown.root / f"eval-t{t}"
        if not (root / f"eval-t{t}" / REPORT_JSON).is_file():
            run(dspark + ["eval", str(shown.artifact), "--mode", "adaptive", "--hybrid", "--temperature", str(t),
                          "--baselines", "drafter-only", "--no-fastest-plain", "--out", str(out)] + cfg["eval"])
    # export last so the model card carries the measured table
    run(dspark + ["export", str(run_dir), str(shown.artifact), "--force"])

    print("\n" + (files.eval / REPORT_MD).read_text())
    print(_recommend(files.eval / REPORT_JSON))
    print("\n" + temperature_table({0.0: files.eval, **{t: root / f"eval-t{t}" for t in SAMPLED}}))
    print(f"artifact:  {shown.artifact}/\nreport:    {shown.eval / REPORT_JSON} (+ {REPORT_MD})\n"
          f"plots:     {shown.eval}/*.png\ncalibration: {shown.calibration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
