"""The recipes and accelerate/DeepSpeed configs that ship with the package, found by name.

They are the checkout's `recipes/` folder, which pyproject.toml maps onto the subpackage `dspark_train.recipes`: a
wheel carries them as package data, and an editable install reads the checkout's own files. Either way
`importlib.resources` finds them, so `dspark train tiny` works wherever the package is installed, and `dspark
recipes` lists them (`dspark recipes copy NAME` writes one out to edit).
"""
from __future__ import annotations

import errno
import re
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Optional

SUFFIXES = (".yaml", ".yml")


def folder() -> Path:
    """The shipped recipes: `targets/<name>/config.json` and `accelerate/*` beside them."""
    return Path(str(files("dspark_train.recipes")))


def accelerate_dir() -> Path:
    return folder() / "accelerate"


def names() -> list[str]:
    return sorted(p.stem for p in folder().glob("*.yaml"))


def recipe(name: str) -> Optional[Path]:
    """The shipped recipe called `name` (`tiny` or `tiny.yaml`), or None."""
    if "/" in name or "\\" in name:
        return None
    stem = Path(name).stem if name.endswith(SUFFIXES) else name
    path = folder() / f"{stem}.yaml"
    return path if stem and path.is_file() else None


def inside_installed_package(path: Path) -> bool:
    """Whether `path` lies inside the installed package (a wheel's package data), where no user data lives; False
    for an editable install's recipes, which are the checkout's own files."""
    return Path(path).resolve().is_relative_to(Path(str(files("dspark_train"))).resolve())


def deepspeed_file(value: str) -> Path:
    """The DeepSpeed JSON an accelerate config names, as accelerate passes it on: absolute, or relative to the current
    directory. A shipped accelerate config names its JSON checkout-relative (`recipes/accelerate/ds_zero2.json`, what
    `accelerate launch --config_file recipes/accelerate/zero2.yaml` finds from the checkout's root); away from
    the checkout that is the shipped file."""
    path = Path(value).expanduser()
    prefix = ("recipes", "accelerate")
    if not path.is_file() and path.parts[:2] == prefix and len(path.parts) == 3:
        return accelerate_dir() / path.name
    return path


def description(path: Path) -> str:
    """The first sentence of the comment under the recipe's coding declaration."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return re.split(r"(?<=\.)\s", " ".join(lines).strip(), maxsplit=1)[0]


def catalog() -> list[tuple[str, str, str]]:
    """(name, target, description) of every shipped recipe, for `dspark recipes`."""
    import yaml

    rows = []
    for name in names():
        path = folder() / f"{name}.yaml"
        target = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("target") or {}
        kind = (target.get("config") or {}).get("model_type")
        rows.append((name, target.get("model") or f"inline {kind or ''} config".replace("  ", " "), description(path)))
    return rows


def copy(name: str, dest: Path, force: bool = False) -> Path:
    """Write the shipped recipe `name` to `dest` (a file, or a directory to hold NAME.yaml); refuses to replace a
    file unless `force`."""
    src = recipe(name)
    if src is None:
        raise FileNotFoundError(f"{name}: no shipped recipe of that name (shipped: {', '.join(names())})")
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise FileExistsError(errno.EEXIST, "already exists; pass --force to replace it", str(dest))
    shutil.copyfile(src, dest)
    return dest
