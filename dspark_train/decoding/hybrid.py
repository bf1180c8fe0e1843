"""Hybrid draft trees: the learned drafter's branches and the copy drafter's continuations in one tree per
round, verified in one target pass.

A round (`HybridDrafting.draft`):
1. The copy drafter (copy_drafter.py) proposes continuations of the committed tokens, each token with an estimate
   of its acceptance given its predecessors.
2. Unless the best copy candidate's first token is confident (estimate ≥ `HybridPolicy.skip_drafter`) and
   the cost curve admits it on its own (a copy round will replace the drafter's), the drafter drafts its tree
   exactly as the mode's TreePolicy says (chain, tree, adaptive). A skipped drafter runs no forward at all;
   the decoder still extends its context cache with every committed position after verification, so its
   state stays consistent. (Skipping on confidence alone made rounds under a steep SPS(B) verify nothing.)
3. `merge_copy` walks each continuation down from the anchor: where a child with the same token exists
   (a drafter node or an earlier continuation) the proposal shares that node, else a copy node is added.
4. Budget (`admit`): every proposal gets a value, its estimated probability of being accepted (drafter:
   calibrated survival, copy: the product of its estimates); proposals are admitted in descending value
   while Θ = (1 + Σ admitted values) · SPS(1 + admitted) improves, stopping at the first non-improvement
   (Algorithm 1 on one tree). The values split the budget between the sources; the measured verify-cost
   curve SPS(B) decides the total. A round where copying offers nothing verifies the drafter tree as its
   policy built it, so drafter-only rounds cost what they cost without the copy drafter.

Greedy decoding accepts by argmax whatever the shape, so there the values are per node and as informed as
possible: v(x) = v(parent) · max(drafter estimate, copy estimate), the drafter's estimate for a sibling of
rank i > 0 being (1 − c)·q(x)/(1 − q(top)). Sampling (tree.py's `accept_sampling` has the argument) needs
every proposal's existence to be independent of its own value, so there values are per proposal and
value-free: the drafter's rank-i child of u gets v_d(u)·c_u·(1 − c_u)^i (c_u: the calibrated confidence of
the slot given u, known before the children are drawn), a copy token its chain's product (a function of
the committed context); ranking by (−value, node) then admits proposals only behind their parents and
earlier siblings, and a proposal's admission depends only on proposals ranked before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .copy_drafter import CopyCandidate, CopyDrafter
from .sampling import SamplingParams
from .tree import COPY, DRAFTER, DraftTree, TreePolicy, draft_tree


@dataclass(frozen=True)
class HybridPolicy:
    skip_drafter: float = 0.9  # skip the drafter's forward when the best copy token's estimate is ≥ this (> 1: never)
    max_nodes: int = 64  # draft nodes per round at most, the anchor excluded


def merge_copy(tree: DraftTree, candidates: Sequence[CopyCandidate]) -> list[list[int]]:
    """Insert each continuation into the tree, sharing nodes with equal prefixes; returns each one's nodes.
    A copy node's draft probability is 1 (a point mass) and its confidence logit NaN."""
    chains = []
    for cand in candidates:
        u, nodes = 0, []
        for tok in cand.tokens:
            v = tree.child(u, tok)
            if v is None:
                v = tree.add(tok, u, float("nan"), 1.0, COPY)
            elif not tree.sources[v] & COPY:
                tree.sources[v] |= COPY
                tree.copy_children.setdefault(u, []).append(v)
            nodes.append(v)
            u = v
        chains.append(nodes)
    return chains


