"""The benchmark scripts (bench/, `python -m bench.<name>`): every one answers `--help`; those that run in seconds on
the tiny target run for real, as a user runs them (a subprocess from the repo root), on a tiny run trained for 2
steps and its artifact.

`--help` only, because a real run needs what a test does not have: vLLM and speculators' venv (engine_check,
data_server_check, peer), a GPU (gpu_check), minutes of training or SmolLM2 decoding (bench: the demo and two baseline
trainings; capture_check: three trainings; learning_curve beyond `--list`; throughput: two trees' profiles), or a
2048³ bf16 matmul peak that takes minutes on a CPU without bf16 (profile_step)."""
import ast
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py")
                 if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body))
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TINY = "recipes/tiny.yaml"


def bench(name: str, *args, env=None) -> str:
    """`python -m bench.<name> ARGS` from the repo root; its stdout (asserts success)."""
    p = subprocess.run([sys.executable, "-m", f"bench.{name}", *map(str, args)], cwd=REPO, env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def test_every_script_is_found():
    assert {"bench", "bench_round", "engine_check", "peer", "results", "record_report"} <= set(SCRIPTS)
    assert "resultfile" not in SCRIPTS and len(SCRIPTS) == len(list(BENCH.glob("*.py"))) - 2  # __init__, resultfile


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, monkeypatch, capsys):
    """`python -m bench.<name> --help`, in this process (the imports are shared: one interpreter per script would
    cost more than this file's real runs): it imports, parses and describes itself."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    assert e.value.code == 0
    out = capsys.readouterr().out
    doc = ast.get_docstring(ast.parse((BENCH / f"{name}.py").read_text()))
    assert out.startswith("usage: ") and " ".join(doc.splitlines()[0].split()[:4]) in " ".join(out.split())


def test_engine_check_engine_half_imports_no_dspark_train():
    """`make engine-check` runs the engine half in .venv-engine, which has no dspark_train: the module and every
    function but the prepare phase's import none of it (and it runs with dspark_train unimportable)."""
    tree = ast.parse((BENCH / "engine_check.py").read_text())
    for node in tree.body:
        inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in inner
                 for a in (n.names if isinstance(n, ast.Import) else [None])]
        if getattr(node, "name", "") not in ("prepare", "_fresh_run", "_our_chain"):
            assert not any((m or "").startswith("dspark_train") for m in names), \
                f"{getattr(node, 'name', 'the module')} (line {node.lineno}) imports dspark_train"
    code = ("import runpy, sys; sys.modules['dspark_train'] = None; sys.argv = ['engine_check', '--help']; "
            "runpy.run_module('bench.engine_check', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0 and "prepare" in p.stdout, p.stderr


def test_results_docs_are_generated_from_the_committed_files():
    """docs/results.md and the README's results table are what `make results` makes of eval/results/*.json (a
    number quoted there traces to a file and a command): `python -m bench.results --check` regenerates both in
    memory and compares."""
    bench("results", "--check")


def test_learning_curve_lists_its_variants():
    out = bench("learning_curve", "--list")
    assert "baseline" in out and "train.loss=kl_to_l1" in out


# --------------------------------------------------------------------------- real runs on a tiny trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny recipe trained for 2 steps (held-out evaluations at steps 0 and 2), as `python -m
    dspark_train.train` runs it."""
    out = tmp_path_factory.mktemp("bench") / "run"
    sets = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "drafter.draft_vocab_size=256",
            "train.num_threads=1", "train.mixed_precision='no'", "logging.trackers=[]", "logging.progress_bar=false",
            f"train.output_dir={out}"]
    p = subprocess.run([sys.executable, "-m", "dspark_train.train", TINY, *[a for s in sets for a in ("--set", s)]],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def artifact(run):
    from dspark_train.artifacts.export import export_run
    return export_run(run, run.parent / "artifact")


@pytest.fixture(scope="module")
def report(artifact):
    """A `dspark eval --out` directory of that artifact (one MBPP prompt)."""
    from dspark_train.cli import main as cli_main
    out = artifact.parent / "eval"
    assert cli_main(["eval", str(artifact), "--benchmarks", "mbpp", "--n", "1", "--max-new-tokens", "6", "--dtype",
                     "float32", "--baselines", "", "--no-fastest-plain", "--out", str(out), "--no-progress"]) == 0
    return out


def test_bench_round_splits_each_round_by_the_decoders_own_phase_timings(artifact, tmp_path, monkeypatch):
    """Every phase of the table comes from RoundTrace (no timer wrapped around the decoder): each is ≥ 0, they
    leave nothing but the loop's own "other" of a round's wall time, and the drafter phases are where they belong."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.bench_round import PHASES
    bench("bench_round", artifact, "--benchmarks", "mbpp", "--n", 1, "--max-new-tokens", 8, "--modes", "chain,hybrid",
          "--threads", 1, "--dtype", "float32", "--out", tmp_path / "round", env={"DSPARK_CACHE": str(tmp_path)})
    data = json.loads((tmp_path / "round.json").read_text())
    assert [r["mode"] for r in data["results"]] == ["chain", "hybrid"] and data["prompts"] == 1
    for r in data["results"]:
        ms = r["phases_ms"]
        assert tuple(ms) == PHASES and all(v >= 0 for v in ms.values()), ms
        assert ms["verify"] > 0 and ms["lm head"] > 0 and ms["kv update"] > 0 and ms["acceptance"] > 0
        assert sum(ms.values()) == pytest.approx(r["round_ms"], abs=0.01 * len(PHASES))
        assert ms["other"] < 0.5 * r["round_ms"]  # the phases account for most of a round
        assert (ms["copy drafter"] > 0) == (r["mode"] == "hybrid")
    chain = data["results"][0]["phases_ms"]
    assert chain["propose"] > 0 and chain["head steps"] > 0 and chain["context extension"] > 0
    assert (tmp_path / "round.md").read_text().count("| verify |") == 1


def test_bench_decode_on_the_tiny_target(tmp_path):
    bench("bench_decode", "--target", TINY, "--n", 1, "--benchmarks", "mbpp", "--max-new-tokens", 8, "--modes",
          "chain", "--curve", 4, "--gamma", 3, "--draft-vocab", 0, "--json", tmp_path / "decode.json")
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["dtype"] == "float32" and len(data["verify_cost"]["tokens"]) == 4
    (chain,) = data["modes"]
    assert chain["agreement"] == 1.0 and chain["tau"] >= 1 and chain["rounds"] > 0  # fp32: lossless


def test_bench_draft_on_the_tiny_target():
    out = bench("bench_draft", "--target", TINY, "--dtype", "float32", "--layers", 1, "--draft-vocab", 0, "--gamma", 3,
                "--context", 32, "--repeats", 1)
    row = out.splitlines()[-1].split()
    assert row[:2] == ["1", "markov"] and row[-1].endswith("ms")


def test_bench_hybrid_on_the_tiny_target(artifact, tmp_path):
    bench("bench_hybrid", "--target", TINY, "--drafter", artifact, "--context", 64, "--rounds", 4, "--repeats", 1,
          "--random-prompts", 1, "--random-length", 8, "--max-new-tokens", 8, "--json", tmp_path / "hybrid.json",
          env={"DSPARK_CACHE": str(tmp_path)})
    data = json.loads((tmp_path / "hybrid.json").read_text())
    assert data["mode"] == "tree"  # adaptive asked, no calibration.json: tree
    assert data["copy_cost"]["context"] == 64 and data["random_prompts"]["identical_outputs"] == "1/1"


def test_record_report_commits_an_eval_report(report, tmp_path):
    bench("record_report", report, "--name", "smoke", "--title", "a smoke report", "--out", tmp_path / "smoke",
          "--command", "dspark eval ARTIFACT --n 1")
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["report"] == json.loads((report / "report.json").read_text())  # every measured number, unchanged
    assert data["title"] == "a smoke report" and data["commands"] == ["dspark eval ARTIFACT --n 1"]
    assert (tmp_path / "smoke.md").read_text() == (report / "report.md").read_text()
    assert (tmp_path / "smoke.png").read_bytes() == (report / "speedup.png").read_bytes()


def test_long_run_records_a_run_with_its_eval(run, report, tmp_path):
    bench("long_run", run, "--eval", report / "report.json", "--out", tmp_path / "long", "--command", "a test")
    data = json.loads((tmp_path / "long.json").read_text())
    assert [r["step"] for r in data["curve"]] == [0, 2] and data["summary"]["steps"] == 2
    assert set(data["dev_sets"]) == {"mbpp"} and data["dev_sets"]["mbpp"]["lossless"] is True
    assert set(data["goals"]) == {"heldout_tau_greedy_ge_2", "drafter_alone_beats_prompt_lookup",
                                  "drafter_share_ge_40pct_gsm8k", "tuner_drafts"}
    assert data["commands"] == ["a test"] and (tmp_path / "long.png").read_bytes()[:4] == b"\x89PNG"


def test_kind_throughput_profiles_both_kinds_online_and_cached(tmp_path):
    """DSpark vs EAGLE-3 training throughput, on the tiny recipe: each kind's trainer steps online and from the
    feature cache, its ratios recorded per round."""
    bench("kind_throughput", "--dspark", TINY, "--eagle3", TINY, "--steps", 1, "--rounds", 1, "--peak-size", 64,
          "--set", "train.mixed_precision='no'", "--out", tmp_path / "kinds")
    data = json.loads((tmp_path / "kinds.json").read_text())
    assert set(data["rows"]) == {"dspark, online", "eagle3, online", "dspark, feature cache", "eagle3, feature cache"}
    assert all(r["tokens_per_s"] > 0 and "backward" in r["phases_ms"] for r in data["rows"].values())
    assert [p["kind"] for p in data["profiles"]["eagle3, online"]] == ["eagle3"]
    assert "cache read" in data["rows"]["eagle3, feature cache"]["phases_ms"]
    assert set(data["ratio_dspark_over_eagle3"]) == {"online", "feature cache"}


@pytest.mark.slow
def test_methods_trains_and_evaluates_every_method(tmp_path):
    """`make methods` on the tiny recipe with a seconds-long budget: the four methods trained by our trainer,
    calibrated, exported and evaluated in chain, tree and adaptive modes (lossless), the table, JSON and plot
    written. Slow: four trainings and twelve evaluations, 7 minutes on a loaded 2-core CPU."""
    out = bench("methods", "--minutes", 0.05, "--recipe", TINY, "--eagle3-recipe", TINY, "--benchmarks", "mbpp",
                "--n", 1, "--max-new-tokens", 6, "--runs", tmp_path / "runs", "--out", tmp_path / "methods",
                "--set", "train.mixed_precision='no'", "--set", "train.num_threads=1", "--set", "logging.trackers=[]",
                "--set", "train.eval_every=1000")
    data = json.loads((tmp_path / "methods.json").read_text())
    assert list(data["methods"]) == ["dspark-markov", "dflash", "eagle3", "medusa"] and data["lossless"] is True
    for name, row in data["methods"].items():
        assert row["steps"] >= 1 and row["train_seconds"] < 30, (name, row)
        assert set(row["modes"]) == {"chain", "tree", "adaptive"} and row["best_tree_mode"] in ("tree", "adaptive")
        assert row["modes"]["chain"]["mbpp"]["tau"] >= 1
    assert json.loads((tmp_path / "runs" / "eagle3" / "final" / "config.json").read_text())["kind"] == "eagle3"
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG" and "| eagle3 |" in out
    # again, chain and tree only: every training and evaluation reused, nothing calibrated
    again = bench("methods", "--minutes", 0.05, "--recipe", TINY, "--eagle3-recipe", TINY, "--benchmarks", "mbpp",
                  "--n", 1, "--max-new-tokens", 6, "--runs", tmp_path / "runs", "--out", tmp_path / "again",
                  "--modes", "chain,tree")
    assert again.count("reusing ") == 8 and "dspark train" not in again and "dspark calibrate" not in again, again
    data = json.loads((tmp_path / "again.json").read_text())
    assert all(set(row["modes"]) == {"chain", "tree"} and row["best_tree_mode"] == "tree"
               for row in data["methods"].values())


@pytest.mark.parametrize("modes", ["tree,adaptive", "chain", "chain,tree,hybrid"])
def test_methods_refuses_modes_without_chain_and_a_tree_mode(modes):
    p = subprocess.run([sys.executable, "-m", "bench.methods", "--modes", modes], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"--modes {modes}: chain and at least one of tree, adaptive" in p.stderr, p.stderr


def test_bench_load_concurrency_table_and_plot_on_the_tiny_target(artifact, tmp_path):
    """[T] smoke (`make load-eval`'s first part): the speedup-vs-concurrency result file on the tiny artifact, with the
    bench.load invocation and the dspark command that made it, the CPU, a row per R and dev set, the goals, the plot;
    a missing artifact is refused before anything runs."""
    out = tmp_path / "results"
    bench("load", artifact, "--parts", "concurrency", "--benchmarks", "mbpp", "--concurrency", "1,2", "--n", 2,
          "--max-new-tokens", 6, "--eval-arg=--dtype", "--eval-arg=float32", "--out-dir", out, "--label", "t",
          env={"DSPARK_CACHE": str(tmp_path / "cache")})
    [result] = out.glob("concurrency-*-t.json")
    data = json.loads(result.read_text())
    assert data["commands"][0].startswith("python -m bench.load ") and "--concurrency 1,2" in data["commands"][0]
    assert data["commands"][1].startswith(f"dspark eval {artifact} --concurrency 1,2 --benchmarks mbpp")
    assert data["cpu"].startswith("cpu: ") and data["report"]["dtype"] == "float32"
    assert set(data["speedup_by_r"]["mbpp"]) == {"1", "2"} and all(x > 0 for x in data["speedup_by_r"]["mbpp"].values())
    assert data["goals"]["mbpp: identical to plain one-at-a-time, every request, every R"] is True
    assert "| 2 |" in data["markdown"] and "Goals:" in data["markdown"]
    assert result.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    p = subprocess.run([sys.executable, "-m", "bench.load", str(tmp_path / "nothing"), "--parts", "concurrency"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no such directory" in p.stderr and "make demo" in p.stderr


@pytest.mark.slow
def test_bench_load_writes_the_three_result_files_on_the_tiny_target(run, artifact, tmp_path):
    """[T]: bench.load's three parts on the tiny run (calibrated first: the temperature part decodes in adaptive
    mode), each writing its result file with the commands and the CPU, and its goals checked."""
    import shutil

    from dspark_train.calibration.calibrate import run_calibration
    quick = ["calibrate.texts=0", "calibrate.prompts=1", "calibrate.measure=false", "calibrate.max_new_tokens=8"]
    calibrated = tmp_path / "artifact"
    shutil.copytree(artifact, calibrated)
    run_calibration(run, overrides=quick, out=calibrated, quiet=True)
    out = tmp_path / "results"
    bench("load", calibrated, "--run", run, "--benchmarks", "mbpp", "--concurrency", "1,2", "--n", 2, "--n-sampled", 1,
          "--max-new-tokens", 6, "--temperatures", "0,1.0", "--calibrations", 2,
          *[a for s in quick for a in ("--calibrate-set", s)], "--out-dir", out, "--label", "t",
          env={"DSPARK_CACHE": str(tmp_path / "cache")})
    files = {p.name for p in out.iterdir()}
    slug = next(f for f in files if f.startswith("concurrency-") and f.endswith("-t.json")).removeprefix(
        "concurrency-").removesuffix("-t.json")
    for stem in ("concurrency", "temperature", "calibration-stability"):
        data = json.loads((out / f"{stem}-{slug}-t.json").read_text())
        assert data["commands"] and data["cpu"].startswith("cpu: ") and data["goals"], stem
        assert (out / f"{stem}-{slug}-t.md").read_text().count("Goals:") == 1
    assert f"concurrency-{slug}-t.png" in files
    conc = json.loads((out / f"concurrency-{slug}-t.json").read_text())
    assert conc["report"]["concurrency"] == [1, 2] and "--concurrency 1,2" in conc["commands"][0]
    temp = json.loads((out / f"temperature-{slug}-t.json").read_text())
    assert set(temp["table"]["mbpp"]) == {"0.0", "1.0"} and temp["table"]["mbpp"]["0.0"]["tuner"] is not None
    stab = json.loads((out / f"calibration-stability-{slug}-t.json").read_text())
    assert [c["loaded"] for c in stab["calibrations"]] == [False, True]
    assert "(another process busy on one core)" in stab["commands"][2]
