import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / ".." / "shared").resolve()


# prompt records for `dspark data` tests (in-process and through a server): answerable ones, a malformed one (no
# user turn), a multi-turn one and one longer than the tiny recipe's max_seq_len
REGEN_PROMPTS = [{"id": "p0", "category": "chat", "turns": ["Say hi."]},
                 {"id": "p1", "category": "math", "turns": ["What is 2+3?"]},
                 {"id": "bad", "category": "chat", "turns": []},
                 {"id": "p3", "category": "chat", "turns": ["Tell me a story.", "Shorter."]},
                 {"id": "long", "category": "chat", "turns": ["x" * 400]},
                 {"id": "p5", "category": "code", "turns": ["print 1"]}]


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


def small_target_and_drafter(initializer_range: float):
    """A 16-token, 2-layer Llama target and an untrained 3-slot Markov drafter (the same one every run): small
    enough that sampling tests can enumerate the target distribution exactly."""
    import torch

    from dspark_train.config import DrafterConfigSection, TargetConfig
    from dspark_train.drafters import build_drafter
    from dspark_train.target import load_target

    config = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, vocab_size=16,
                  initializer_range=initializer_range)
    target = load_target(TargetConfig(config=config, dtype="float32", feature_layers=[1]))
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfigSection(head="markov", num_layers=1, block_size=3, head_rank=16),
                            target).eval()
    return target, drafter
