"""Commit a `dspark eval` report as a result: eval/results/<name>-<cpu>.{json,md} (+ its speedup plot).

    python -m bench.record_report runs/demo/eval --name demo --title "make demo's eval" --command "make demo"

The report's own JSON (every measured number) goes in unchanged under `report`, its report.md is the markdown, the
machine is the one the report names; `--command` says what made it (a report does not record its command line: give
it; default `dspark eval`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", help="a `dspark eval --out` directory (report.json, report.md)")
    ap.add_argument("--name", required=True, help="the result's kind, e.g. demo")
    ap.add_argument("--title", required=True)
    ap.add_argument("--command", action="append", default=None, help="what made it (repeatable)")
    ap.add_argument("--out", default=None, help="output stem (default eval/results/<name>-<cpu>)")
    args = ap.parse_args()
    from dspark_train.hardware import Capabilities
    from dspark_train.layout import REPORT_JSON, REPORT_MD

    src = Path(args.eval_dir)
    report = json.loads((src / REPORT_JSON).read_text())
    machine = report["machine"]
    stem = Path(args.out or REPO / "eval" / "results" / f"{args.name}-{Capabilities.from_dict(machine).slug}")
    commands = args.command or [report.get("command", "dspark eval")]
    out = write_result(stem, {"report": report}, (src / REPORT_MD).read_text(), args.title, machine, commands)
    plot = src / "speedup.png"
    if plot.is_file():
        shutil.copyfile(plot, stem.with_suffix(".png"))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
