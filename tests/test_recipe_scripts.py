"""[U] `accelerate launch recipes/x.yaml` works exactly as written: every shipped recipe is plain YAML that Python
runs as the trainer (dspark_train/recipe_codec.py), on one process and under a 2-process accelerate config.
[O3] The .pth that registers the codec costs nothing to the environment's other programs: it reads no argument,
imports nothing at start and survives a leftover `dspark_train/` folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dspark_train.config import load_recipe
from dspark_train.recipe_codec import DECLARATION, PTH_LINE, PTH_NAME, SOURCE, is_recipe_script, pth_path

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
    assert pth_path().is_file() and pth_path().read_text() == PTH_LINE, \
        f"{pth_path()} missing or out of date: run `python -m dspark_train.recipe_codec install` (make setup)"
    probe = ("import sys; from dspark_train.recipe_codec import SOURCE; "
             "print(compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec').co_names)")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "recipes" / "tiny.yaml")], capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 0 and "main" in out.stdout, out.stderr  # the bytes decode to SOURCE
    assert "sys.exit(main([__file__" in SOURCE
    other = subprocess.run([sys.executable, "-c", "import codecs; print(codecs.lookup('utf-8').name)"],
                           capture_output=True, text=True, env=ENV)
    assert other.stdout.strip() == "utf-8"


def _bare_venv(root: Path, *path_entries: Path) -> tuple[Path, Path]:
    """A fresh venv whose site-packages holds the codec's .pth and, ahead of it, `path_entries` on sys.path; returns
    (python, site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_paths.pth").write_text("".join(f"{p}\n" for p in path_entries))  # read before dspark_train_…
    (purelib / PTH_NAME).write_text(PTH_LINE)
    return python, purelib


def test_the_pth_reads_no_argument_and_imports_nothing_until_a_recipe_is_decoded(tmp_path):
    """The issue's FIFO: `python -c pass pipe.yaml` opened the argument at start and hung; now nothing of the package
    is imported (or any file read) until Python meets the `dspark-recipe` encoding, and then it decodes."""
    python, _ = _bare_venv(tmp_path / "venv", REPO)  # dspark_train importable from the checkout
    os.mkfifo(tmp_path / "pipe.yaml")
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith('dspark_train')))"
    proc = subprocess.run([python, "-c", probe, "pipe.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]" and proc.stderr == "", proc.stderr
    decode = ("import sys; print(compile(open(sys.argv[1], 'rb').read(), 'r', 'exec').co_names, "
              "'dspark_train.recipe_codec' in sys.modules)")
    proc = subprocess.run([python, "-c", decode, str(REPO / "recipes" / "tiny.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "'main'" in proc.stdout and proc.stdout.strip().endswith("True"), proc.stderr


def test_a_leftover_dspark_train_folder_costs_no_traceback(tmp_path):
    """An empty `dspark_train/` left in site-packages (or anywhere on the path) made every interpreter start print
    the .pth's ImportError traceback."""
    python, purelib = _bare_venv(tmp_path / "venv")
    (purelib / "dspark_train").mkdir()
    proc = subprocess.run([python, "-c", "pass"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


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
    """`python RECIPE` and `accelerate launch -q RECIPE`: the trainer's one line and nothing else (without -q,
    accelerate's launcher adds its own traceback after it, as for any script; `dspark train` passes -q)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes" / "tiny.yaml").read_text() + "\nbogus_section:\n  x: 1\n")
    for cmd in ([sys.executable], ACCELERATE + ["-q"]):
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
