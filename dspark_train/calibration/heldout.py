"""The held-out statistics calibration is fitted on (docs/method.md §4): which prompts the drafter never trained
on, the target's own greedy answers to them, greedy drafting replayed at every anchor of those answers
(`anchor_stats`, for STS), and the probe decode's traces turned into per-round statistics
(`stats_from_traces`, for adaptive-k tuning). Both give a `calibration.HeldoutStats`. Copy drafting replayed over
the same greedy answers gives the copy drafter's acceptance prior (`copy_prior`, for hybrid decoding).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..policy.calibration import HeldoutStats
from ..data.chat import prompt_ids, user_messages
from ..config import RecipeError
from ..data.examples import (Example, anchor_candidates, block_labels, conversations_paths, load_prompts, prompt_turns,
                             read_conversations, split_heldout, usable_conversations)
from ..decoding.copy_drafter import CopyPrior, fit_copy_prior
from ..data.generate import generate_batch
from ..runrecord import RunRecord


def heldout_prompts(record: RunRecord, tokenizer, limit: int) -> tuple[list[str], list[list[int]], str]:
    """First-user-turn prompt ids the drafter never trained on, up to `limit`: the run's held-out
    conversations first (the trainer's `heldout_ids.json`, or the recipe's deterministic split recomputed),
    then prompts of `data.prompts` that have no conversation in the training file (in a seeded order).
    Never the eval sets."""
    recipe, split = record.recipe, record.heldout()
    conv_files = conversations_paths(recipe)
    if split is not None:  # the files it names, where they are here, else the recipe's
        if split.conversations and all(p.is_file() for p in split.conversations):
            conv_files = split.conversations
        convs = read_conversations(conv_files, recipe.data.skip_bad_lines)
        by_id = {str(c["id"]): c for c in convs}
        missing = [i for i in split.ids if i not in by_id]
        if missing:
            raise FileNotFoundError(f"{split.path}: {len(missing)} held-out ids not in "
                                    + " + ".join(str(p) for p in conv_files))
        held, source = [by_id[i] for i in split.ids], str(split.path)
    else:  # the trainer's split: the same records (usable ones, max_prompts), the same seeded hash
        convs = read_conversations(conv_files, recipe.data.skip_bad_lines)
        _, held = split_heldout(usable_conversations(convs, recipe.data.max_prompts), recipe.data.heldout,
                                recipe.data.seed)
        source = f"split_heldout(data.heldout={recipe.data.heldout}, data.seed={recipe.data.seed})"
    names, prompts = [], []

    def add(name: str, messages: list[dict]) -> None:
        ids = prompt_ids(tokenizer, messages)
        if len(ids) <= recipe.data.max_seq_len and len(prompts) < limit:  # longer ones were truncated in training
            names.append(name)
            prompts.append(ids)

    for c in held:
        turns = c["conversations"]
        add(str(c["id"]), turns[:next((i for i, m in enumerate(turns) if m["role"] == "assistant"), len(turns))])
    if len(prompts) < limit:
        try:
            trained = {str(c["id"]) for c in convs}  # the whole file: any of it may have been trained on
            fresh = [p for p in load_prompts(recipe) if p["id"] not in trained]
        except (RecipeError, FileNotFoundError) as e:  # no prompt file here: the held-out conversations only
            fresh, source = [], f"{source} (data.prompts unavailable: {e})"
        n0 = len(prompts)
        for p in split_heldout(fresh, len(fresh), recipe.data.seed)[1]:
            if len(prompts) == limit:
                break
            try:
                add(p["id"], user_messages(prompt_turns(p["raw"])[:1]))
            except (ValueError, TypeError, KeyError):
                continue
        if len(prompts) > n0:
            source += f" + {len(prompts) - n0} untrained prompts of {recipe.data.prompts}"
    if not prompts:
        raise FileNotFoundError(f"{record.root}: no held-out prompt fits data.max_seq_len = {recipe.data.max_seq_len}")
    return names, prompts, source


def greedy_texts(target, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                 progress: bool = True) -> list:
    """prompt + the target's own greedy answer as `Example`s (loss mask on the answer): the text a greedy
    decode produces, so anchor statistics over it have the decoder's context distribution. Batched
    `generate` (prompts sorted by length to limit padding): several times the throughput of one prompt at
    a time on a CPU."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="greedy answers", unit="prompt", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for i, (new, _) in zip(idx, generate_batch(target, [prompts[i] for i in idx], max_new_tokens)):
                out[i] = Example(str(i), prompts[i] + new, [0] * len(prompts[i]) + [1] * len(new))
            bar.update(len(idx))
    return out


def copy_prior(examples: Sequence) -> CopyPrior:
    """calibration.json's `copy`: per feature cell, how often a copied token equalled the target's greedy text
    when copy drafting is replayed at every answer position of `greedy_texts` (decoding/copy_drafter.py
    `replay_counts`), shrunk so that a request's own verified copies still move the estimates."""
    return fit_copy_prior([(ex.input_ids, ex.loss_mask.index(1)) for ex in examples if 1 in ex.loss_mask])


