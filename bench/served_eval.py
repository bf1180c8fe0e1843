"""`make served-eval RUN=<DFlash or EAGLE-3 run>`: a drafter served by vLLM beside our decoder, as a result file.

Trains nothing. One `dspark eval RUN --engine vllm` (evaluation/served.py: it exports the drafter in speculators
format, starts vLLM on loopback from the engine venv with and without it, sends every dev prompt to both one at a
time, reads the engine's counters around each dev set, then runs our own chain decoder with γ = the drafter's block
size on the same prompts), fp32 on both sides, plain decoding as the only baseline; then
eval/results/served-<cpu>.{json,md,png} (served-eagle3-<cpu> for an EAGLE-3 drafter; bench/resultfile.py): the
side-by-side report, our full report, the commands and the machine. `make results` reads the newest DFlash one for
the README's served column. Exits as `dspark eval` did (1: an alarm or a served output that parts from the engine's
plain one; the result is written either way).

    python -m bench.served_eval --run runs/smollm2_135m_dflash [--n 10] [--max-new-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent
DEV_SETS = "gsm8k,mt-bench,humaneval,mbpp"


def eval_argv(args) -> list[str]:
    """The `dspark eval` arguments of this measurement."""
    argv = ["eval", args.run, "--engine", "vllm", "--benchmarks", args.benchmarks, "--n", str(args.n),
            "--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32", "--baselines", "",
            "--no-fastest-plain", "--out", args.out]
    for flag in ("engine_python", "server", "plain_server", "threads"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv + ([] if args.progress else ["--no-progress"])


def record(out: Path, stem: Path, commands: list[str], rc: int) -> Path:
    """eval/results/<stem>.{json,md,png} from a finished `dspark eval --engine` directory."""
    from dspark_train.evaluation.served import SERVED_DIR, SERVED_JSON, SERVED_MD, SERVED_PLOT
    from dspark_train.layout import REPORT_JSON

    served = json.loads((out / SERVED_DIR / SERVED_JSON).read_text())
    ours = json.loads((out / REPORT_JSON).read_text())
    title = (f"{served['engine']['name']} serving a {served['engine'].get('method') or ''} drafter beside our decoder "
             f"(chain, γ {served['ours']['gamma']})").replace("  ", " ")
    path = write_result(stem, {"served": served, "ours": ours, "exit_code": rc},
                        (out / SERVED_DIR / SERVED_MD).read_text(), title, served["machine"], commands)
    shutil.copyfile(out / SERVED_DIR / SERVED_PLOT, stem.with_suffix(".png"))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True,
                    help="a trained DFlash run (head: none, fill-in layout) or EAGLE-3 run, or its artifact")
    ap.add_argument("--benchmarks", default=DEV_SETS)
    ap.add_argument("--n", type=int, default=10, help="prompts per dev set")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--engine-python", default=None, help="default: dspark eval's (.venv-engine/bin/python)")
    ap.add_argument("--server", default=None, help="a running speculating server instead of starting one")
    ap.add_argument("--plain-server", default=None)
    ap.add_argument("--threads", type=int, default=None, help="our side's torch threads (default: all cores)")
    ap.add_argument("--out", default=str(REPO / "runs" / "served-eval"))
    ap.add_argument("--result", default=None, help="output stem (default eval/results/served-[eagle3-]<cpu>)")
    ap.add_argument("--command", default=None, help="what made it (default: make served-eval RUN=<run>)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args()
    from dspark_train.cli import main as dspark
    from dspark_train.hardware import Capabilities
    from dspark_train.evaluation.served import SERVED_DIR, SERVED_JSON

    argv = eval_argv(args)
    try:
        rc = dspark(argv)
    except SystemExit as e:  # 1: an alarm or a served divergence, after the report was written
        rc = e.code if isinstance(e.code, int) else 1
    out = Path(args.out)
    if not (out / SERVED_DIR / SERVED_JSON).is_file():
        return rc or 1
    served = json.loads((out / SERVED_DIR / SERVED_JSON).read_text())
    method = served["engine"].get("method") or "server"
    slug = Capabilities.from_dict(served["machine"]).slug
    stem = Path(args.result or REPO / "eval" / "results" / (f"served-{slug}" if method == "dflash" else
                                                             f"served-{method}-{slug}"))
    commands = [args.command or f"make served-eval RUN={args.run}", "dspark " + shlex.join(argv)]
    print(f"written {record(out, stem, commands, rc)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
