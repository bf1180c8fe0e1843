import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The stop tests send real SIGINT / SIGHUP to this process and to the commands it starts. A runner that started
# pytest with them ignored (a script's `cmd &` ignores SIGINT, `nohup` SIGHUP; children inherit that) would make
# Ctrl-C a no-op and fail those tests for the runner's sake: the suite starts from the terminal's defaults.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

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


def build_eot_tokenizer():
    """A byte-level tokenizer built in code with a Llama-3-style chat template: its EOS (<|end_of_text|>) is not the
    token that closes an assistant turn (<|eot_id|>), as with Llama-3, Gemma and Phi-3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<pad>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    return tok


@pytest.fixture(scope="session")
def eot_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eot-tokenizer")
    build_eot_tokenizer().save_pretrained(path)
    return path
