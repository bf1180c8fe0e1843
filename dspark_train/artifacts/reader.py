"""The drafter artifact's read side: its file names, resolving a local directory or a Hub id, and loading it with
its calibration (drafters/loading.py reads the weights and checks the target fingerprint; a speculators-format
directory reads through artifacts/speculators.py).

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

from ..policy.calibration import read_calibration
from ..drafters import Drafter
from ..drafters.loading import check_fingerprint, load_local
from . import speculators
from ..layout import CALIBRATION, CONFIG, RECIPE, WEIGHTS, ArtifactError

CARD = "README.md"
ARTIFACT_FILES = (CONFIG, WEIGHTS, CALIBRATION, RECIPE, CARD)  # what an artifact may hold, and all that is pushed
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def load_artifact(path_or_hub_id: str | Path, target=None, revision: Optional[str] = None,
                  ignore: Iterable[str] = (), token: Optional[str] = None) -> Drafter:
    """Load an exported artifact (local directory or Hub id) or a training run's final drafter.

    Returns the Drafter (eval mode) with `.calibration` set to calibration.json's dict (version-checked),
    or None when the artifact is uncalibrated. With a target: check the fingerprint (FingerprintMismatch
    names the field), move the drafter to the target's device and attach the target's frozen embedding and
    LM head."""
    root = resolve_artifact(path_or_hub_id, revision, token)
    if not speculators.is_speculators_dir(root):  # a `dspark export --format speculators` directory reads back too
        drafter = load_local(root, target, ignore)
    else:
        drafter = speculators.load_speculators(root)
        if target is not None:
            if drafter.config.target_fingerprint:  # speculators files from elsewhere record none
                check_fingerprint(drafter, target, ignore)
            drafter.to(target.device)
            drafter.attach_target(target)
    calibration = root / CALIBRATION
    drafter.calibration = read_calibration(calibration) if calibration.is_file() else None
    return drafter
