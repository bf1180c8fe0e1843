"""[O3] The package works where it is installed, not only inside its checkout.

The wheel built from this tree, installed in a fresh venv with the checkout nowhere on the path, trains the shipped
`tiny` recipe by name from an unrelated folder and writes the run there; the shipped recipes and the accelerate,
DeepSpeed and target configs are package data that resolve inside the install.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from dspark_train.recipe_codec import PTH_LINE, PTH_NAME

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
    "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _sources(dest: Path) -> Path:
    """The tree without what .gitignore leaves out (venvs, runs, an earlier build/), copied: the wheel is built from
    the sources as a clone holds them."""
    ignored = [line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    return Path(shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", *ignored), symlinks=True))


@pytest.mark.skipif(not (SHARED_DATA / "distill").is_dir(), reason="needs ../shared/data (the tiny recipe's data)")
def test_the_installed_wheel_trains_a_shipped_recipe_by_name_outside_the_checkout(tmp_path):
    # 1. build the wheel (the project venv holds setuptools: pyproject's test extra)
    src = _sources(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src], cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("dspark_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "dspark_train").rglob("*.py")}
    shipped = {"dspark_train/" + p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*")
               if p.suffix in (".yaml", ".json")}
    assert modules - names == set(), "modules missing from the wheel (pyproject.toml: [tool.setuptools] packages)"
    assert shipped - names == set() and "dspark_train/recipes/accelerate/ds_zero2.json" in shipped
    assert zipfile.ZipFile(wheel).read(PTH_NAME).decode() == PTH_LINE

    # 2. a fresh venv; the project venv's site-packages on its path for the dependencies (torch, ...): a path entry
    # runs none of that directory's .pth files, so the editable install of this checkout stays out
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (purelib / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: the editable dspark-train seen through that path is neither replaced nor uninstalled
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp_path,
         timeout=300)

    # 3. a user's folder, away from the checkout
    work = tmp_path / "work"
    work.mkdir()
    where = _run([python, "-c", "import dspark_train, sys; print(dspark_train.__file__, *sys.path, sep='\\n')"],
                 cwd=work).stdout.splitlines()
    assert Path(where[0]).is_relative_to(purelib) and str(REPO) not in where[1:], where

    # a shipped recipe run by name from the install: no data lives in the package, so its relative data.root is
    # taken from the current directory
    root = _run([python, "-c", "from dspark_train.config import load_recipe; print(load_recipe('tiny').data.root)"],
                cwd=work).stdout.strip()
    assert root == str((work / "../../shared/data").resolve())

    listing = _run([bin_dir / "dspark", "recipes"], cwd=work).stdout
    assert "tiny " in listing and "smollm2_135m " in listing and str(purelib / "dspark_train" / "recipes") in listing
    _run([bin_dir / "dspark", "recipes", "copy", "tiny", "my.yaml"], cwd=work)
    assert (work / "my.yaml").read_bytes() == (REPO / "recipes" / "tiny.yaml").read_bytes()
    # a shipped multi-GPU recipe: its target config and accelerate config resolve inside the install
    dry = _run([bin_dir / "dspark", "train", "qwen3_4b", "--dry-run"], cwd=work).stdout
    assert f"--config_file {purelib / 'dspark_train' / 'recipes' / 'accelerate' / 'zero2.yaml'}" in dry

    # 4. train the shipped `tiny` by name; its data through a relative --set (the current directory's data/)
    (work / "data").symlink_to(SHARED_DATA, target_is_directory=True)
    sets = ["data.root=data", "train.max_steps=2", "train.eval_every=2", "train.num_threads=1",
            "logging.progress_bar=false", "logging.trackers=[]", "drafter.draft_vocab_size=256"]
    proc = _run([bin_dir / "dspark", "train", "tiny", *[a for s in sets for a in ("--set", s)]], cwd=work,
                timeout=600)
    run = work / "runs" / "tiny"
    assert f"starting {run}" in proc.stdout, proc.stdout[-2000:]
    assert (run / "final" / "model.safetensors").is_file() and (run / "recipe.yaml").is_file()
    assert not list(purelib.rglob("runs")), "a run written inside site-packages"
    recorded = (run / "recipe.yaml").read_text()
    assert f"root: {(work / 'data').resolve()}" in recorded  # absolute: the run's recipe loads from anywhere
