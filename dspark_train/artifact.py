"""The drafter artifact's read side: its file names, resolving a local directory or a Hub id, loading the
drafter from safetensors (refusing missing or extra tensors), and the target fingerprint check.

An artifact is a directory that `Drafter.from_pretrained` reads, plus what a user needs around it (the
contract of docs/method.md §7):

    config.json        drafter config: architecture, block size, feature layers, `format_version`,
                       `target_fingerprint` (model id/revision, architecture, layers, hidden/vocab size,
                       feature layers, tokenizer hash)
    model.safetensors  drafter weights only (the target's embedding and LM head are shared at load time)
    calibration.json   STS temperatures, adaptive-k thresholds, cost profile (only when calibrated;
                       schema: calibration.py)
    recipe.yaml        the resolved recipe it was trained with
    README.md          model card with Hub metadata

A finished training run reads the same way: its `final/` holds config.json and model.safetensors, its root
the recipe and calibration (layout.RunDir). Writing an artifact is export.py's job. Weights are
safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from safetensors import SafetensorError, safe_open

from .calibration import read_calibration
from .drafters import Drafter
from .drafters.config import FORMAT_VERSION
from . import speculators
from .layout import CALIBRATION, RECIPE, ArtifactError, RunDir, check_version, read_json

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
ARTIFACT_FILES = (CONFIG, WEIGHTS, CALIBRATION, RECIPE, CARD)  # what an artifact may hold, and all that is pushed
FINGERPRINT_FIELDS = ("model_id", "revision", "architecture", "num_hidden_layers", "hidden_size", "vocab_size",
                      "feature_layers", "tokenizer_hash")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class FingerprintMismatch(ArtifactError):
    """The artifact was trained against a different target than the one it is being loaded with."""


def check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Open the header (this also catches truncation: every tensor's bytes must lie inside the file).
    Returns {name: (dtype, shape)}."""
    if not path.is_file():
        hint = " (pickle checkpoints are not loaded: save with safetensors)" if any(
            path.with_name(n).exists() for n in ("pytorch_model.bin", "model.bin")) else ""
        raise ArtifactError(f"{path}: weights file not found{hint}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: corrupted or truncated safetensors file ({e}); re-export or re-download it") \
            from None


# --------------------------------------------------------------------------- fingerprint
def recorded_fingerprint(obj) -> dict:
    """The target fingerprint a drafter, its config (object or dict) or an artifact/run directory records."""
    if isinstance(obj, (str, Path)):
        obj = read_json(weights_dir(Path(obj)) / CONFIG)
    obj = getattr(obj, "config", obj)  # a Drafter
    fp = obj.get("target_fingerprint") if isinstance(obj, dict) else getattr(obj, "target_fingerprint", None)
    if not isinstance(fp, dict) or not fp:
        raise ArtifactError("the drafter config records no target_fingerprint; cannot check it against the target")
    return fp


def check_fingerprint(drafter_config_or_artifact, target, ignore: Iterable[str] = ()) -> None:
    """Refuse a target the drafter was not trained for. `target`: a FrozenTarget or its fingerprint dict.

    Every recorded field must match; `revision` only when both sides pin one. `ignore` names fields to skip,
    e.g. ("model_id",) for the same model loaded from a local copy under another name."""
    recorded = recorded_fingerprint(drafter_config_or_artifact)
    actual = target if isinstance(target, dict) else target.fingerprint()
    ignore = set(ignore)
    diffs = []
    for key in sorted(recorded, key=lambda k: (k not in FINGERPRINT_FIELDS, k)):  # what the drafter recorded
        a, b = recorded.get(key), actual.get(key)
        if key in ignore or (key == "revision" and (a is None or b is None)):
            continue
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            diffs.append(f"{key}: drafter trained for {a!r}, target has {b!r}")
    if diffs:
        raise FingerprintMismatch("drafter does not match this target (" + "; ".join(diffs) + ")")


# --------------------------------------------------------------------------- loading
def weights_dir(path: Path) -> Path:
    """An artifact holds config.json itself; a training run holds it in final/."""
    if (path / CONFIG).is_file():
        return path
    final = RunDir(path).final
    if (final / CONFIG).is_file():
        return final
    raise ArtifactError(f"{path}: no {CONFIG} (neither an artifact nor a finished training run with {final.name}/)")


def resolve_artifact(path_or_hub_id: str | Path, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    """A local artifact or run directory as is; otherwise a Hub model id, downloaded with snapshot_download."""
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        return p
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise ArtifactError(f"{name}: no such directory, and not a Hub model id (owner/name)")
    from huggingface_hub import snapshot_download  # looked up per call: tests replace it with a fake
    from huggingface_hub.errors import HTTPError

    try:
        return Path(snapshot_download(name, repo_type="model", revision=revision, token=token,
                                      allow_patterns=list(ARTIFACT_FILES)))
    except (OSError, HTTPError, ValueError) as e:
        raise ArtifactError(f"{name}: not a local directory, and downloading it from the Hub failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_drafter(weights: Path) -> Drafter:
    """`Drafter.from_pretrained` from safetensors only (`weights`: the directory holding config.json and
    model.safetensors), refusing missing, extra or misshapen tensors (transformers would only warn and
    initialise them randomly)."""
    config = read_json(weights / CONFIG)
    check_version(config, weights / CONFIG, FORMAT_VERSION)
    weights_file = weights / WEIGHTS
    check_safetensors(weights_file)
    try:
        drafter, info = Drafter.from_pretrained(weights, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{weights_file}: cannot load the drafter ({type(e).__name__}: {e})") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in bad.items())
        raise ArtifactError(f"{weights_file}: does not fit the drafter in {CONFIG} ({detail})")
    return drafter.eval()


def load_artifact(path_or_hub_id: str | Path, target=None, revision: Optional[str] = None,
                  ignore: Iterable[str] = (), token: Optional[str] = None) -> Drafter:
    """Load an exported artifact (local directory or Hub id) or a training run's final drafter.

    Returns the Drafter (eval mode) with `.calibration` set to calibration.json's dict (version-checked),
    or None when the artifact is uncalibrated. With a target: check the fingerprint (FingerprintMismatch
    names the field), move the drafter to the target's device and attach the target's frozen embedding and
    LM head."""
    root = resolve_artifact(path_or_hub_id, revision, token)
    foreign = speculators.is_speculators_dir(root)  # a `dspark export --format speculators` directory reads back
    drafter = speculators.load_speculators(root) if foreign else load_drafter(weights_dir(root))
    if target is not None:
        if not foreign or drafter.config.target_fingerprint:  # speculators files from elsewhere record none
            check_fingerprint(drafter, target, ignore)
        drafter.to(target.device)
        drafter.attach_target(target)
    calibration = root / CALIBRATION
    drafter.calibration = read_calibration(calibration) if calibration.is_file() else None
    return drafter
