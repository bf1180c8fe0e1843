"""Several requests per target forward: `SpeculativeDecoder.generate_batch` (chain drafting, Algorithm 1).

A round drafts every active request's chain in one drafter pass (drafters/batched.py: ragged contexts; a drafter
kind without that path drafts request by request), picks each request's verification length (the load-aware
prefix scheduler, scheduler.py, from calibrated survival and the machine's SPS(B); or a confidence threshold; or
the full chain), and verifies all of them in one target forward over ragged lengths. With no drafter, or where the
scheduler decides drafting does not pay for R requests, the round is batched plain decoding: one token per request,
the same cache, mask and stop rules. Greedy output equals each request's plain greedy decoding; sampled output
follows the target's law (verification lengths depend only on confidences in Algorithm 1's order and on earlier
rounds, never on a draft's own token: paper, Appendix A).

Target KV cache (`RaggedKV`): rows share transformers' DynamicCache, each verify pass appends the same number of
slots to every row, and a boolean mask says which slots hold each row's committed context. Slots of rejected drafts
and of padding stay in place, masked, until they make up a quarter of the cache; then one gather compacts every row
to the left. (Compacting every round would copy the whole cache every round: as much memory traffic as a forward at
16 requests.) Position ids are each row's own context length, so a slot's index never matters. Batched plain
decoding appends exactly the slot it keeps: it never compacts except when a request leaves the batch.

The drafter's context is extended lazily: positions committed in rounds that did not draft wait (their features
kept) until the next drafted round extends every row in one pass, so a fallback to plain decoding costs no drafter
work at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from ..drafters.batched import extend_ragged, init_ragged, propose_ragged, select_ragged, supports_ragged
from .cache import gather_slots, select_rows
from .sampling import SamplingParams, as_draws, warp
from .scheduler import LoadAwareScheduler, SPSProfile
from .tree import DraftTree, TreePolicy, draft_tree


@dataclass
class BatchTrace:
    """generate_batch output: one DecodeTrace per request (its t_total: seconds from the call's start until that
    request finished; t_prefill: the batch's prefill) and per target forward (`steps`): requests, tokens verified
    (B, anchors included), computed (with the padding to the longest row), drafted (whether the drafter ran),
    t_draft (of which t_catch_up: extending the drafter's context with what plain rounds committed, t_propose: the
    backbone pass, t_head_steps), t_verify, t_book (seconds)."""

    requests: list
    steps: list[dict] = field(default_factory=list)
    t_prefill: float = 0.0
    t_total: float = 0.0


class RaggedKV:
    """The target's KV cache for R requests with their own committed lengths (see the module docstring)."""

    def __init__(self, cache: DynamicCache, valid: torch.Tensor):
        self.cache, self.valid = cache, valid  # valid [R, S]: slot s of row r holds r's committed context

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)

    def inputs(self, trees: Sequence[DraftTree], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [A, n], position ids and the 4-D mask of a verify pass over each row's chain (right-padded)."""
        A, S = self.valid.shape
        n = max(len(t) for t in trees)
        ids = torch.zeros(A, n, dtype=torch.long)
        for i, tree in enumerate(trees):
            ids[i, :len(tree)] = torch.tensor(tree.tokens)
        pos = self.lengths[:, None] + torch.arange(n)[None]
        own = torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.cat([self.valid[:, None, :].expand(A, n, S), own[None].expand(A, -1, -1)], dim=2)
        return ids.to(device), pos.to(device), mask[:, None].to(device)

    def commit(self, kept: Sequence[int], n: int) -> None:
        """After a verify pass of n slots per row: row i keeps its first kept[i] new slots (a chain's path)."""
        new = torch.arange(n)[None] < torch.tensor(list(kept))[:, None]
        self.valid = torch.cat([self.valid, new], dim=1)

    def keep_rows(self, rows: list[int]) -> None:
        """Only these rows go on; compacts every row to the left when masked slots make up a quarter of the cache."""
        if len(rows) < self.valid.shape[0]:
            index = torch.tensor(rows, dtype=torch.long)
            select_rows(self.cache, index.to(self._device()))
            self.valid = self.valid[index]
        if not rows:
            return
        S = self.valid.shape[1]
        longest = int(self.lengths.max())
        if S - longest >= max(16, S // 4):
            index = torch.zeros(len(rows), longest, dtype=torch.long)
            for i, row in enumerate(self.valid):
                slots = row.nonzero()[:, 0]
                index[i, :len(slots)] = slots
            gather_slots(self.cache, index.to(self._device()))
            self.valid = torch.arange(longest)[None] < self.lengths[:, None]

    def _device(self):
        return self.cache.layers[0].keys.device


class BatchDrafting:
    """The drafter's side of a batch: one ragged state (one pass per round) where the kind supports it, else one
    DraftState per request; positions committed since the last drafted round wait in `pending`."""

    def __init__(self, drafter, rows: int):
        self.drafter = drafter
        self.ragged = supports_ragged(drafter)
        self.state = init_ragged(drafter, rows) if self.ragged else [drafter.init_state(1) for _ in range(rows)]
        self.pending: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(rows)]

    def commit(self, i: int, features: torch.Tensor, last_hidden: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Row i committed these positions ([n, m·d], [n, d], their [n] token ids); the drafter sees them before it
        next drafts."""
        self.pending[i].append((features, last_hidden, token_ids))

    def keep_rows(self, rows: list[int]) -> None:
        self.pending = [self.pending[r] for r in rows]
        if self.ragged:
            select_ragged(self.state, rows)
        else:
            self.state = [self.state[r] for r in rows]

    def catch_up(self) -> float:
        """Extend every row's drafter context with its pending positions (one batched pass); returns the seconds."""
        t0 = time.perf_counter()
        self._extend()
        return time.perf_counter() - t0

    def _extend(self) -> None:
        chunks = [tuple(torch.cat(part) for part in zip(*p)) if p else None for p in self.pending]
        self.pending = [[] for _ in self.pending]
        if not self.ragged:
            for st, c in zip(self.state, chunks):
                if c is not None:
                    self.drafter.extend_context(st, c[0][None], c[1][None], c[2][None])
            return
        counts = [0 if c is None else c[1].shape[0] for c in chunks]
        if not any(counts):
            return
        ref = next(c for c in chunks if c is not None)
        n = max(counts)
        feats = ref[0].new_zeros(len(chunks), n, ref[0].shape[-1])
        hidden = ref[1].new_zeros(len(chunks), n, ref[1].shape[-1])
        for i, c in enumerate(chunks):
            if c is not None:
                feats[i, :counts[i]], hidden[i, :counts[i]] = c[:2]
        extend_ragged(self.drafter, self.state, feats, hidden, counts)

    def chains(self, anchors: list[int], rooms: list[int], params: SamplingParams, gen) -> tuple[list[DraftTree],
                                                                                                 float, float]:
        """Every request's chain of γ drafts (cut to its room) in one backbone pass and γ batched head steps
        (call `catch_up` first); returns the trees and the seconds of the backbone pass and of the head steps."""
        drafter = self.drafter
        gamma = drafter.config.block_size
        if not self.ragged:
            policy = TreePolicy.chain(gamma)
            trees = [draft_tree(drafter, st, a, policy, params, room, gen) for st, a, room in
                     zip(self.state, anchors, rooms)]
            return trees, sum(t.t_propose for t in trees), sum(t.t_head_steps for t in trees)
        dev = drafter.device
        t0 = time.perf_counter()
        block = propose_ragged(drafter, self.state, torch.tensor(anchors, device=dev))
        t1 = time.perf_counter()
        depth = min(gamma, block.draft_logits.shape[1], max(rooms))
        d2t = drafter.draft_vocab
        rng = as_draws(gen)
        A = len(anchors)
        prev = torch.tensor(anchors, device=dev)[:, None]
        head_state = None
        toks, confs, qs, dists = [], [], [], []
        for k in range(depth):
            logits, conf, head_state = drafter.head_step(block, k, prev, head_state, full=False)
            probs = warp(logits[:, 0], params)  # [A, Vd]
            cand = probs.argmax(-1, keepdim=True) if params.greedy else rng.without_replacement(probs, [1] * A)
            qs.append(probs.gather(-1, cand)[:, 0].tolist())
            confs.append(conf[:, 0].float().tolist())
            if not params.greedy:  # acceptance divides by exactly the distribution each draft was drawn from
                dists.append(probs if d2t is None else
                             probs.new_zeros(A, drafter.config.vocab_size).index_copy_(1, d2t, probs))
            prev = cand if d2t is None else d2t[cand]
            toks.append(prev[:, 0].tolist())
        t2 = time.perf_counter()
        trees = []
        for i, (a, room) in enumerate(zip(anchors, rooms)):
            tree = DraftTree([a])
            for k in range(min(depth, room)):
                tree.add(toks[k][i], k, confs[k][i], qs[k][i])
                if dists:
                    tree.child_dist[k] = dists[k][i]
            trees.append(tree)
        return trees, t1 - t0, t2 - t1


def survival(tree: DraftTree, policy: TreePolicy) -> list[float]:
    """Calibrated prefix survival a_j = Π_{i≤j} c_i along a chain (the scheduler's input)."""
    a, row = 1.0, []
    for k, z in enumerate(tree.conf_logits[1:]):
        a *= policy.confidence(k, z)
        row.append(a)
    return row


@torch.no_grad()
def decode_batch(dec, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, eos_token_id, stop_strings: Sequence[str], seed: Optional[int], generator,
                 sps: Optional[SPSProfile], early_stop: bool, conf_threshold: Optional[float],
                 scheduler: Optional[LoadAwareScheduler], trace_type, find_stop,
                 repetition_penalty: Optional[float] = None) -> BatchTrace:
    """The batched loop behind `SpeculativeDecoder.generate_batch` (its docstring has the arguments).
    `trace_type` and `find_stop` are the batch-1 loop's DecodeTrace and stop rule (decoder.py, which imports this
    module, passes them), so a request ends exactly where its batch-1 decode would; the target's repetition
    penalty applies per request over each node's own context, and the verify forward is row-exact where the
    decoder's is, as in the batch-1 loop."""
    policy = TreePolicy.chain(dec.gamma, 0.0, dec.policies["chain"].maps)
    _, params, eos, gen = dec._setup("chain", policy, temperature, top_p, top_k, eos_token_id, seed, generator,
                                     max_new_tokens)
    tgt, drafter, dev = dec.target, dec.drafter, dec.device
    if scheduler is None and sps is not None and drafter is not None:
        scheduler = LoadAwareScheduler(sps, early_stop)
    R = len(prompts)
    lens = [len(p) for p in prompts]
    for r, n in enumerate(lens):
        tgt.check_fits(n, max_new_tokens, f"prompt {r}")
    S = max(lens)
    t_start = dec._now()
    ids = torch.zeros(R, S, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :lens[r]] = torch.as_tensor(list(p), dtype=torch.long)
    valid = torch.arange(S)[None] < torch.tensor(lens)[:, None]  # [R, S] cache slots holding context
    causal = torch.ones(S, S, dtype=torch.bool).tril_()
    mask = (causal[None] & valid[:, None, :]) | torch.eye(S, dtype=torch.bool)[None]
    cache = DynamicCache(config=tgt.config)
    out = tgt.forward_features(ids.to(dev), attention_mask=mask[:, None].to(dev),
                               position_ids=torch.arange(S, device=dev)[None].expand(R, S), cache=cache)
    drafting = BatchDrafting(drafter, R) if drafter is not None else None
    penalties = [dec._penalty(repetition_penalty, torch.as_tensor(list(p), device=dev)) for p in prompts]
    traces = []
    for r in range(R):
        if drafting is not None:
            drafting.commit(r, out.features[r, :lens[r]], out.last_hidden[r, :lens[r]], ids[r, :lens[r]].to(dev))
        first = tgt.logits(out.last_hidden[r, lens[r] - 1])
        if penalties[r] is not None:
            first = penalties[r].apply(first)
        tok = [dec._first_token(first, params, gen)]
        if penalties[r] is not None:
            penalties[r].commit(tok)
        tr = trace_type(tok, lens[r], "")
        _, tr.stop_reason = find_stop(tok, 0, max_new_tokens, eos, stop_strings, tgt.tokenizer)
        traces.append(tr)
    if drafting is not None:
        drafting.catch_up()  # the prompts' context, as a batch-1 decode's prefill extends it
    t_prefill = dec._now() - t_start
    batch = BatchTrace(traces, t_prefill=t_prefill)
    for tr in traces:
        tr.t_prefill = tr.t_total = t_prefill
    active = [r for r in range(R) if not traces[r].stop_reason]
    kv = RaggedKV(cache, valid)
    kv.keep_rows(active)
    if drafting is not None:
        drafting.keep_rows(active)
    while active:
        A = len(active)
        t0 = dec._now()
        drafted = drafting is not None and (scheduler is None or scheduler.should_draft(A))
        t_propose = t_heads = t_catch_up = 0.0
        if drafted:
            t_catch_up = drafting.catch_up()
            anchors = [traces[r].tokens[-1] for r in active]
            rooms = [max_new_tokens - len(traces[r].tokens) - 1 for r in active]
            trees, t_propose, t_heads = drafting.chains(anchors, rooms, params, gen)
            surv = [survival(tree, policy) for tree in trees]
            if scheduler is not None:
                ell = scheduler.lengths(surv)
            else:
                thr = conf_threshold or 0.0
                ell = [next((j for j, a in enumerate(row) if a < thr), len(row)) for row in surv]
            trees = [tree.prefix(1 + n) for tree, n in zip(trees, ell)]
        else:
            trees = [DraftTree([traces[r].tokens[-1]]) for r in active]
        t1 = dec._now()
        ids, pos, mask = kv.inputs(trees, dev)
        with dec._exact():
            out = tgt.forward_features(ids, attention_mask=mask, position_ids=pos, cache=kv.cache)
        sizes = [len(tree) for tree in trees]  # the LM head on each row's own tokens only, not on its padding
        logits = tgt.logits(torch.cat([out.last_hidden[i, :n] for i, n in enumerate(sizes)])).split(sizes)
        t2 = dec._now()
        survivors, kept = [], []
        for i, (r, tree) in enumerate(zip(active, trees)):
            rows = logits[i] if penalties[r] is None else penalties[r].apply(logits[i], tree.tokens, tree.parents)
            path, bonus, _ = dec._accept(tree, rows, params, gen, False)
            tr = traces[r]
            start = len(tr.tokens)
            tr.tokens += [tree.tokens[j] for j in path[1:]] + [bonus]
            if penalties[r] is not None:
                penalties[r].commit(tr.tokens[start:])
            end, tr.stop_reason = find_stop(tr.tokens, start, max_new_tokens, eos, stop_strings, tgt.tokenizer)
            rnd = dec._round(tree, path, None)
            rnd.committed = (end or len(tr.tokens)) - start
            rnd.t_verify = t2 - t1
            tr.rounds.append(rnd)
            kept.append(len(path))
            if end is not None:
                del tr.tokens[end:]
                tr.t_total = dec._now() - t_start
                continue
            survivors.append(i)
            if drafting is not None:  # a chain's path is a prefix of its nodes
                drafting.commit(i, out.features[i, :len(path)], out.last_hidden[i, :len(path)], ids[i, :len(path)])
        kv.commit(kept, ids.shape[1])
        kv.keep_rows(survivors)
        if drafting is not None:
            drafting.keep_rows(survivors)
        active = [active[i] for i in survivors]
        t3 = dec._now()
        if scheduler is not None:  # what drafting costs a round; catching up after plain rounds is their debt
            scheduler.record(A, drafted, t1 - t0 - t_catch_up)
        batch.steps.append({"requests": A, "tokens": sum(len(t) for t in trees), "computed": ids.numel(),
                            "drafted": drafted, "t_draft": t1 - t0, "t_catch_up": t_catch_up, "t_propose": t_propose,
                            "t_head_steps": t_heads,
                            "t_verify": t2 - t1, "t_book": t3 - t2})
    batch.t_total = dec._now() - t_start
    return batch
