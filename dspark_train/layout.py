"""Where things live, and the one way files are written.

The run directory is the hand-off between stages: `dspark train` writes it, `dspark calibrate` adds to it,
`dspark export` turns it into an artifact. Every stage names its files through `RunDir`, so this docstring is
the whole contract:

    runs/<name>/
      recipe.yaml                  resolved recipe (train; calibrate and export read it)
      heldout_ids.json             the held-out split {"format_version", "conversations", "seed", "ids"}
                                   (train; calibrate)
      draft_vocab.json             {"format_version", "ids"}: target ids of a pruned draft vocabulary (train;
                                   reused on resume)
      metrics.jsonl                one record per step and per evaluation (train)
      checkpoints/step-NNNNNN/     drafter.safetensors, optimizer.safetensors, rng-<rank>.safetensors,
                                   trainer_state.json with its format_version (train; resume)
      checkpoints/latest           name of the newest complete checkpoint
      feature_cache/<key>/         cached target features, `data.feature_cache` (train; feature_cache.py)
      final/                       the trained drafter, `save_pretrained` (train; calibrate, export)
      train_summary.json           steps, tokens, held-out metrics (train; the model card)
      calibration.json             STS + adaptive policy + cost profile (calibrate; decoder, export)
      calibration_stats.npz        replayed STS statistics (calibrate)
      calibration_reliability.png  reliability diagram (calibrate)
      eval/                        report.json, report.md, plots (`dspark eval --out`, the demo)
      artifact/                    the exported artifact (the demo's `dspark export`)
      data.jsonl                   regenerated conversations when the demo had none

One writer at a time: every command that writes a run directory (train, calibrate, export, data, eval --out)
holds its lock, `<parent>/.<name>.lock` beside it (`lock_path`, runlock.py); a second one is refused.

Writers never leave half a file: `write_atomic` writes a sibling temp file and renames it over the target
(rename is atomic on POSIX), `atomic_path` does the same for writers that want a file name, and
`replace_dir` moves a finished temp directory (conventionally `staging_dir(dest)`) into place.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .config import RecipeError, utf8_text

RECIPE = "recipe.yaml"
HELDOUT = "heldout_ids.json"
DRAFT_VOCAB = "draft_vocab.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
TRAIN_SUMMARY = "train_summary.json"
CALIBRATION = "calibration.json"
CONFIG, WEIGHTS = "config.json", "model.safetensors"  # a drafter directory (final/, an artifact)
REPORT_JSON, REPORT_MD, OUTPUTS = "report.json", "report.md", "outputs.jsonl"  # `dspark eval --out DIR`
CALIBRATION_STATS = "calibration_stats.npz"
RELIABILITY_PLOT = "calibration_reliability.png"
EVAL = "eval"
ARTIFACT = "artifact"
DATA = "data.jsonl"
FEATURE_CACHE = "feature_cache"
TRAINER_STATE = "trainer_state.json"
CKPT_WEIGHTS = "drafter.safetensors"
CKPT_OPTIMIZER = "optimizer.safetensors"
STAGING = ".tmp-"  # prefix of a directory being written beside its final name
# format_version written into the run's JSON files and checked by their readers (`check_version`)
HELDOUT_VERSION = DRAFT_VOCAB_VERSION = TRAINER_STATE_VERSION = 1


@dataclass(frozen=True)
class RunDir:
    """Paths inside one training run directory (nothing is created by naming it)."""

    root: Path

    def __init__(self, root: Union[str, Path]):
        object.__setattr__(self, "root", Path(root).expanduser())

    recipe = property(lambda self: self.root / RECIPE)
    heldout = property(lambda self: self.root / HELDOUT)
    draft_vocab = property(lambda self: self.root / DRAFT_VOCAB)
    metrics = property(lambda self: self.root / METRICS)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    final = property(lambda self: self.root / FINAL)
    train_summary = property(lambda self: self.root / TRAIN_SUMMARY)
    calibration = property(lambda self: self.root / CALIBRATION)
    calibration_stats = property(lambda self: self.root / CALIBRATION_STATS)
    reliability_plot = property(lambda self: self.root / RELIABILITY_PLOT)
    eval = property(lambda self: self.root / EVAL)
    artifact = property(lambda self: self.root / ARTIFACT)
    data = property(lambda self: self.root / DATA)
    feature_cache = property(lambda self: self.root / FEATURE_CACHE)

    latest_pointer = property(lambda self: self.checkpoints / LATEST)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def checkpoint_dirs(self) -> list[Path]:
        """The complete (renamed into place) checkpoint directories, oldest first."""
        return sorted(self.checkpoints.glob("step-*"))

    def staged_checkpoints(self) -> list[Path]:
        """Checkpoint directories still being written, or left half-written by a kill."""
        return sorted(self.checkpoints.glob(f"{STAGING}step-*"))

    def latest_checkpoint(self) -> Optional[Path]:
        """The checkpoint `checkpoints/latest` names, if it is complete (its trainer_state.json exists)."""
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint directory (checkpoints/step-NNNNNN or its staging directory)."""

    root: Path

    weights = property(lambda self: self.root / CKPT_WEIGHTS)
    optimizer = property(lambda self: self.root / CKPT_OPTIMIZER)
    trainer_state = property(lambda self: self.root / TRAINER_STATE)

    def rng(self, rank: int) -> Path:
        return self.root / f"rng-{rank}.safetensors"


