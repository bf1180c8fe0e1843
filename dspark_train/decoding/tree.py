"""Draft trees: how much to draft (TreePolicy), drafting from the Drafter API, the tree attention mask, and
the two acceptance rules (greedy and lossless multi-draft rejection sampling).

A chain is the width-1 tree, so one code path serves both. Node 0 is the anchor (the last committed token,
whose KV the verify pass computes); every other node is a draft token whose parent precedes it.

Losslessness rule for the shape of a tree: how many children a node gets may depend on the node, its
ancestors and the drafter's confidence for the *next* slot given the node, never on the children's own
values (paper, Appendix A). Budget truncation follows a parent order fixed before children are drawn.

`TreePolicy.from_calibration` reads the per-slot calibration maps and `adaptive` of a calibration.json through
its schema (dspark_train/calibration.py, which also refuses a newer format_version); a map is applied by
`slotmaps.SlotMap.__call__` and the adaptive width/depth rule is `calibration.child_widths`, both shared with
the tuner's exact replay (`adaptive.simulate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..calibration import child_widths, read_adaptive
from ..slotmaps import IDENTITY, SlotMap
from .sampling import SamplingParams, residual, sample, sample_without_replacement, warp


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
    drawn from (sampling: needed for acceptance; greedy: kept only when probabilities are recorded)."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    children: list[list[int]] = field(default_factory=lambda: [[]])
    conf_logits: list[float] = field(default_factory=lambda: [float("nan")])  # slot confidence given the parent
    draft_probs: list[float] = field(default_factory=lambda: [1.0])  # q(token) under the distribution it came from
    child_dist: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, conf_logit: float, q: float) -> int:
        i = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.children.append([])
        self.children[parent].append(i)
        self.conf_logits.append(conf_logit)
        self.draft_probs.append(q)
        return i

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes (closed under parents, as nodes are created parents first)."""
        kids = [[c for c in ch if c < n] for ch in self.children[:n]]
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], kids, self.conf_logits[:n],
                         self.draft_probs[:n], {u: q for u, q in self.child_dist.items() if u < n and kids[u]})

    def widths(self) -> list[int]:
        """Nodes per depth 1..max depth."""
        out = [0] * max(self.depths)
        for d in self.depths[1:]:
            out[d - 1] += 1
        return out


def tree_mask(parents: list[int], ctx_len: int, device) -> torch.Tensor:
    """4-D bool mask (1, 1, N, ctx+N): each node sees the whole committed context, its ancestors and itself."""
    n = len(parents)
    if all(p == i - 1 for i, p in enumerate(parents)):
        own = torch.ones(n, n, dtype=torch.bool).tril_()
    else:
        own = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(parents):
            if p >= 0:
                own[i] = own[p]
            own[i, i] = True
    mask = torch.cat([torch.ones(n, ctx_len, dtype=torch.bool), own], dim=1)
    return mask[None, None].to(device)


@torch.no_grad()
def draft_tree(drafter, state, anchor: int, policy: TreePolicy, params: SamplingParams, max_depth: int,
               generator: Optional[torch.Generator] = None, keep_dists: bool = False) -> DraftTree:
    """One backbone pass, then the sequential head expands candidates depth by depth (greedy: top-k children;
    sampling: children drawn without replacement from the warped draft distribution)."""
    tree = DraftTree([anchor])
    depth = min(max_depth, len(policy.widths))
    if depth <= 0:
        return tree
    device = drafter.device
    block = drafter.propose(state, torch.tensor([anchor], device=device))
    depth = min(depth, block.base_logits.shape[1])
    keep = keep_dists or not params.greedy
    frontier, surv, score, head_state = [0], [1.0], [1.0], None
    for k in range(depth):
        prev = torch.tensor([[tree.tokens[u] for u in frontier]], device=device)
        logits, conf, head_state = drafter.head_step(block, k, prev, head_state)
        probs = warp(logits[0], params)  # [F, V]
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
            cand = sample_without_replacement(probs, torch.tensor(widths), generator)
        cand_q = probs.gather(-1, cand).tolist()
        cand = cand.tolist()
        grown = []  # (path score, node, frontier row of its parent, its survival)
        for f, u in enumerate(frontier):
            if widths[f] and keep:
                tree.child_dist[u] = probs[f]
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


def accept_sampling(tree: DraftTree, target_probs: torch.Tensor, generator: Optional[torch.Generator]
                    ) -> tuple[list[int], int]:
    """Multi-draft rejection sampling down the tree (a chain is the one-sibling case).

    At node u with target distribution r: sibling i (drawn from q_i = q renormalised without siblings < i) is
    accepted with probability min(1, r(x)/q_i(x)); on rejection r ← norm(max(r − q_i, 0)). If every sibling
    is rejected (or u is a leaf) the bonus token is drawn from r. Output ~ the target distribution exactly.
    """
    path, u = [0], 0
    while True:
        r = target_probs[u]
        kids = tree.children[u]
        if kids:
            q = tree.child_dist[u].clone()
            uniforms = torch.rand(len(kids), generator=generator, device=q.device).tolist()
        nxt = None
        for c, uni in zip(kids, uniforms if kids else ()):
            x = tree.tokens[c]
            qi = q / q.sum()
            if uni * float(qi[x]) < float(r[x]):
                nxt = c
                break
            r = residual(r, qi)
            q[x] = 0.0
        if nxt is None:
            return path, sample(r, generator)
        path.append(nxt)
        u = nxt
