"""Draft trees: how much to draft (TreePolicy), drafting from the Drafter API, the tree attention mask, and
the two acceptance rules (greedy and lossless multi-draft rejection sampling).

A chain is the width-1 tree, so one code path serves both. Node 0 is the anchor (the last committed token,
whose KV the verify pass computes); every other node is a draft token whose parent precedes it.

Losslessness rule for the shape of a tree: whether a proposal exists (is drawn, kept, given budget) may depend
only on what was drawn before it: its parent and ancestors, its earlier siblings, the nodes of shallower depths
(the tree is drawn depth by depth), the drafter's confidence for its slot given the parent, never on its own token
or a later sibling's (paper, Appendix A). `draft_tree` keeps it: the frontier that gets children at depth k+1, and
its share of the node budget, are ranked by path draft probability over depths ≤ k, all drawn before the children.
A pruning pass over a finished tree (hybrid.py's budget) must keep it too, which is why it decides depth by depth
in sampling mode. tests/test_exact_sampling.py enumerates every outcome of small rounds to check.

`TreePolicy.from_calibration` reads the per-slot calibration maps and `adaptive` of a calibration.json through
its schema (dspark_train/policy/calibration.py, which also refuses a newer format_version); a map is applied by
`slotmaps.SlotMap.__call__` and the adaptive width/depth rule is `calibration.child_widths`, both shared with
the tuner's exact replay (`adaptive.simulate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..policy.calibration import child_widths, read_adaptive
from ..policy.slotmaps import IDENTITY, SlotMap
from .sampling import Draws, SamplingParams, as_draws, residual, warp

DRAFTER, COPY = 1, 2  # node sources (bits): proposed by the drafter, by the copy drafter (decoding/copy_drafter.py)


@dataclass
class TreePolicy:
    """Per-round drafting shape. `widths[k]` = candidates for slot k under each expanded node (its length caps
    the depth); `beam` = nodes expanded per depth (highest path draft probability first)."""

    widths: list[int]
    beam: int = 1
    node_budget: int = 64  # draft nodes per round, the anchor excluded
    maps: Optional[list[SlotMap]] = None  # calibration map per slot for the confidence logits (None: raw σ)
    depth_threshold: float = 0.0  # a node gets children only if calibrated survival through their slot ≥ this
    width_threshold: Optional[float] = None  # if set: widths[k] candidates only where top draft prob < this, else 1

    @classmethod
    def chain(cls, depth: int, conf_threshold: float = 0.0, maps: Optional[list[SlotMap]] = None) -> "TreePolicy":
        return cls([1] * depth, 1, depth, maps, conf_threshold)

    @classmethod
    def from_calibration(cls, calibration: Union[str, Path, dict], depth: int) -> "TreePolicy":
        """The adaptive policy [E] tuned: per-slot calibration maps plus depth/width thresholds and a node
        budget."""
        maps, ad = read_adaptive(calibration, depth)
        return cls([ad.max_width] * depth, ad.beam, ad.node_budget, maps, ad.depth_threshold, ad.width_threshold)

    def confidence(self, k: int, logit: float) -> float:
        """Calibrated conditional survival of slot k: its map applied to the raw logit (slotmaps.py)."""
        return float((self.maps[k] if self.maps and k < len(self.maps) else IDENTITY)(logit))


@dataclass
class DraftTree:
    """Nodes in creation order (parents first). child_dist[u] = the fp32 draft distribution u's children were
    drawn from (sampling: needed for acceptance; greedy: kept only when probabilities are recorded).

    Hybrid trees (decoding/hybrid.py): sources[i] says who proposed node i (DRAFTER and/or COPY bits); the
    drafter's proposals at u are u's children with the DRAFTER bit, in draw order; copy_children[u] lists
    the copy drafter's point-mass proposals at u in test order (a node proposed by both is one node).
    """

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    children: list[list[int]] = field(default_factory=lambda: [[]])
    conf_logits: list[float] = field(default_factory=lambda: [float("nan")])  # slot confidence given the parent
    draft_probs: list[float] = field(default_factory=lambda: [1.0])  # q(token) under the distribution it came from
    child_dist: dict = field(default_factory=dict)
    sources: list[int] = field(default_factory=lambda: [0])
    copy_children: dict = field(default_factory=dict)
    t_propose: float = 0.0  # seconds draft_tree spent in the drafter's backbone pass (`propose`)
    t_head_steps: float = 0.0  # and in its sequential head steps; the rest of draft_tree is tree building

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, conf_logit: float, q: float, source: int = DRAFTER) -> int:
        i = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.children.append([])
        self.children[parent].append(i)
        self.conf_logits.append(conf_logit)
        self.draft_probs.append(q)
        self.sources.append(source)
        if source & COPY:
            self.copy_children.setdefault(parent, []).append(i)
        return i

    def child(self, u: int, token: int) -> Optional[int]:
        return next((c for c in self.children[u] if self.tokens[c] == token), None)

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes (closed under parents, as nodes are created parents first)."""
        return self.subset(range(n), range(n))

    def subset(self, keep_drafted, keep_copied) -> "DraftTree":
        """The tree of the nodes whose drafter proposal is in `keep_drafted` or whose copy proposal is in
        `keep_copied` (each closed under parents; the anchor is always kept), renumbered in creation order.
        A node keeps only the source bits of its kept proposals, so acceptance tests exactly those."""
        src = self._kept_sources(keep_drafted, keep_copied)
        old = self.kept(keep_drafted, keep_copied)
        new = {o: i for i, o in enumerate(old)}
        out = DraftTree([self.tokens[0]], conf_logits=[self.conf_logits[0]], draft_probs=[self.draft_probs[0]],
                        sources=[src[0]])
        for o in old[1:]:
            out.add(self.tokens[o], new[self.parents[o]], self.conf_logits[o], self.draft_probs[o], src[o])
        for u, kids in self.copy_children.items():  # keep the copy drafter's test order
            if u in new:
                out.copy_children[new[u]] = [new[c] for c in kids if c in new and out.sources[new[c]] & COPY]
        out.copy_children = {u: k for u, k in out.copy_children.items() if k}
        out.child_dist = {new[u]: q for u, q in self.child_dist.items()
                          if u in new and any(out.sources[c] & DRAFTER for c in out.children[new[u]])}
        return out

    def kept(self, keep_drafted, keep_copied) -> list[int]:
        """The nodes `subset` keeps, as indices into this tree (the subset's node i is this tree's kept[i])."""
        return [i for i, b in enumerate(self._kept_sources(keep_drafted, keep_copied)) if i == 0 or b]

    def _kept_sources(self, keep_drafted, keep_copied) -> list[int]:
        drafted, copied = set(keep_drafted), set(keep_copied)
        src = [((DRAFTER if i in drafted else 0) | (COPY if i in copied else 0)) & b
               for i, b in enumerate(self.sources)]
        src[0] = self.sources[0]
        return src

    def widths(self) -> list[int]:
        """Nodes per depth 1..max depth."""
        out = [0] * max(self.depths)
        for d in self.depths[1:]:
            out[d - 1] += 1
        return out


