"""One chat-template path for training and evaluation.

Mismatched templates between training and evaluation are the most common cause of poor acceptance, so
both `data.py` and the eval harness render through these two functions only.
"""
from __future__ import annotations

from typing import Sequence


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # BatchEncoding in transformers 5
        out = out["input_ids"]
    return list(out)


def user_messages(turns: Sequence[str]) -> list[dict]:
    return [{"role": "user", "content": t} for t in turns]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending with the assistant's generation prompt."""
    return _ids(tokenizer, messages, add_generation_prompt=True)


def conversation_ids(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and a loss mask that is 1 on assistant spans only, truncated to `max_len`.

    Each assistant turn's span is found by rendering the conversation before it (with the generation
    prompt) and after it: the tokens in between are the assistant's, including its end-of-turn token.
    """
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        after = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if after[: len(before)] != before:  # template re-renders history; fall back to the longest common prefix
            n = 0
            while n < min(len(before), len(after)) and before[n] == after[n]:
                n += 1
            before = after[:n]
        mask += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
        ids = after
    if len(ids) < len(mask):
        mask = mask[: len(ids)]
    mask += [0] * (len(ids) - len(mask))
    return ids[:max_len], mask[:max_len]
