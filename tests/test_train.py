"""The trainer end to end on the tiny recipe, in subprocesses as a user runs it: one process; SIGKILL + resume;
2 ranks under DeepSpeed ZeRO-2 / ZeRO-3 through `accelerate launch` against the 1-process run at equal global
batch; resume at a different world size; trackers (wandb offline, tensorboard); the launch command; the feature
cache across a resume (warm or cold) and across ranks; a time-budgeted run; Muon's state across a resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dspark_train.config import load_recipe
from dspark_train.training.launch import build_launch_command

STEPS, MID = 40, 20
COMMON = ["drafter.draft_vocab_size=256", f"train.max_steps={STEPS}", "train.eval_every=20", "train.log_every=10",
          "train.mixed_precision='no'", "train.num_threads=1", "logging.progress_bar=false"]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _args(out, *extra):
    return ["recipes/tiny.yaml"] + [a for s in COMMON + [f"train.output_dir={out}", *extra] for a in ("--set", s)]


def _train(repo, out, *extra, launch=None, timeout=600):
    """Run the trainer as a user would; returns its combined output (asserts success)."""
    if launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               f"recipes/accelerate/{launch}.yaml", "--num_processes", "2", "-m", "dspark_train.train"]
    else:
        cmd = [sys.executable, "-m", "dspark_train.train"]
    p = subprocess.run(cmd + _args(out, *extra), cwd=repo, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout + p.stderr


def _losses(run):
    """Last logged train loss per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # torn by the SIGKILL
            continue
        if "train/loss" in r:
            out[r["step"]] = r
    return out


