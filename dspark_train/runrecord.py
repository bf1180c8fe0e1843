"""A finished run read back: the one reader of what `dspark train` recorded, for a run directory or its artifact, so
calibrate, export, the model card and eval read a run the same way, here or on another machine.

- the recipe (`recipe.yaml`), loaded as recorded (`load_recipe(recorded=True)`): the files it named only for training
  and planning (an accelerate config, a target config.json) become null where they are absent, keys retired since
  are dropped; `overrides` (`--set`) apply and are checked as given;
- the target it names (`target`), or, for an artifact without a recipe, the model in its config's fingerprint
  (`target_of`);
- the held-out split (`heldout_ids.json`, a run's only: an artifact holds none), whose writer is `save_heldout_split`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import Recipe, RecipeError, TargetConfig, load_recipe, utf8_text
from .layout import (CONFIG, HELDOUT_VERSION, RECIPE, ArtifactError, RunDir, check_version, read_json, read_json_value,
                     write_atomic)


@dataclass(frozen=True)
class HeldoutSplit:
    """The conversations the trainer held out: their ids in the files they came from, and the seed of the split."""

    ids: list[str]
    conversations: list[Path]  # empty in the first runs' files (a bare list of ids)
    seed: Optional[int]
    path: Path


@dataclass(frozen=True)
class RunRecord:
    root: Path  # a training run directory or an artifact
    recipe: Recipe

    @property
    def target(self) -> TargetConfig:
        return self.recipe.target

    @property
    def text(self) -> str:
        """recipe.yaml as recorded (an export copies it unchanged)."""
        path = RunDir(self.root).recipe
        return utf8_text(path.read_bytes(), path)

    def heldout(self) -> Optional[HeldoutSplit]:
        """The run's held-out split as the trainer wrote it, version-checked; None where there is none."""
        path = RunDir(self.root).heldout
        if not path.is_file():
            return None
        raw = read_json_value(path)
        if isinstance(raw, dict):
            check_version(raw, path, HELDOUT_VERSION)
        if not isinstance(raw, list) and not (isinstance(raw, dict) and isinstance(raw.get("ids"), list)):
            raise ArtifactError(f'{path}: expected {{"format_version", "conversations", "seed", "ids": [...]}}')
        raw = {"ids": raw} if isinstance(raw, list) else raw
        files = raw.get("conversations") or []
        files = [files] if isinstance(files, str) else files  # one file is written as its path
        return HeldoutSplit([str(i) for i in raw["ids"]], [Path(p) for p in files], raw.get("seed"), path)


def read_run(root: Union[str, Path], overrides: Sequence[str] = ()) -> RunRecord:
    """The record of a finished run or of its artifact; FileNotFoundError naming `root` when it holds no recipe."""
    root = Path(root).expanduser()
    path = RunDir(root).recipe
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {RECIPE} (expected a training run directory or an artifact)")
    return RunRecord(root, load_recipe(path, overrides, recorded=True))


def target_of(root: Union[str, Path]) -> TargetConfig:
    """The target a run or an artifact was trained for: its recipe's, else the model its config.json's fingerprint
    names (an artifact without a recipe)."""
    root = Path(root).expanduser()
    if RunDir(root).recipe.is_file():
        return read_run(root).target
    conf = root / CONFIG
    if not conf.is_file():
        raise FileNotFoundError(f"artifact {root}: {CONFIG} not found")
    fp = read_json(conf).get("target_fingerprint") or {}
    if not fp.get("model_id") or fp["model_id"].startswith("inline:"):
        raise RecipeError(f"{conf}: target_fingerprint names no loadable model; pass --target")
    return TargetConfig(model=fp["model_id"], revision=fp.get("revision"))


def save_heldout_split(path: Path, conversations: list[Path], seed: int, held: list) -> None:
    """heldout_ids.json: which conversations the trainer held out (and from which files), so calibration probes
    exactly those."""
    files = [str(p) for p in conversations]
    write_atomic(path, json.dumps({"format_version": HELDOUT_VERSION,
                                   "conversations": files[0] if len(files) == 1 else files,
                                   "seed": seed, "ids": [str(c["id"]) for c in held]}, indent=1))