def admit(values: Sequence[float], sps: Callable[[int], float], max_items: int) -> list[int]:
    """Indices of the admitted items: in order of (−value, index), while Θ = (1 + Σ values)·SPS(1 + n)
    improves; the first non-improvement stops (what is admitted never depends on what is ranked later)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    tau, best, n = 1.0, sps(1), 0
    for i in order[:max_items]:
        theta = (tau + values[i]) * sps(n + 2)
        if theta <= best:
            break
        tau, best, n = tau + values[i], theta, n + 1
    return order[:n]


def _drafter_estimates(tree: DraftTree, n_drafted: int, policy: TreePolicy, greedy: bool) -> list[float]:
    """Conditional estimate of each drafter node (index < n_drafted) given its parent accepted."""
    est = [1.0] * n_drafted
    for u in range(n_drafted):
        kids = [c for c in tree.children[u] if c < n_drafted]
        for rank, v in enumerate(kids):
            c = policy.confidence(tree.depths[v] - 1, tree.conf_logits[v])
            if rank == 0:
                est[v] = c
            elif greedy:
                top = tree.draft_probs[kids[0]]
                est[v] = (1 - c) * tree.draft_probs[v] / (1 - top) if top < 1 else 0.0
            else:  # value-free: the first sibling survives with c, a later one only after the earlier failed
                est[v] = c * (1 - c) ** rank
    return est


def budget(tree: DraftTree, n_drafted: int, chains: list[list[int]], candidates: Sequence[CopyCandidate],
           policy: TreePolicy, greedy: bool, sps: Callable[[int], float], max_nodes: int
           ) -> tuple[list[int], list[int]]:
    """The admitted proposals of a merged tree: (nodes whose drafter proposal stays, nodes whose copy
    proposal stays), for `tree.subset` (see the module docstring for the values)."""
    est_d = _drafter_estimates(tree, n_drafted, policy, greedy)
    est_c = {}
    for nodes, cand in zip(chains, candidates):
        for v, p in zip(nodes, cand.probs):
            est_c[v] = max(est_c.get(v, 0.0), p)
    n = len(tree)
    if greedy:
        value = [1.0] * n
        for v in range(1, n):
            value[v] = value[tree.parents[v]] * max(est_d[v] if v < n_drafted else 0.0, est_c.get(v, 0.0))
        keep = [v + 1 for v in admit(value[1:], sps, max_nodes)]
        return keep, keep
    # (value, tie-break, node, source): the drafter's and the copy drafter's proposals separately. Ties go to the
    # drafter's proposals in creation order, then to the copy proposals by (candidate, depth): a copy node's number
    # depends on which drafter tokens it shares, a drafter token's value
    items = []
    vd = [1.0] * n_drafted
    for v in range(1, n_drafted):
        vd[v] = vd[tree.parents[v]] * est_d[v]
        items.append((vd[v], (0, v, 0), v, DRAFTER))
    vc, first = {0: 1.0}, {}
    for i, nodes in enumerate(chains):
        for depth, v in enumerate(nodes):
            first.setdefault(v, (1, i, depth))
    for v in sorted(est_c):  # creation order: parents first
        vc[v] = vc[tree.parents[v]] * est_c[v]  # a copy node's parent carries the previous copy token
        items.append((vc[v], first[v], v, COPY))
    picked = admit_by_depth(items, tree.parents, tree.depths, sps, max_nodes)
    return [v for v, s in picked if s == DRAFTER], [v for v, s in picked if s == COPY]


def admit_by_depth(items: list, parents: list[int], depths: list[int], sps: Callable[[int], float],
                   max_items: int) -> list[tuple[int, int]]:
    """Sampling mode's admission: [(node, source)] of the items (value, tie-break, node, source) admitted depth by
    depth, in order of (−value, tie-break) within a depth, while Θ = (1 + Σ values)·SPS(1 + admitted items)
    improves; the first non-improvement closes that depth (the rest of it stays out), and a proposal whose node's
    parent is not kept is passed over. Each proposal costs one verified token even where a drafter and a copy
    proposal share a node: whether they share depends on the drafter's token, so a cheaper shared node would admit
    a drafter proposal exactly when its token equals a copy token.

    Why depth by depth: the drafter draws its tree depth by depth, and which node of depth k gets children may
    depend on the values of depth k (draft_tree ranks its frontier by path draft probability); a deeper proposal
    ranked ahead of a shallower one by value could then decide, through its mere existence, whether a sibling is
    kept, i.e. on that sibling's own token. Here every decision depends only on proposals of shallower depths and
    on value-free estimates of the same depth, so no proposal's admission depends on its own value."""
    kept, picked = {0}, []
    tau, best = 1.0, sps(1)
    for depth in sorted({depths[v] for _, _, v, _ in items}):
        level = sorted((it for it in items if depths[it[2]] == depth), key=lambda it: (-it[0], it[1]))
        for value, _, v, source in level:
            if parents[v] not in kept:
                continue
            theta = (tau + value) * sps(len(picked) + 2)
            if len(picked) == max_items or theta <= best:
                break
            tau, best = tau + value, theta
            kept.add(v)
            picked.append((v, source))
    return picked


class HybridDrafting:
    """One request's hybrid drafting: the copy drafter's state, the per-round tree, online learning."""

    def __init__(self, copy: CopyDrafter, policy: HybridPolicy, sps: Callable[[int], float],
                 committed: Sequence[int]):
        self.copy, self.policy, self.sps = copy, policy, sps
        self.state = copy.init_state(committed)
        self.cells: dict[int, int] = {}  # node of the last tree -> copy feature cell
        self.skipped = False
        self.t_copy = 0.0  # the last round's copy drafting: query, merge, budget, (then) index update

    def draft(self, drafter, drafter_state, anchor: int, policy: TreePolicy, params: SamplingParams,
              max_depth: int, generator=None, keep_dists: bool = False,
              clock: Callable[[], float] = time.perf_counter) -> DraftTree:
        t0 = time.perf_counter()
        cands = self.copy.propose(self.state, max_depth) if max_depth > 0 else []
        best = max((c.probs[0] for c in cands), default=0.0)
        self.skipped = drafter is None or best >= self.policy.skip_drafter and bool(admit([best], self.sps, 1))
        t_query = time.perf_counter() - t0
        if self.skipped:
            tree = DraftTree([anchor])
        else:
            tree = draft_tree(drafter, drafter_state, anchor, policy, params, max_depth, generator, keep_dists, clock)
        drafted = tree
        t1 = time.perf_counter()
        self.cells = {}
        if cands:
            n_drafted = len(tree)
            chains = merge_copy(tree, cands)
            keep = budget(tree, n_drafted, chains, cands, policy, params.greedy, self.sps, self.policy.max_nodes)
            new = {old: i for i, old in enumerate(tree.kept(*keep))}
            tree = tree.subset(*keep)
            for nodes, cand in zip(chains, cands):
                for v, c in zip(nodes, cand.cells):
                    if v in new and tree.sources[new[v]] & COPY:
                        self.cells.setdefault(new[v], c)
        tree.t_propose, tree.t_head_steps = drafted.t_propose, drafted.t_head_steps  # subset() starts a new tree
        self.t_copy = t_query + time.perf_counter() - t1
        return tree

    def commit(self, tree: DraftTree, path: list[int], new_tokens: Sequence[int]) -> None:
        """After verification: learn from the copy nodes whose parent was accepted, index the new tokens."""
        t0 = time.perf_counter()
        on_path = set(path)
        self.copy.observe(self.state, [(c, v in on_path) for v, c in self.cells.items()
                                       if tree.parents[v] in on_path])
        self.copy.extend_context(self.state, new_tokens)
        self.t_copy += time.perf_counter() - t0
