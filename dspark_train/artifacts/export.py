"""`dspark export` and `dspark push`: write the artifact of a finished training run (weights, resolved recipe,
calibration, model card from card.py) or a speculators-format copy for vLLM, upload it to the Hub.

The artifact's files and its read side (load, fingerprint check) are artifact.py's; calibration.json's schema
is calibration.py's. Export writes into a temporary sibling directory and renames it into place
(`layout.replace_dir`), so an interrupted export never leaves a half-written artifact.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .reader import ARTIFACT_FILES, CARD, load_artifact, resolve_artifact
from ..drafters.loading import check_fingerprint, check_safetensors, load_drafter, recorded_fingerprint
from . import speculators
from .card import render_model_card
from ..policy.calibration import read_calibration
from ..config import RecipeError
from ..layout import (CALIBRATION, CONFIG, RECIPE, REPORT_JSON, WEIGHTS, ArtifactError, RunDir, read_json, replace_dir,
                      staging_dir)
from ..runlock import holds_lock
from ..runrecord import read_run, target_of


class PushError(RecipeError):
    """The Hub upload did not happen or did not complete; nothing is reported as uploaded (CLI: exit 2)."""


# --------------------------------------------------------------------------- export
def _finish_tree(path: Path) -> None:
    """Ordinary permissions and everything on disk before the rename."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)
        with open(f, "rb") as h:
            os.fsync(h.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@holds_lock(lambda run_dir, out_dir, force=False: out_dir, "dspark export")
def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the artifact for a finished training run into out_dir (atomically); returns out_dir."""
    run, out = RunDir(run_dir), Path(out_dir).expanduser()
    if not (run.final / CONFIG).is_file():
        raise ArtifactError(f"{run.root}: no {run.final.name}/{CONFIG}; is this a finished training run directory?")
    if not run.recipe.is_file():
        raise ArtifactError(f"{run.root}: no {RECIPE} (the resolved recipe the trainer writes)")
    r_run, r_out = run.root.resolve(), out.resolve()
    r_final = run.final.resolve()
    if r_run == r_out or r_out in r_run.parents or r_out == r_final or r_final in r_out.parents:
        raise ArtifactError(f"{out}: would overwrite the training run itself; choose another OUT_DIR")
    if out.exists() and not force:
        raise ArtifactError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory")

    # read and validate every input before writing anything
    drafter = load_drafter(run.final)
    recorded_fingerprint(drafter)
    record = read_run(run.root)
    recipe_text, recipe = record.text, record.recipe.to_dict()
    calibration = read_calibration(run.calibration) if run.calibration.is_file() else None
    report = _optional_json(run.eval / REPORT_JSON)
    summary = _optional_json(run.train_summary)

    def fill(tmp: Path) -> None:
        drafter.save_pretrained(tmp)
        config = read_json(tmp / CONFIG)
        tensors = check_safetensors(tmp / WEIGHTS)
        (tmp / RECIPE).write_text(recipe_text)
        if calibration is not None:
            shutil.copyfile(run.calibration, tmp / CALIBRATION)
        (tmp / CARD).write_text(render_model_card(config, recipe, calibration=calibration, report=report,
                                                  summary=summary, num_parameters=_count_parameters(tensors)))
    return _write_dir(out, fill)


def _write_dir(out: Path, fill) -> Path:
    """Fill a staging sibling of `out`, flush it to disk, then swap it in: an interrupted export leaves the
    previous `out` (or nothing), never half a directory."""
    tmp = staging_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier export
    tmp.mkdir()
    try:
        fill(tmp)
        _finish_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@holds_lock(lambda src, out, *a, **k: out, "dspark export")
def export_speculators(src: str | Path, out: str | Path, target=None, mask_token_id: Optional[int] = None,
                       force: bool = False) -> Path:
    """`dspark export --format speculators`: write `src` (training run or artifact) to `out` in the format vLLM
    and speculators load (see speculators.py for the format), atomically. `target`: the FrozenTarget it was
    trained for (default: built from src's recipe.yaml) supplies the LM-head rows of a pruned vocabulary and,
    for a learned MASK, the embedding table."""
    from safetensors.torch import save_file

    from ..target import load_target

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.exists() and not force:
        raise ArtifactError(f"{out}: already exists; pass --force to replace it")
    drafter = load_artifact(src)
    c = drafter.config
    why = speculators.refusal(c)
    if why:
        raise speculators.FormatError(f"{src}: cannot export to speculators format: {why}")
    root = resolve_artifact(src)
    if target is None:
        target = load_target(target_of(root))
    check_fingerprint(drafter, target)
    if c.mask_token_id is not None:
        if mask_token_id not in (None, c.mask_token_id):
            raise speculators.FormatError(f"--mask-token-id {mask_token_id}: the drafter was trained with the "
                                          f"frozen row {c.mask_token_id} as MASK")
        mask_token_id = c.mask_token_id
    elif mask_token_id is None:
        mask_token_id = speculators.pick_mask_token_id(target.tokenizer, c.vocab_size)
    if not 0 <= mask_token_id < c.vocab_size:
        raise speculators.FormatError(f"--mask-token-id {mask_token_id}: outside the vocabulary "
                                      f"0..{c.vocab_size - 1}")
    fp = c.target_fingerprint or {}
    cfg = speculators.speculators_config(
        drafter, getattr(target.config.get_text_config(), "max_position_embeddings", 32768), mask_token_id,
        fp.get("model_id") or target.name)
    tensors = speculators.speculators_tensors(drafter, target.embed_tokens.weight, target.lm_head.weight,
                                              mask_token_id)
    speculators.check_tensors(cfg, {k: tuple(v.shape) for k, v in tensors.items()})

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        for name in (RECIPE, CALIBRATION):
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
    return _write_dir(out, fill)


def _optional_json(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None


def _count_parameters(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """Trainable-size figure for the card: floating-point tensors only (the int draft-vocab map is not one)."""
    return sum(math.prod(shape) for dtype, shape in tensors.values() if "F" in dtype.upper())


# --------------------------------------------------------------------------- Hub push
@dataclass
class PushResult:
    repo_id: str
    revision: str
    private: bool
    files: list[tuple[str, int]]  # (name, bytes)
    commit_message: str
    dry_run: bool
    commit_url: Optional[str] = None

    def describe(self) -> str:
        total = sum(n for _, n in self.files)
        verb = "would upload" if self.dry_run else "uploaded"
        head = (f"{verb} {len(self.files)} files ({_size(total)}) to https://huggingface.co/{self.repo_id} "
                f"(model repo, {'private' if self.private else 'public'}, branch {self.revision}):")
        body = [f"  {name:<20} {_size(n):>10}" for name, n in self.files]
        tail = [f"commit message: {self.commit_message}"]
        if self.commit_url:
            tail.append(f"commit: {self.commit_url}")
        return "\n".join([head, *body, *tail])


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def push_artifact(out_dir: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                  commit_message: Optional[str] = None, dry_run: bool = False,
                  token: Optional[str] = None) -> PushResult:
    """Upload an artifact with huggingface_hub (create_repo, create_branch when needed, upload_folder).

    Prints what it uploads and where. The token comes from `token`, else HF_TOKEN or the stored login; it is
    never printed. dry_run checks the artifact and lists the files without touching the network."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HTTPError
    from huggingface_hub.utils import validate_repo_id

    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise ArtifactError(f"{out}: artifact directory not found")
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise ArtifactError(f"{repo_id}: invalid Hub repo id ({e})") from None
    for name in (CONFIG, WEIGHTS, CARD):
        if not (out / name).is_file():
            raise ArtifactError(f"{out}: no {name}; export the run first (`dspark export RUN_DIR {out}`)")
    recorded_fingerprint(read_json(out / CONFIG))
    check_safetensors(out / WEIGHTS)
    files = [(n, (out / n).stat().st_size) for n in ARTIFACT_FILES if (out / n).is_file()]
    branch = revision or "main"
    message = commit_message or f"Upload dspark-train drafter ({', '.join(n for n, _ in files)})"
    result = PushResult(repo_id, branch, private, files, message, dry_run)
    if dry_run:
        print(result.describe())
        found = token or get_token()
        print("token: " + ("found" if found else "none found (a real push needs HF_TOKEN or `hf auth login`)"))
        return result

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    api = HfApi(token=token)
    print(f"uploading {len(files)} files to https://huggingface.co/{repo_id} (branch {branch}) ...", flush=True)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model", revision=branch,
                                 commit_message=message, allow_patterns=[n for n, _ in files])
    except (OSError, HTTPError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise PushError(f"push to {repo_id} failed, nothing reported as uploaded "
                        f"({type(e).__name__}: {detail.replace(token, '***')})") from None
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    result.dry_run = False
    print(result.describe())
    return result
