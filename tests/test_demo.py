"""`make demo` end to end in its smoke version (DEMO_FAST=1): every stage runs and the table is printed; a demo
stopped or killed during a stage leaves no stage behind."""
import json
import os
import signal
import subprocess
import sys
import time
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
    # [T] 3: sampled evals beside the greedy one (T = 1, the paper's Table 1 setting, and T = 0.7), τ and speedup
    # per dev set by temperature
    for t in (1.0, 0.7):
        sampled = json.loads((run_dir / f"eval-t{t}" / "report.json").read_text())
        assert sampled["temperature"] == t and set(sampled["benchmarks"]) == {"gsm8k", "mt-bench"}
        assert sampled["benchmarks"]["gsm8k"]["lossless"] is None and sampled["benchmarks"]["gsm8k"]["tau"] >= 1
    assert "by temperature" in proc.stdout and "| T = 0 | T = 1 | T = 0.7 |" in proc.stdout
    # a rerun reuses every finished stage (no training, no calibration, no eval)
    again = subprocess.run([sys.executable, "-m", "dspark_train.demo"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "trained drafter found" in again.stdout and "dspark train" not in again.stdout
    assert "dspark calibrate" not in again.stdout and "dspark eval" not in again.stdout


# a stage that needs a moment to stop cleanly (as `dspark train` stopping its trainer, or a stage releasing a lock)
STAGE = ("import os, signal, sys, time\n"
         "def stop(signum, frame):\n"
         "    time.sleep(1.0)\n"
         "    open(sys.argv[1], 'a').write(f'stopped by {signal.Signals(signum).name}\\n')\n"
         "    sys.exit(0)\n"
         "signal.signal(signal.SIGINT, stop)\n"
         "open(sys.argv[1], 'a').write(f'ready {os.getpid()}\\n')\n"
         "time.sleep(120)\n")


def _demo_in_a_stage(marks: Path) -> tuple[subprocess.Popen, int]:
    """`make demo`'s process running one long stage; returns it and the stage's pid once the stage is ready."""
    code = ("import sys; from dspark_train import demo\n"
            "real = demo.run\n"
            "def first_stage_only(cmd):\n"
            f"    real([sys.executable, '-c', {STAGE!r}, {str(marks)!r}])\n"
            "    raise SystemExit(0)\n"
            "demo.run = first_stage_only\n"
            "sys.exit(demo.main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (marks.is_file() and marks.read_text().endswith("\n")):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    return proc, int(marks.read_text().split()[1])


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stopped_demo_stops_its_stage_and_waits_for_it(tmp_path, sig):
    """[S2] 4: `make demo` killed with SIGTERM (make passes it to the demo) left its running stage orphaned and
    writing the run. The demo passes the stop on to the stage (as Ctrl-C: a Python stage unwinds and releases its
    lock), waits for it, and exits 128 + the signal."""
    marks = tmp_path / "marks"
    proc, stage = _demo_in_a_stage(marks)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        if _running(stage):
            os.kill(stage, signal.SIGKILL)  # do not leave it to the rest of the suite
    err = proc.stderr.read()
    assert proc.returncode == 128 + sig, err
    assert marks.read_text().splitlines()[1:] == ["stopped by SIGINT"]  # stopped before the demo ended
    assert not _running(stage) and f"demo: stopped ({sig.name})" in err


def test_a_killed_demo_takes_its_stage_with_it(tmp_path):
    marks = tmp_path / "marks"
    proc, stage = _demo_in_a_stage(marks)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while _running(stage) and time.time() < deadline:
        time.sleep(0.05)
    if _running(stage):
        os.kill(stage, signal.SIGKILL)
        raise AssertionError("the stage outlived the demo by 10 s")
