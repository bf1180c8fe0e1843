"""`dspark data` in this process: the frozen target answers every user turn of a batch of prompts in order (one
batched `generate` per turn, left padding), stopping where its turn ends (`chat.stop_token_ids`) and sampling the
recipe's law alone (`sampling_law`); with data.capture_features its features are kept as it generates
(capture.py), each turn's KV cache dropped with its turn.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Optional

import torch

from .capture import Captured
from .chat import conversation_ids, prompt_ids, stop_token_ids
from ..config import Recipe
from .examples import prompt_turns
from ..target import PromptTooLong

SKIPPED = "skipped: "  # a failure that is the prompt's own (too long): recorded, the run goes on


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def sampling_law(data_cfg) -> dict:
    """The recipe's law for the answers (data.temperature, data.top_k, data.top_p), as every record stores it and
    both paths apply it: in-process `generate` and the server's request."""
    return {"temperature": data_cfg.temperature, "top_p": data_cfg.top_p, "top_k": data_cfg.top_k}


def _hf_sampling(law: dict) -> dict:
    """`generate` arguments that sample `law` and nothing else: what transformers would add on its own (top_k=50 by
    default, or the model's generation_config: a top_k, a repetition penalty, min_p, ...) is switched off."""
    off = dict(repetition_penalty=None, no_repeat_ngram_size=None, min_p=None, typical_p=None, epsilon_cutoff=None,
               eta_cutoff=None, top_h=None)
    if law["temperature"] <= 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None, **off)
    return dict(do_sample=True, temperature=law["temperature"], top_p=law["top_p"], top_k=law["top_k"] or None, **off)


def _cut(row: list[int], stops) -> tuple[list[int], bool]:
    """A generated row up to its first stop token (not kept) → (answer, finished)."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    return (row, False) if end is None else (row[:end], True)


@torch.no_grad()
def _generate(target, prompts: list[list[int]], max_new_tokens: int, law: dict, seed: int, record: bool
              ) -> tuple[list[tuple[list[int], bool]], Optional[Captured]]:
    tok = target.tokenizer
    stops = stop_token_ids(tok, target.model.generation_config)
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    with target.recording() if record else nullcontext([]) as calls:
        out = target.model.generate(
            input_ids=ids.to(target.device), attention_mask=mask.to(target.device), max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=stops, return_dict_in_generate=True, **_hf_sampling(law))
    results = [_cut(row, set(stops)) for row in out.sequences[:, ids.shape[1]:].tolist()]
    if not record:
        return results, None
    rows = torch.cat(calls, 1)
    columns = out.sequences[:, :rows.shape[1]].cpu()  # the last token generated was never fed back
    return results, Captured(rows, out.cache, columns, (1 - mask).sum(1).tolist())


def generate_batch(target, prompts: list[list[int]], max_new_tokens: int, law: Optional[dict] = None,
                   seed: int = 0) -> list[tuple[list[int], bool]]:
    """One batched `generate` call with left padding, sampling `law` (`sampling_law`; None: greedy) and stopping
    where the target's turn ends (`chat.stop_token_ids`) → (new tokens, finished) per prompt."""
    law = law or {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return _generate(target, prompts, max_new_tokens, law, seed, record=False)[0]


def seed_of(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:7], "little")