def lock_path(path: Union[str, Path]) -> Path:
    """The lock file of a run directory, artifact or output file (runlock.RunLock): `<parent>/.<name>.lock`,
    beside it, so replacing the directory whole keeps it and a copy of the run does not carry it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def staging_dir(dest: Path) -> Path:
    """The hidden sibling a writer fills before `replace_dir(staging_dir(dest), dest)`."""
    return dest.with_name(f"{STAGING}{dest.name}")


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends without error it is renamed onto `path`.
    The temp name keeps `path`'s suffix, for writers that choose a format by it (numpy, safetensors)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # per process: writers never share it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write text (UTF-8) or bytes to `path` through a temp file and a rename: readers see the old file or
    the new one, never a torn one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Move the finished directory `tmp` to `dest`, replacing what was there. The old copy is renamed aside
    first and removed only after the new one is in place, so a kill in between leaves one of the two."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- reading back
# Readers of the run's and the artifact's JSON files: a bad file is one line naming it, never a traceback.
class ArtifactError(RecipeError):
    """A missing, malformed or mismatched run or artifact file: the one-line message names the file or the
    field (the CLI prints it and exits 2, as for a bad recipe). Here, below every reader, because
    calibration.json is read by the decoder as well as by the artifact loader."""


def read_json_value(path: Union[str, Path]) -> Any:
    """The JSON value in `path` (UTF-8), or an ArtifactError naming the file (and the line, for bad UTF-8)."""
    path = Path(path)
    try:
        return json.loads(utf8_text(path.read_bytes(), path))
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read JSON ({e})") from None
    except RecipeError as e:  # invalid UTF-8, its line named
        raise ArtifactError(str(e)) from None


def read_json(path: Union[str, Path]) -> dict:
    """A JSON object from `path`, or an ArtifactError naming the file."""
    data = read_json_value(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def check_version(data: dict, path: Union[str, Path], current: int, fix: str = "upgrade dspark-train") -> int:
    """The `format_version` of a file this code wrote (absent: 1), refusing one it cannot read (newer, or not a
    positive int) in one line naming the file. Every versioned file's reader calls it."""
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= current:
        raise ArtifactError(f"{path}: format_version {version!r} is not one this dspark-train reads "
                            f"(1..{current}); {fix}")
    return version


class DataFileError(RecipeError):
    """A malformed line in a JSON-lines input: the one-line message names the file and the line (CLI: exit 2)."""


def iter_jsonl(path: Union[str, Path], skip_bad: bool = False, hint: str = "", quiet: bool = False
               ) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON-lines file: the one reader of every JSONL input.

    Lines end at b"\\n" only (never at U+2028/U+2029 or other separators a JSON string may hold unescaped; a
    trailing \\r is JSON whitespace), and each line is decoded as UTF-8 on its own, so a bad line names its
    number. A bad line (invalid UTF-8 or JSON) is a DataFileError ending in `hint` (how to skip it), or with
    `skip_bad` it is skipped and the skipped count is noted on stderr once the file is read (`quiet`: not noted,
    for this code's own append-only files, where a kill may tear the last line)."""
    path = Path(path)
    bad = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                why = f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {column})"
            else:
                if not text.strip():
                    continue
                try:
                    value = json.loads(text.rstrip("\r\n"))  # columns counted on the line itself
                except json.JSONDecodeError as e:
                    why = f"invalid JSON ({e.msg} at column {e.colno})"
                else:
                    yield lineno, value
                    continue
            if not skip_bad:
                raise DataFileError(f"{path}: line {lineno}: {why}" + (f"; {hint}" if hint else ""))
            bad.append(f"line {lineno}: {why}")
    if bad and not quiet:
        more = f", and {len(bad) - 1} more" if len(bad) > 1 else ""
        print(f"note: {path}: skipped {len(bad)} bad line{'s' if len(bad) > 1 else ''} ({bad[0]}{more})",
              file=sys.stderr)


def read_jsonl(path: Union[str, Path], skip_bad: bool = False, hint: str = "", quiet: bool = False) -> list:
    """Every value of a JSON-lines file (`iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, skip_bad, hint, quiet)]