def tree_mask(parents: list[int], ctx_len: int, device) -> Optional[torch.Tensor]:
    """4-D bool mask (1, 1, N, ctx+N): each node sees the whole committed context, its ancestors and itself.
    None for a chain (a single node included): that is the causal mask the target builds itself, as in its own
    one-token decode and in the forwards the cost profile SPS(B) times."""
    n = len(parents)
    if all(p == i - 1 for i, p in enumerate(parents)):
        return None
    own = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            own[i] = own[p]
        own[i, i] = True
    mask = torch.cat([torch.ones(n, ctx_len, dtype=torch.bool), own], dim=1)
    return mask[None, None].to(device)


@torch.no_grad()
def draft_tree(drafter, state, anchor: int, policy: TreePolicy, params: SamplingParams, max_depth: int,
               generator: Union[torch.Generator, Draws, None] = None, keep_dists: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> DraftTree:
    """One backbone pass, then the sequential head expands candidates depth by depth (greedy: top-k children;
    sampling: children drawn without replacement from the warped draft distribution). The frontier and its
    share of the node budget follow the path's draft probability (see the module docstring).

    Distributions are computed on the drafter's (pruned) draft vocabulary, where its probability is not zero,
    and ids mapped to the target's at the end; `child_dist` (acceptance needs it against the target's) is
    expanded to the target vocabulary only where kept. The tree records the seconds (by `clock`; the decoder's
    synchronises the device) spent in the drafter's forwards: `t_propose`, `t_head_steps`."""
    tree = DraftTree([anchor])
    rng = as_draws(generator)
    depth = min(max_depth, len(policy.widths))
    if depth <= 0:
        return tree
    device = drafter.device
    t = clock()
    block = drafter.propose(state, torch.tensor([anchor], device=device))
    tree.t_propose = clock() - t
    depth = min(depth, block.draft_logits.shape[1])
    keep = keep_dists or not params.greedy
    d2t = drafter.draft_vocab  # draft id -> target id (None: the same)
    frontier, surv, score, head_state = [0], [1.0], [1.0], None
    for k in range(depth):
        prev = torch.tensor([[tree.tokens[u] for u in frontier]], device=device)
        t = clock()
        logits, conf, head_state = drafter.head_step(block, k, prev, head_state, full=False)
        tree.t_head_steps += clock() - t
        probs = warp(logits[0], params)  # [F, Vd]
        conf_k = conf[0].float().tolist()
        top_q, top_i = probs.max(dim=-1)
        top = top_q.tolist()
        want = policy.widths[k]
        support = (probs > 0).sum(dim=-1).tolist() if want > 1 else [1] * len(frontier)
        left = policy.node_budget - (len(tree) - 1)
        widths = []
        child_surv = [surv[f] * policy.confidence(k, conf_k[f]) for f in range(len(frontier))]
        rule = child_widths(want, top, child_surv, policy.width_threshold, policy.depth_threshold).tolist()
        for f in range(len(frontier)):  # the budget goes to the frontier in its (path score) order
            w = max(0, min(rule[f], left, support[f]))
            left -= w
            widths.append(w)
        if not any(widths):
            break
        if params.greedy:
            cand = top_i[:, None] if max(widths) == 1 else torch.topk(probs, max(widths), dim=-1).indices
        else:
            cand = rng.without_replacement(probs, widths)
        cand_q = probs.gather(-1, cand).tolist()
        cand = (cand if d2t is None else d2t[cand]).tolist()
        grown = []  # (path score, node, frontier row of its parent, its survival)
        for f, u in enumerate(frontier):
            if widths[f] and keep:
                tree.child_dist[u] = probs[f] if d2t is None else \
                    probs.new_zeros(drafter.config.vocab_size).index_copy_(0, d2t, probs[f])
            for i in range(widths[f]):
                v = tree.add(cand[f][i], u, conf_k[f], cand_q[f][i])
                grown.append((score[f] * cand_q[f][i], v, f, child_surv[f]))
        grown.sort(key=lambda g: -g[0])
        grown = grown[: policy.beam]
        frontier = [g[1] for g in grown]
        score = [g[0] for g in grown]
        surv = [g[3] for g in grown]
        if head_state is not None:
            head_state = head_state[:, torch.tensor([g[2] for g in grown], device=head_state.device)]
    return tree


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Follow the target's argmax down the tree. Returns (accepted path incl. node 0, bonus token).
    Rows [N, V] are reduced lazily: only the nodes on the walk (a wide tree's other rows cost nothing)."""
    path, u = [0], 0
    while True:
        t = int(target_logits[u].argmax())
        nxt = next((c for c in tree.children[u] if tree.tokens[c] == t), None)
        if nxt is None:
            return path, t
        path.append(nxt)
        u = nxt


def accept_sampling(tree: DraftTree, target_probs: torch.Tensor, generator: Union[torch.Generator, Draws, None]
                    ) -> tuple[list[int], int]:
    """Multi-draft rejection sampling down the tree (a chain is the one-sibling case).

    At node u with target distribution r, the proposals are tested in a fixed order: first the drafter's
    siblings in draw order, sibling i drawn from q_i = q renormalised without siblings < i, accepted with
    probability min(1, r(x)/q_i(x)), on rejection r ← norm(max(r − q_i, 0)); then the copy drafter's
    candidates, each a point mass δ_y (accepted with probability r(y); on rejection r ← norm(max(r − δ_y, 0)),
    i.e. y's mass removed). If every proposal is rejected (or u is a leaf) the bonus token is drawn from r.

    Why the output is the target distribution. Claim: given everything observed before a test (earlier
    proposals' values and rejections, anything that fixed the tree's shape), if the current residual is r
    and the next proposal x is drawn from exactly the distribution d it is tested with, the rest of the
    procedure outputs y with probability r(y). Induction on the proposals left: with none left, the output
    is drawn from r. Otherwise x is accepted and output with probability min(d(y), r(y)) at x = y, and
    rejected with total probability 1 − Σ min(d, r) = Σ max(r − d, 0), after which (induction) y comes out
    with probability norm(max(r − d, 0))(y); together min(d, r)(y) + max(r − d, 0)(y) = r(y). Nothing in the
    step needs d to relate to the other proposals, so (a) a later sibling may be drawn from a distribution
    that depends on earlier values (without replacement), (b) a point mass is just d = δ_y (a copy token is
    a deterministic function of the committed context, "drawn" from δ_y given it), and (c) the same token
    may be proposed twice: a copy token equal to a drafter sibling shares its tree node, but both proposals
    are tested and both residual updates applied (skipping the δ update after rejecting y would leave y's
    mass in r and over-sample y through the sibling, or vice versa). What must hold is that each proposal
    is drawn from the d it is tested with, given what came before: the tree's shape (which proposals exist)
    may depend on the committed context, on ancestors and on earlier siblings, never on a proposal's own
    value (hybrid.py ranks proposals by value-free estimates in sampling mode). Drafter siblings go first:
    with one sibling from q and a point mass δ_y, that order accepts with probability
    Σ_{v≠y} min(q(v), r(v)) + r(y), at least the r(y) + Σ_{v≠y} min((1 − r(y))·q(v), r(v)) of δ_y first.
    """
    rng = as_draws(generator)
    path, u = [0], 0
    while True:
        r = target_probs[u]
        drafted = [c for c in tree.children[u] if tree.sources[c] & DRAFTER]
        copied = tree.copy_children.get(u, [])
        if drafted:
            q = tree.child_dist[u].clone()
        nxt = None
        for c in drafted:
            x = tree.tokens[c]
            qi = q / q.sum()
            if rng.accept(float(r[x]) / float(qi[x])):
                nxt = c
                break
            r = residual(r, qi)
            q[x] = 0.0
        if nxt is None:
            for c in copied:
                x = tree.tokens[c]
                if rng.accept(float(r[x])):
                    nxt = c
                    break
                r = residual(r, point_mass(x, r))
        if nxt is None:
            return path, rng.choice(r)
        path.append(nxt)
        u = nxt


def point_mass(x: int, like: torch.Tensor) -> torch.Tensor:
    """δ_x, the draft distribution of a copied token."""
    d = torch.zeros_like(like)
    d[x] = 1.0
    return d
