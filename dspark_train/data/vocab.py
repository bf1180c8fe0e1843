"""A pruned draft vocabulary: which target tokens the drafter may propose.

With `drafter.draft_vocab_size` set, the drafter's LM head covers only a subset of the target vocabulary
(smaller head, faster drafting). The subset is chosen once per run: every special and single-byte token (so any
text stays draftable), then the most frequent tokens, counted as training labels plus the target's own argmax
predictions at supervised positions of a sample of sequences (what the drafter is trained to match).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .examples import Example
from ..layout import DRAFT_VOCAB_VERSION, ArtifactError, check_version, read_json_value, write_atomic


def save_draft_vocab(path: Path, vocab: torch.Tensor) -> None:
    """The run's draft vocabulary (draft_vocab.json), so a resume keeps the same one."""
    write_atomic(path, json.dumps({"format_version": DRAFT_VOCAB_VERSION, "ids": vocab.tolist()}))


def load_draft_vocab(path: Path) -> torch.Tensor:
    """draft_vocab.json as save_draft_vocab writes it (a bare list: version 1 as first written); one line naming
    the file when it is malformed or newer."""
    data = read_json_value(path)
    if isinstance(data, list):
        data = {"ids": data}
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected {{\"format_version\", \"ids\": [...]}}")
    check_version(data, path, DRAFT_VOCAB_VERSION)
    ids = data.get("ids")
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ArtifactError(f"{path}: ids: expected a non-empty list of token ids; delete the file to choose again")
    return torch.tensor(ids)


def _byte_token_ids(tokenizer) -> list[int]:
    """Single-byte tokens (byte-level BPE alphabet or <0xNN> byte fallback): any text stays draftable."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    out = []
    for tok, i in tokenizer.get_vocab().items():
        if (len(tok) == 1 and tok in alphabet) or (len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")):
            out.append(i)
    return out


def select_draft_vocab(counts: torch.Tensor, size: int, tokenizer) -> torch.Tensor:
    """Special and byte tokens first, then the most frequent tokens by `counts` (ties: lower id), sorted."""
    V = counts.numel()
    keep = [i for i in sorted(set(tokenizer.all_special_ids) | set(_byte_token_ids(tokenizer))) if i < V][:size]
    chosen = torch.zeros(V, dtype=torch.bool)
    chosen[keep] = True
    order = sorted(range(V), key=lambda i: (-int(counts[i]), i))
    for i in order:
        if int(chosen.sum()) >= size:
            break
        chosen[i] = True
    return torch.nonzero(chosen).flatten()


def label_counts(examples: list[Example], vocab_size: int) -> torch.Tensor:
    """How often each token is a supervised label (loss mask on) across `examples`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for e in examples:
        ids = torch.tensor(e.input_ids)[torch.tensor(e.loss_mask).bool()]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def count_draft_tokens(target, examples: list[Example], acc, batch_size: int, max_seqs: int) -> torch.Tensor:
    """Label counts over all training sequences + target-argmax counts at supervised positions of the first
    `max_seqs` of them (split over ranks, summed): the ranking for a pruned draft vocabulary."""
    V, dev = target.vocab_size, target.device
    counts = label_counts(examples, V).to(dev) if acc.is_main_process else torch.zeros(V, dtype=torch.long,
                                                                                       device=dev)
    mine = examples[:max_seqs][acc.process_index::acc.num_processes]
    for b in range(0, len(mine), batch_size):
        chunk = mine[b:b + batch_size]
        T = max(len(e.input_ids) for e in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att, sup = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, e in enumerate(chunk):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            att[i, :len(e.input_ids)] = 1
            sup[i, :len(e.loss_mask)] = torch.tensor(e.loss_mask)
        h = target.forward_features(ids.to(dev), att.to(dev)).last_hidden[sup.bool().to(dev)]
        for part in h.split(1024):
            counts += torch.bincount(target.logits(part).argmax(-1), minlength=V)
    return acc.reduce(counts.to(acc.device), "sum")
