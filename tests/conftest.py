import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def tiny_recipe():
    from dspark_train.config import load_recipe
    return load_recipe(REPO / "recipes" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_target(tiny_recipe):
    from dspark_train.target import load_target
    return load_target(tiny_recipe.target)