def stats_from_traces(traces: Sequence, gamma: int, width: int) -> HeldoutStats:
    """Probe-decode traces (beam-1 trees; a chain is the width-1 case) → per-round spine statistics."""
    rows = []
    for text, trace in enumerate(traces):
        for r in trace.rounds:  # rounds with nothing drafted (the last token before max_new_tokens) count too
            spine, u = [], 0  # follow the first (top-1) child of each spine node
            kids: dict[int, list[int]] = {}
            for i, p in enumerate(r.parents):
                kids.setdefault(p, []).append(i + 1)
            while u in kids:
                u = kids[u][0]
                spine.append(u)
            n = 0
            while n < len(spine) and r.accepted[spine[n] - 1]:
                n += 1
            rescue = 0
            if n < len(spine):
                parent = spine[n - 1] if n else 0
                hit = [j for j, c in enumerate(kids[parent]) if r.accepted[c - 1]]
                rescue = hit[0] + 1 if hit else 0
            pick = [s - 1 for s in spine]
            pad = [np.nan] * (gamma - len(pick))
            tp = r.target_probs or [np.nan] * len(r.tokens)
            ar = r.accept_rates or [np.nan] * len(r.tokens)
            rows.append(([r.conf_logits[i] for i in pick] + pad, [r.draft_probs[i] for i in pick] + pad,
                         [tp[i] for i in pick] + pad, [ar[i] for i in pick] + pad,
                         len(spine), n, rescue, r.t_draft, r.t_book, text))
    if not any(r[4] for r in rows):
        raise ValueError("no drafted rounds in the held-out decode (max_new_tokens too small?)")
    cols = list(zip(*rows))
    f = lambda i: np.asarray(cols[i], dtype=float)  # noqa: E731
    i64 = lambda i: np.asarray(cols[i], dtype=np.int64)  # noqa: E731
    return HeldoutStats(f(0), f(1), f(2), f(3), i64(4), i64(5), i64(6), f(7), f(8), width, i64(9))


def anchor_stats(target, drafter, examples: Sequence, anchors_per_chunk: int = 64, progress: bool = False
                 ) -> HeldoutStats:
    """Greedy drafting replayed at *every* anchor of held-out conversations: one target forward and one
    batched drafter pass per conversation instead of one decode round per sample, so thousands of rounds
    for the price of a few dozen decodes (the 20-bin ECE of a few hundred probe rounds is mostly noise).

    Each block is drafted exactly as the decoder would (`blocks_at` = `propose` at each anchor, then
    `head_step` fed the drafted tokens) and compared with the target's greedy token at each slot. A slot is
    observed while the text so far follows the target's greedy path (otherwise the target's next token
    would be conditioned on a context a greedy decode never reaches): that condition is on the text, not on
    the draft, so it does not select on the outcome."""
    g = drafter.config.block_size
    dev, ddtype = target.device, drafter.conf.weight.dtype
    vocab = drafter.d2t  # work in the draft vocabulary: p_d is zero outside it
    rows = []
    for text, ex in enumerate(tqdm(examples, desc="anchor replay", unit="text", disable=not progress)):
        anchors = anchor_candidates(torch.tensor(ex.loss_mask)).to(dev)
        if not len(anchors):
            continue
        ids = torch.tensor([ex.input_ids], device=dev)
        T, s0 = ids.shape[1], int(anchors[0])
        feats = target.forward_features(ids, torch.ones_like(ids))
        features, last_hidden = feats.features.to(ddtype), feats.last_hidden.to(ddtype)
        logp_t = torch.cat([torch.log_softmax(target.logits(h), -1)  # [T − s0, V]: rows from the first anchor
                            for h in feats.last_hidden[0, s0:].split(256)])
        greedy = logp_t.argmax(-1)  # the target's token after position s0 + i
        # slots inside the supervised answer: the contiguous prefix, as the trainer's blocks
        valid = block_labels(ids.cpu(), torch.tensor([ex.loss_mask]), anchors.cpu()[None], g, 0)[1][0].to(dev)
        follows = torch.zeros(T - s0, dtype=torch.bool, device=dev)
        follows[:-1] = ids[0, s0 + 1:] == greedy[:-1]
        for a, ok in zip(anchors.split(anchors_per_chunk), valid.split(anchors_per_chunk)):
            block = drafter.blocks_at(features, last_hidden, ids, a[None])
            pos = (a[:, None] + torch.arange(g, device=dev)).clamp(max=T - 1)  # slot k predicts pos + 1
            rel = pos - s0
            prev, state = ids[0, a][:, None], None
            conf, top, match, p_t, rate = [], [], [], [], []
            for k in range(g):
                logits, z, state = drafter.head_step(block, k, prev, state, full=False)
                lt = logp_t[rel[:, k]]
                lt_d = lt if vocab is None else lt[:, vocab]
                p_d = torch.softmax(logits[:, 0], -1)
                prob, tok = p_d.max(-1)
                tok = tok if vocab is None else vocab[tok]
                conf.append(z[:, 0])
                top.append(prob)
                match.append(tok == greedy[rel[:, k]])
                p_t.append(lt.gather(1, tok[:, None])[:, 0].exp())
                rate.append(torch.minimum(p_d, lt_d.exp()).sum(-1))
                prev = tok[:, None]
            on_greedy = torch.cat((torch.ones_like(ok[:, :1]), follows[rel[:, :-1]]), 1).long().cumprod(1)
            depth = (ok.long() * on_greedy).sum(1)
            n_spine = torch.minimum(torch.stack(match, 1).long().cumprod(1).sum(1), depth)
            cols = [torch.stack(c, 1).float() for c in (conf, top, p_t, rate)]
            unseen = torch.arange(g, device=dev)[None] >= depth[:, None]
            cols = [c.masked_fill(unseen, float("nan")).cpu().numpy() for c in cols]
            rows.append((*cols, depth.cpu().numpy(), n_spine.cpu().numpy(), np.full(len(a), text)))
    if not rows:
        raise ValueError("no anchors in the held-out conversations")
    cat = [np.concatenate(c) for c in zip(*rows)]
    n = len(cat[4])
    return HeldoutStats(*cat[:4], cat[4].astype(np.int64), cat[5].astype(np.int64), np.zeros(n, np.int64),
                        np.full(n, np.nan), np.full(n, np.nan), 1, cat[6].astype(np.int64))
