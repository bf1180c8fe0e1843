"""[U] `accelerate launch recipes/x.yaml` works exactly as written: every shipped recipe is plain YAML that Python
runs as the trainer (dspark_train/recipe_codec.py), on one process and under a 2-process accelerate config."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dspark_train.config import load_recipe
from dspark_train.recipe_codec import DECLARATION, SOURCE, is_recipe_script, pth_path

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
SETS = ["--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "logging.progress_bar=false",
        "--set", "drafter.draft_vocab_size=256", "--set", "train.num_threads=1", "--set", "logging.trackers=[]"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_plain_yaml_and_a_recipe_script(recipe):
    text = recipe.read_text()
    assert text.startswith(DECLARATION) and is_recipe_script(recipe)
    assert isinstance(yaml.safe_load(text), dict)  # the declaration is a YAML comment
    load_recipe(recipe)  # and the typed loader takes it as before (`dspark plan`: tests/test_cli.py)


def test_the_codec_is_registered_at_interpreter_start_and_reads_nothing_else():
    assert pth_path().is_file(), f"{pth_path()} missing: run `python -m dspark_train.recipe_codec install`"
    probe = ("import sys; from dspark_train.recipe_codec import SOURCE; "
             "print(compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec').co_names)")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "recipes" / "tiny.yaml")], capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 0 and "main" in out.stdout, out.stderr  # the bytes decode to SOURCE
    assert "sys.exit(main([__file__" in SOURCE
    other = subprocess.run([sys.executable, "-c", "import codecs; print(codecs.lookup('utf-8').name)"],
                           capture_output=True, text=True, env=ENV)
    assert other.stdout.strip() == "utf-8"


def _check_run(out: Path, proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert load_recipe(out / "recipe.yaml").train.max_steps == 2  # the resolved recipe: a recipe script again
    assert is_recipe_script(out / "recipe.yaml")


def test_python_recipe_and_accelerate_launch_recipe_train(tmp_path):
    """`python recipes/tiny.yaml --set …` and `accelerate launch recipes/tiny.yaml --set …` (one process)."""
    for how, cmd in (("python", [sys.executable]), ("accelerate", ACCELERATE)):
        out = tmp_path / how
        proc = subprocess.run(cmd + ["recipes/tiny.yaml", *SETS, "--set", f"train.output_dir={out}"], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=600)
        _check_run(out, proc)


def test_a_bad_key_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes" / "tiny.yaml").read_text() + "\nbogus_section:\n  x: 1\n")
    for cmd in ([sys.executable], ACCELERATE):
        proc = subprocess.run(cmd + [str(bad)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert f"error: {bad}: bogus_section: unknown key" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr  # neither ours nor accelerate's wrapper


@pytest.mark.slow
def test_accelerate_launch_recipe_on_two_cpu_processes(tmp_path):
    """The same under a 2-process accelerate config over gloo (DeepSpeed ZeRO-2 for the drafter)."""
    out = tmp_path / "two"
    proc = subprocess.run(ACCELERATE + ["--config_file", "recipes/accelerate/zero2.yaml", "--num_processes", "2",
                                        "recipes/tiny.yaml", *SETS, "--set", f"train.output_dir={out}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    _check_run(out, proc)
    assert "world_size" in (out / "train_summary.json").read_text()
    assert '"world_size": 2' in (out / "train_summary.json").read_text()
