"""One chat-template path for training and evaluation.

Mismatched templates between training and evaluation are the most common cause of poor acceptance, so
both `dspark data` and the eval harness render through these functions only, and stop where the same turn ends.
"""
from __future__ import annotations

from typing import Sequence


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # BatchEncoding in transformers 5
        out = out["input_ids"]
    return list(out)


_PROBE = "dspark-end-of-turn-probe"


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends the target's turn, in this order without repeats: `generation_config.eos_token_id` (an
    id or a list), the tokenizer's EOS, and the special token the chat template closes an assistant message with.
    The last is often neither of the others (Llama-3 `<|eot_id|>`, Gemma `<end_of_turn>`, Phi-3 `<|end|>` with
    a tokenizer whose EOS is the end of text): a generation that stops on EOS alone runs past it into invented
    next turns."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids: list[int] = []
    for i in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id, _end_of_turn(tokenizer)]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def _end_of_turn(tokenizer):
    """The first token after an assistant message's text in the rendered template when it is special (leading
    whitespace skipped, as Llama-2's `' ' + eos_token`), else None."""
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                                         tokenize=False)
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = tokenizer.encode(text[at + len(_PROBE):].lstrip(), add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


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
