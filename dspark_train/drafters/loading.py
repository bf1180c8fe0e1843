"""Loading a drafter directory from safetensors, and the check that it was trained for this target.

The read side every stage shares: calibration loads a run's `final/`, the artifact reader (artifacts/reader.py) an
exported directory or a Hub download, both through `load_local`. A directory is what `Drafter.save_pretrained`
writes (config.json + model.safetensors); a training run holds one in final/. Weights are safetensors only:
nothing is ever unpickled, and missing, extra or misshapen tensors are refused (transformers would only warn and
initialise them randomly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from safetensors import SafetensorError, safe_open

from ..layout import CONFIG, WEIGHTS, ArtifactError, RunDir, check_version, read_json
from .config import FORMAT_VERSION
from .model import Drafter

FINGERPRINT_FIELDS = ("model_id", "revision", "architecture", "num_hidden_layers", "hidden_size", "vocab_size",
                      "feature_layers", "tokenizer_hash")


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


def load_local(path: Path, target=None, ignore: Iterable[str] = ()) -> Drafter:
    """The drafter of a local artifact or finished run directory (eval mode); with a target: fingerprint checked
    (FingerprintMismatch names the field), moved to the target's device, its frozen embedding and LM head
    attached."""
    drafter = load_drafter(weights_dir(Path(path)))
    if target is not None:
        check_fingerprint(drafter, target, ignore)
        drafter.to(target.device)
        drafter.attach_target(target)
    return drafter