def answer_batch(target, batch: list[dict], recipe: Recipe) -> tuple[list[dict], list]:
    """Answer every user turn of each prompt in turn. Returns output records (success or `error`) and, with
    data.capture_features, [(id, rows [tokens, m+1, d]) on the host] of the trainer's sequence of each answered
    prompt.

    Peak memory of a capture: one turn's `generate` over the batch, its KV cache (2 · layers · kv_heads · head_dim
    values per column of the padded batch) and recorded rows [B, columns, m+1, d] on the target's device, plus the
    host rows of the conversations finished so far. A conversation's rows are taken (to the host) in the turn that
    finishes it, and every turn's cache dies with its turn (`_answer_turn`)."""
    tok, data_cfg = target.tokenizer, recipe.data
    law = sampling_law(data_cfg)
    states, features = [], []
    for p in batch:
        try:
            states.append({"p": p, "turns": prompt_turns(p["raw"]), "msgs": [], "finished": True, "error": None})
        except (ValueError, TypeError, KeyError) as e:
            states.append({"p": p, "error": f"bad prompt record: {e}"})
    for turn in range(max((len(s["turns"]) for s in states if not s["error"]), default=0)):
        live = [s for s in states if not s["error"] and turn < len(s["turns"])]
        encoded = []
        for s in live:
            s["msgs"].append({"role": "user", "content": s["turns"][turn]})
            ids = prompt_ids(tok, s["msgs"])
            if len(ids) >= data_cfg.max_seq_len:  # truncation would leave no answer to learn from
                s["error"] = (f"{SKIPPED}prompt is {len(ids)} tokens, longer than data.max_seq_len="
                              f"{data_cfg.max_seq_len}")
            else:
                try:  # past the window the target's answer is garbage (and a huge prompt takes hours)
                    target.check_fits(len(ids), data_cfg.max_new_tokens, "prompt")
                except PromptTooLong as e:
                    s["error"] = f"{SKIPPED}{e} (data.max_new_tokens={data_cfg.max_new_tokens})"
            encoded.append(ids)
        live_ok = [(s, ids) for s, ids in zip(live, encoded) if not s["error"]]
        if live_ok:
            features += _answer_turn(target, live_ok, turn, recipe, law)
    records = []
    for s in states:
        p = s["p"]
        if s["error"]:
            records.append({"id": p["id"], "error": s["error"]})
        else:
            records.append({"id": p["id"], "category": p["category"], "conversations": s["msgs"],
                            "finished": s["finished"], "n_tokens": s["n_tokens"], "sampling": law})
    return records, features


def _answer_turn(target, live_ok: list[tuple[dict, list[int]]], turn: int, recipe: Recipe, law: dict
                 ) -> list[tuple[str, torch.Tensor]]:
    """User turn `turn` of the live conversations: one batched `generate` (one prompt at a time when it fails,
    to isolate the prompt at fault), the answers appended. With data.capture_features, returns the host rows of
    the conversations this turn finishes: what the turn's `generate` computed (its KV cache, its recorded rows)
    is not referenced once this returns."""
    tok, data_cfg = target.tokenizer, recipe.data
    record = data_cfg.capture_features
    seed = seed_of(data_cfg.seed, f"{live_ok[0][0]['p']['id']}:{turn}")
    try:
        outs, cap = _generate(target, [ids for _, ids in live_ok], data_cfg.max_new_tokens, law, seed, record)
        where = [(cap, b) for b in range(len(live_ok))]
    except Exception:  # noqa: BLE001 — isolate the failing prompt(s): retry one at a time
        outs, where = [], []
        for s, ids in live_ok:
            try:
                one, cap = _generate(target, [ids], data_cfg.max_new_tokens, law, seed, record)
                outs.append(one[0])
                where.append((cap, 0))
            except Exception as e:  # noqa: BLE001
                s["error"] = f"generate failed: {type(e).__name__}: {e}"
                outs.append(None)
                where.append((None, 0))
    for (s, _), o in zip(live_ok, outs):
        if o is None:
            continue
        new, finished = o
        text = tok.decode(new, skip_special_tokens=True).strip()
        if not text:
            s["error"] = "empty answer"
            continue
        s["msgs"].append({"role": "assistant", "content": text})
        s["finished"] = s["finished"] and finished
        s["n_tokens"] = s.get("n_tokens", 0) + len(new)
    if not record:
        return []
    last = [(s, w) for (s, _), w in zip(live_ok, where) if not s["error"] and turn == len(s["turns"]) - 1]
    return _features(target, last, recipe)


def _features(target, done: list[tuple[dict, tuple]], recipe: Recipe) -> list[tuple[str, torch.Tensor]]:
    """Host rows of each finished conversation's trainer sequence (`chat.conversation_ids`, cut at
    data.max_seq_len), from what its last turn's `generate` captured (one short forward per capture for the
    tokens it never fed)."""
    by_capture: dict[int, list] = {}
    for s, (cap, b) in done:
        ids, _ = conversation_ids(target.tokenizer, s["msgs"], recipe.data.max_seq_len)
        by_capture.setdefault(id(cap), [cap, {}])[1][b] = (s["p"]["id"], ids)
    out = []
    for cap, rows in by_capture.values():
        seqs = [rows[b][1] if b in rows else None for b in range(cap.columns.shape[0])]
        for b, r in enumerate(cap.sequence_rows(target, seqs)):
            if r is not None:
                out.append((rows[b][0], r.cpu()))
    return out