def _resume_from(src, dst, step):
    """A copy of run `src` as if it had died right after the checkpoint at `step`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for c in (dst / "checkpoints").glob("step-*"):
        if c.name != f"step-{step:06d}":
            shutil.rmtree(c)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    (dst / "metrics.jsonl").write_text("")


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory):
    """The uninterrupted 1-process run: batch 2, checkpoints every 10 steps (2 kept), wandb + tensorboard."""
    out = tmp_path_factory.mktemp("ref") / "run"
    log = _train(repo, out, "train.checkpoint_every=10", "train.keep_checkpoints=2", "train.batch_size=2",
                 "logging.trackers=[wandb,tensorboard]")
    return out, log


def test_single_process_run(reference, tiny_target):
    run, log = reference
    assert "starting" in log and "resuming" not in log
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], losses[STEPS]
    assert last["train/loss"] < 0.8 * first["train/loss"] and last["train/l1"] < first["train/l1"]
    assert all(r["train/tokens_per_s"] > 0 and r["train/rank_tokens"] == [r["train/tokens"]] for r in losses.values())
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/tau" in x]
    assert [e["step"] for e in evals] == [0, 20, 40] and evals[-1]["eval/l1"] < evals[0]["eval/l1"]
    assert evals[-1]["eval/tau"] > evals[0]["eval/tau"] and 1 <= evals[-1]["eval/tau"] <= 1 + 4
    # checkpoints: atomic dirs, the last two kept, `latest` pointer; final drafter loadable by export
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000030", "step-000040"]
    assert (run / "checkpoints" / "latest").read_text() == "step-000040"
    state = json.loads((run / "checkpoints" / "step-000040" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["position"] == 2 * STEPS and state["world_size"] == 1
    from safetensors.torch import load_file

    from dspark_train.drafters import Drafter
    drafter = Drafter.from_pretrained(run / "final").attach_target(tiny_target)
    saved = load_file(str(run / "checkpoints" / "step-000040" / "drafter.safetensors"))
    for n, p in drafter.named_parameters():
        assert torch.equal(p, saved[n]), n
    held = json.loads((run / "heldout_ids.json").read_text())
    assert len(held["ids"]) == 8 and held["conversations"].endswith("smollm2-135m-instruct.jsonl")
    assert load_recipe(run / "recipe.yaml").train.max_steps == STEPS
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    # what the precision settings resolved to on this machine, and why: recipe.yaml's header and the summary
    lines = (run / "recipe.yaml").read_text().splitlines()
    assert lines[0] == "# -*- coding: dspark-recipe -*-"  # `accelerate launch <run>/recipe.yaml` runs it again
    header = lines[1:4]
    assert header[0].startswith("# machine: cpu: ") and header[1] == "# target_dtype: float32 → float32 (asked for)"
    assert header[2] == "# mixed_precision: no → no (asked for)" and "target_dtype: float32 → float32" in log
    hw = summary["hardware"]
    assert hw["target_dtype"]["value"] == "float32" and hw["machine"] == header[0].removeprefix("# machine: ")
    # trackers: tensorboard events and an offline wandb run holding the logged metrics
    assert list(run.rglob("events.out.tfevents.*"))
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    blob = wandb_file.read_bytes()
    assert b"train/loss" in blob and b"eval/tau" in blob and b"time/drafter_target_ratio" in blob


def test_sigkill_then_resume_matches_uninterrupted(reference, repo, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dspark_train.train"] + _args(out, "train.checkpoint_every=4", "train.batch_size=2")
    proc = subprocess.Popen(cmd, cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text() == "step-000004"):
        assert proc.poll() is None and time.time() < deadline, "trainer ended before its first checkpoint"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = (out / "checkpoints" / "latest").read_text()
    step = int(resumed_from.split("-")[1])
    assert step < STEPS and not (out / "final").exists(), "killed too late to test a resume"
    (out / "checkpoints" / ".tmp-step-000999").mkdir()  # debris of a save interrupted by the kill
    log = _train(repo, out, "train.checkpoint_every=4", "train.batch_size=2")
    assert f"resuming from {out / 'checkpoints' / resumed_from}" in log
    assert not (out / "checkpoints" / ".tmp-step-000999").exists()
    ref_losses, losses = _losses(ref), _losses(out)
    for s in range(step + 1, STEPS + 1):  # same data, weights, moments, schedule: the same losses
        assert losses[s]["train/loss"] == pytest.approx(ref_losses[s]["train/loss"], rel=1e-5, abs=1e-7), s
    assert (out / "final" / "model.safetensors").is_file()


def test_gradient_accumulation_matches_the_larger_batch(reference, repo, tmp_path):
    """2 micro-batches of 1 accumulated ≡ 1 batch of 2: same samples, same loss normalisation."""
    ref, _ = reference
    out = tmp_path / "accum"
    _train(repo, out, "train.batch_size=1", "train.grad_accum=2", "train.max_steps=40", "train.eval_every=40",
           "train.checkpoint_every=40")
    ref_losses, losses = _losses(ref), _losses(out)
    for s in (1, 2, 10, 40):
        assert losses[s]["train/loss"] == pytest.approx(ref_losses[s]["train/loss"], rel=1e-4), s
        assert losses[s]["train/tokens"] == ref_losses[s]["train/tokens"]


# not slow: the one multi-process DeepSpeed run `make test` (CI) keeps
def test_zero2_two_ranks_match_one_process_and_resume_at_one(reference, repo, tmp_path):
    """2 ranks × batch 1 under ZeRO-2 (+ target ZeRO-3) ≡ 1 rank × batch 2; then its mid-run checkpoint
    resumes in a single plain process (world size 2 → 1, DeepSpeed → none)."""
    ref, _ = reference
    ref_losses = _losses(ref)
    out = tmp_path / "z2"
    log = _train(repo, out, "train.checkpoint_every=20", "train.batch_size=1", launch="zero2")
    assert "DeepSpeed" in log
    losses = _losses(out)
    for s in range(1, STEPS + 1):
        r = losses[s]
        assert len(r["train/rank_tokens"]) == 2 and min(r["train/rank_tokens"]) > 0  # each rank: half the batch
        assert r["train/tokens"] == ref_losses[s]["train/tokens"]
        assert r["train/loss"] == pytest.approx(ref_losses[s]["train/loss"], rel=1e-4), s
    assert json.loads((out / "checkpoints" / "step-000040" / "trainer_state.json").read_text())["world_size"] == 2
    one = tmp_path / "z2_to_1"
    _resume_from(out, one, MID)
    log = _train(repo, one, "train.checkpoint_every=20", "train.batch_size=2")
    assert f"resuming from {one / 'checkpoints' / 'step-000020'}" in log
    for s in range(MID + 1, STEPS + 1):
        assert _losses(one)[s]["train/loss"] == pytest.approx(ref_losses[s]["train/loss"], rel=1e-4), s


@pytest.mark.slow
def test_zero3_two_ranks_resume_from_one_process(reference, repo, tmp_path):
    """The 1-process run's mid checkpoint continues on 2 ranks with the drafter under ZeRO-3 (partitioned
    masters and moments restored, world size 1 → 2) and follows the uninterrupted run."""
    ref, _ = reference
    out = tmp_path / "z3"
    _resume_from(ref, out, 30)
    log = _train(repo, out, "train.checkpoint_every=10", "train.batch_size=1", launch="zero3")
    assert f"resuming from {out / 'checkpoints' / 'step-000030'}" in log
    ref_losses, losses = _losses(ref), _losses(out)
    for s in range(31, STEPS + 1):
        assert len(losses[s]["train/rank_tokens"]) == 2
        assert losses[s]["train/loss"] == pytest.approx(ref_losses[s]["train/loss"], rel=1e-4), s
    assert (out / "final" / "model.safetensors").is_file()


CACHE = ["data.feature_cache=bfloat16", "train.batch_size=2", "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def cached(repo, tmp_path_factory):
    """The 1-process run with the feature cache: 56 training sequences, batch 2, so epoch 2 starts at step 29."""
    out = tmp_path_factory.mktemp("cached") / "run"
    _train(repo, out, *CACHE)
    return out


@pytest.mark.slow
def test_feature_cache_run_reads_its_second_epoch_and_tracks_the_online_run(cached, reference):
    summary = json.loads((cached / "train_summary.json").read_text())["feature_cache"]
    assert summary["sequences"] == 56 and summary["misses"] == 56  # epoch 1 wrote each sequence once
    assert summary["hits"] == 2 * STEPS - 56  # steps 29..40 read every row
    ref, losses = _losses(reference[0]), _losses(cached)
    for s in (1, 20, 40):  # bf16-rounded features: the same training up to that rounding
        assert losses[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=2e-2), s
    assert losses[40]["time/target_s"] < losses[1]["time/target_s"]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_resume_mid_epoch_with_the_cache_equals_resume_without_it(cached, repo, tmp_path, cache):
    """A resume at step 30 (mid epoch 2) reading the cache, and one whose cache was deleted (features recomputed
    online and rounded the same way), both follow the uninterrupted cached run."""
    out = tmp_path / "resumed"
    _resume_from(cached, out, 30)
    if cache == "cold":
        shutil.rmtree(out / "feature_cache")
    log = _train(repo, out, *CACHE)
    assert f"resuming from {out / 'checkpoints' / 'step-000030'}" in log
    ref, losses = _losses(cached), _losses(out)
    for s in range(31, STEPS + 1):
        assert losses[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-4), s
    summary = json.loads((out / "train_summary.json").read_text())["feature_cache"]
    assert (summary["misses"] == 0) if cache == "warm" else (summary["misses"] > 0)


def test_a_time_budgeted_run_records_its_learning_curve(repo, tmp_path):
    out = tmp_path / "timed"
    log = _train(repo, out, "train.max_steps=100000", "train.max_minutes=0.1", "train.eval_at_minutes=[0.05,0.1]",
                 "train.eval_every=100000", "train.checkpoint_every=100000")
    assert "time budget 0.1 min: probe" in log
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/tau" in r]
    assert evals[0]["step"] == 0 and [e.get("eval/at_minutes") for e in evals[1:]] == [[0.05], [0.1]]
    for e in evals:
        assert {"eval/train_seconds", "eval/tokens", "eval/tau_greedy", "eval/survival_greedy_1"} <= set(e)
        assert 1 <= e["eval/tau_greedy"] <= 5 and e["step"] >= 0
    assert evals[1]["eval/train_seconds"] >= 3.0 and evals[2]["eval/train_seconds"] > evals[1]["eval/train_seconds"]
    steps = [r for r in records if "train/loss" in r]
    last = steps[-1]
    assert last["train/seconds"] >= 6.0 or last["step"] >= last["train/horizon"]  # stopped by the clock or horizon
    state = json.loads((out / "checkpoints" / f"step-{last['step']:06d}" / "trainer_state.json").read_text())
    assert state["schedule"]["changes"][0][0] == 0 and state["seconds"] == pytest.approx(last["train/seconds"])
    assert json.loads((out / "train_summary.json").read_text())["train_seconds"] == pytest.approx(state["seconds"])


@pytest.mark.slow
def test_muon_resume_matches_uninterrupted(repo, tmp_path):
    """Muon's momentum and AdamW's moments go into the checkpoint by parameter name and come back."""
    ref = tmp_path / "muon"
    _train(repo, ref, "train.optimizer=muon", "train.max_steps=20", "train.checkpoint_every=10",
           "train.batch_size=2", "train.eval_every=20")
    from safetensors import safe_open
    with safe_open(str(ref / "checkpoints" / "step-000010" / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "layers.0.attn.q_proj.weight.momentum_buffer" in keys and "w2.weight.exp_avg" in keys
    assert "layers.0.attn.q_proj.weight.exp_avg" not in keys
    out = tmp_path / "muon_resumed"
    _resume_from(ref, out, 10)
    _train(repo, out, "train.optimizer=muon", "train.max_steps=20", "train.checkpoint_every=10",
           "train.batch_size=2", "train.eval_every=20")
    a, b = _losses(ref), _losses(out)
    for s in range(11, 21):
        assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], rel=1e-5), s
    assert a[20]["train/lr"] < a[10]["train/lr"]  # the schedule reaches Muon's groups too


def test_a_shipped_accelerate_config_finds_its_deepspeed_json_from_any_directory(tmp_path, monkeypatch, repo):
    """[O3] zero2.yaml names recipes/accelerate/ds_zero2.json, which `accelerate launch` finds from the checkout's
    root; from anywhere else the trainer reads the shipped file; any other path is taken as given."""
    from dspark_train import shipped
    name = "recipes/accelerate/ds_zero2.json"
    monkeypatch.chdir(repo)
    assert shipped.deepspeed_file(name) == Path(name)
    monkeypatch.chdir(tmp_path)
    assert shipped.deepspeed_file(name) == shipped.accelerate_dir() / "ds_zero2.json"
    assert shipped.deepspeed_file("my/ds.json") == Path("my/ds.json")


def test_launch_command(repo):
    r = load_recipe(repo / "recipes" / "tiny.yaml")
    assert build_launch_command(r, "recipes/tiny.yaml", ["train.lr=1e-3"]) == [
        sys.executable, "-m", "dspark_train.train", "recipes/tiny.yaml", "--set", "train.lr=1e-3"]
    r = load_recipe(repo / "recipes" / "tiny.yaml", ["distributed.num_processes=4", "distributed.zero_stage=3"])
    cmd = build_launch_command(r, "x.yaml")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--quiet"] and cmd[cmd.index("--config_file") + 1].endswith(
        "recipes/accelerate/zero3.yaml") and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-3:] == ["-m", "dspark_train.train", "x.yaml"]
    r = load_recipe(repo / "recipes" / "tiny.yaml", ["distributed.num_processes=16", "distributed.num_machines=2",
                                                    "distributed.machine_rank=1",
                                                    "distributed.main_process_ip=10.0.0.1"])
    cmd = build_launch_command(r, "x.yaml")
    assert cmd[cmd.index("--config_file") + 1].endswith("multi_node.yaml")
    assert cmd[cmd.index("--deepspeed_config_file") + 1].endswith("ds_zero2.json")
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    r = load_recipe(repo / "recipes" / "tiny.yaml", ["distributed.num_processes=2", "distributed.zero_stage=1"])
    with pytest.raises(Exception, match="zero_stage"):
        build_launch_command(r, "x.yaml")
