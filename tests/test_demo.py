"""`make demo` end to end in its smoke version (DEMO_FAST=1): every stage runs and the table is printed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DISTILL = REPO / ".." / "shared" / "data" / "distill" / "smollm2-135m-instruct.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not DISTILL.is_file(), reason="needs ../shared/data (distill + eval sets)")
def test_demo_fast_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "DEMO_FAST": "1", "DEMO_DIR": str(run_dir)}
    proc = subprocess.run([sys.executable, "-m", "dspark_train.demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("final/model.safetensors", "calibration.json", "artifact/model.safetensors", "artifact/README.md",
              "artifact/calibration.json", "eval/report.json", "eval/report.md"):
        assert (run_dir / f).is_file(), f
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["mode"] == "adaptive" and set(report["benchmarks"]) == {"gsm8k", "mt-bench"}
    assert "| gsm8k" in proc.stdout and "artifact:" in proc.stdout
    # the demo measures adaptive with and without copy branches and says which to use
    assert report["hybrid"] is True and "drafter-only" in report["benchmarks"]["gsm8k"]["baselines"]
    assert "measured here: hybrid adaptive" in proc.stdout
    # a rerun reuses every finished stage (no training, no calibration, no eval)
    again = subprocess.run([sys.executable, "-m", "dspark_train.demo"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "trained drafter found" in again.stdout and "dspark train" not in again.stdout
    assert "dspark calibrate" not in again.stdout and "dspark eval" not in again.stdout
