"""Sampled decoding is lossless, proved exactly: every random outcome of a round is enumerated with its
probability, and the law of the tokens the round emits is compared with the target's to 1e-9.

A round here is the decoder's own code (`draft_tree`, `HybridDrafting.draft` with its budget, `accept_sampling`)
over a 3-token vocabulary, a drafter whose distributions and confidences are fixed tables per context, and a
target whose distribution is a fixed function of the whole context. Every random choice the round makes goes
through `sampling.Draws`; `Enumerator` replaces it and the round is re-run once per branch of those choices
(drafts without replacement, each acceptance test, the correction or bonus token), multiplying the branch
probabilities in float64. Summing over all runs gives the exact law of the whole emitted sequence (accepted path +
correction or bonus token, 1 to depth + 1 tokens). It is scored on sequences of the longest length n a round emits:
where a round emits fewer tokens, the rest come from the next rounds, i.e. from the target itself (this test covers
every context), so P(x_1..x_n) = Σ_j P(round emits x_1..x_j) · Π_{i>j} p(x_i | x_<i) must equal Π_i p(x_i | x_<i).
The χ² tests on real models (test_sampling.py, test_hybrid.py) stay as the second line.

The grid crosses tree shapes (chains, widths, beams), node budgets, adaptive depth/width thresholds, flat and
steep cost curves SPS(B), copy candidates that agree or disagree with the drafter's likely tokens, a confident copy
that skips the drafter, and temperature/top-p/top-k warping. A second grid gives the drafter a pruned draft
vocabulary (2 of the 3 tokens, out of order, as drafters/model.py's `draft_vocab`), so `draft_tree` maps its draws
to target ids and expands its distributions for acceptance, and the target's mass on the third token can only be
emitted as a correction or bonus token or through a copy candidate; it also adds trees of depth 3 and 4.

Round 2's hybrid budget ranked proposals by values whose very existence depended on the sampled tokens; it fails
here (e.g. the `issue_case` below: p = (.6, .1, .3) came out as (.625, .10, .27)).
"""
from __future__ import annotations

import itertools
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dspark_train.decoding.copy_drafter import CopyCandidate
from dspark_train.decoding.hybrid import HybridDrafting, HybridPolicy
from dspark_train.decoding.sampling import Draws, SamplingParams, warp
from dspark_train.decoding.tree import TreePolicy, accept_sampling, draft_tree

V = 3
TOL = 1e-9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tens of thousands of ops on 3-element tensors: torch's intra-op threads only add synchronisation (on a
    loaded 2-core machine, 30-60x per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Enumerator(Draws):
    """Draws that follow a script of branch indices (extended with 0s), recording each choice point's options;
    `prob` is the probability of the branch taken."""

    def __init__(self, script: list[int]):
        super().__init__(None)
        self.script, self.arity, self.pos, self.prob = list(script), [], 0, 1.0

    def _pick(self, options: list[tuple]):
        options = [(v, p) for v, p in options if p > 0]
        if self.pos == len(self.script):
            self.script.append(0)
        value, p = options[self.script[self.pos]]
        self.arity.append(len(options))
        self.pos += 1
        self.prob *= p
        return value

    def accept(self, p: float) -> bool:
        p = min(1.0, max(0.0, p))
        return self._pick([(True, p), (False, 1.0 - p)])

    def choice(self, probs: torch.Tensor) -> int:
        return self._pick(list(enumerate(probs.tolist())))

    def without_replacement(self, probs: torch.Tensor, k) -> torch.Tensor:
        k = list(k)
        out = torch.zeros(probs.shape[0], max(k), dtype=torch.long)
        for f, n in enumerate(k):
            q = probs[f].tolist()
            for j in range(n):
                left = sum(q)
                x = self._pick([(v, qv / left) for v, qv in enumerate(q)])
                out[f, j] = x
                q[x] = 0.0
        return out


def enumerate_round(run) -> dict:
    """{emitted tokens: probability} over every outcome of `run(draws)`."""
    law, script = defaultdict(float), []
    while True:
        e = Enumerator(script)
        law[tuple(run(e))] += e.prob
        script = e.script
        i = len(script) - 1
        while i >= 0 and script[i] + 1 >= e.arity[i]:
            i -= 1
        if i < 0:
            return law
        script = script[:i] + [script[i] + 1]


class TableDrafter:
    """The Drafter API over fixed tables: slot k's logits and confidence logit given the previous token. With
    `vocab` (target ids, draft index i = target id vocab[i]) the logits cover that sub-vocabulary only, as a pruned
    drafter's do (drafters/model.py's `draft_vocab`)."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor, conf: torch.Tensor, vocab: list[int] | None = None):
        self.logits, self.conf = logits, conf  # [γ, V (previous token, a target id), Vd], [γ, V]
        self.draft_vocab = None if vocab is None else torch.tensor(vocab)
        self.config = SimpleNamespace(vocab_size=V)

    def propose(self, state, anchor):
        logits = self.logits[None, :, 0]
        return type("Block", (), {"draft_logits": logits, "base_logits": logits})()

    def head_step(self, block, k, prev, head_state=None, full=True):
        return self.logits[k][prev[0]][None], self.conf[k][prev[0]][None], None


class FixedCopy:
    """The copy drafter's interface with fixed candidates (what it would propose from some committed context)."""

    def __init__(self, candidates):
        self.candidates = candidates

    def init_state(self, committed):
        return None

    def propose(self, state, max_depth):
        return [CopyCandidate(c.tokens[:max_depth], c.cells[:max_depth], c.probs[:max_depth], 0, 1)
                for c in self.candidates]


class Target:
    """Target logits as a fixed function of the whole context (a seeded draw per context, or as given)."""

    def __init__(self, seed: int, sharp: float, fixed: dict | None = None):
        self.seed, self.sharp, self.memo = seed, sharp, dict(fixed or {})

    def logits(self, context: tuple) -> torch.Tensor:
        if context not in self.memo:
            g = torch.Generator().manual_seed(hash((self.seed,) + context) % 2**31)
            self.memo[context] = torch.randn(V, generator=g, dtype=torch.float64) * self.sharp
        return self.memo[context]


def run_round(draws, cfg, drafter, target, copy):
    """One round after the anchor (context `ANCHOR`): draft, verify against the target, accept; emitted tokens."""
    params = cfg["params"]
    if cfg["hybrid"]:
        hyb = HybridDrafting(copy, HybridPolicy(cfg["skip"], cfg["max_nodes"]), cfg["sps"], [ANCHOR])
        tree = hyb.draft(drafter, None, ANCHOR, cfg["policy"], params, cfg["depth"], draws)
    else:
        tree = draft_tree(drafter, None, ANCHOR, cfg["policy"], params, cfg["depth"], draws)
    paths = [()]
    for i in range(1, len(tree)):
        paths.append(paths[tree.parents[i]] + (tree.tokens[i],))
    probs = torch.stack([warp(target.logits((ANCHOR,) + p), params) for p in paths])
    path, bonus = accept_sampling(tree, probs, draws)
    return [tree.tokens[i] for i in path[1:]] + [bonus]


ANCHOR = 0


def exact_error(cfg) -> float:
    """Largest |P_round(x) − p(x)| over every sequence x of n tokens, n the most a round emits (tree depth + 1 at
    most), where a round that emits only x_1..x_j is continued by the target: P_round(x) = Σ_j P(round emits
    x_1..x_j) · Π_{i>j} p(x_i | x_<i), computed as P_j = P_{j−1} · p(x_j | x_<j) + P(round emits x_1..x_j)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    gamma = len(cfg["policy"].widths)
    vocab = cfg.get("vocab")
    vd = V if vocab is None else len(vocab)
    if "tables" in cfg:
        drafter = TableDrafter(*cfg["tables"])
    else:  # "rising": a low first-slot confidence and high later ones, so a child outranks a later sibling
        mean = torch.tensor([-0.5] + [2.5] * (gamma - 1), dtype=torch.float64)[:, None] if cfg["conf"] == "rising" \
            else torch.zeros(gamma, 1, dtype=torch.float64)
        spread = 0.5 if cfg["conf"] == "rising" else 2.0
        drafter = TableDrafter(torch.randn(gamma, V, vd, generator=g, dtype=torch.float64) * cfg["sharp"],
                               mean + torch.randn(gamma, V, generator=g, dtype=torch.float64) * spread, vocab)
    fixed = cfg.get("target")
    if cfg.get("conf") == "rising":  # a target near the draft at the root: residuals with broad support
        root = drafter.logits[0, ANCHOR]
        if vocab is not None:  # the tokens outside the draft vocabulary get logits of the same scale
            outside = torch.randn(V, generator=g, dtype=torch.float64) * cfg["sharp"]
            root = outside.index_copy(0, drafter.draft_vocab, root)
        fixed = {(ANCHOR,): root + 0.8 * torch.randn(V, generator=g, dtype=torch.float64)}
    target = Target(cfg["seed"], cfg["sharp"], fixed)
    copy = FixedCopy(cfg["copy"])
    law = enumerate_round(lambda d: run_round(d, cfg, drafter, target, copy))
    params = cfg["params"]
    p = {}  # context after the anchor -> the target's warped distribution there
    n = max(map(len, law))
    err = abs(sum(law.values()) - 1.0)
    for x in itertools.product(range(V), repeat=n):
        got, want = 0.0, 1.0
        for j in range(n):
            if x[:j] not in p:
                p[x[:j]] = warp(target.logits((ANCHOR,) + x[:j]), params).tolist()
            px = p[x[:j]][x[j]]
            got, want = got * px + law.get(x[:j + 1], 0.0), want * px
        err = max(err, abs(got - want))
    return err


def steep(b):
    return 1.0 if b <= 3 else 0.1


def flat(b):
    return 1.0 - 0.01 * b


def medium(b):
    return 1.0 / (1.0 + 0.35 * (b - 1))


POLICIES = [  # (name, policy): chains, fixed trees, beams, budgets, adaptive thresholds
    ("chain2", TreePolicy([1, 1], 1, 2)),
    ("chain3", TreePolicy([1, 1, 1], 1, 3)),
    ("w21", TreePolicy([2, 1], 1, 3)),
    ("w21-budget2", TreePolicy([2, 1], 1, 2)),
    ("w22-beam2", TreePolicy([2, 2], 2, 6)),
    ("w22-beam2-budget3", TreePolicy([2, 2], 2, 3)),
    ("w31-beam2", TreePolicy([3, 1], 2, 5)),
    ("w12", TreePolicy([1, 2], 1, 3)),
    ("adaptive", TreePolicy([2, 2], 1, 4, None, depth_threshold=0.3, width_threshold=0.6)),
    ("adaptive-beam2", TreePolicy([2, 2], 2, 5, None, depth_threshold=0.15, width_threshold=0.5)),
]
DEEP = [  # trees of depth 3 and 4 (affordable with a 2-token draft vocabulary: the drafter branches at most 2-fold)
    ("w211", TreePolicy([2, 1, 1], 1, 4)),
    ("w212-beam2", TreePolicy([2, 1, 2], 2, 7)),
    ("w121-beam2", TreePolicy([1, 2, 1], 2, 5)),
    ("chain4", TreePolicy([1, 1, 1, 1], 1, 4)),
    ("adaptive3", TreePolicy([2, 2, 2], 1, 5, None, depth_threshold=0.3, width_threshold=0.6)),
]
COPIES = {  # tokens after the anchor the copy drafter proposes, with its acceptance estimates
    "none": [],
    "one": [CopyCandidate([2, 2], [0, 0], [0.3, 0.6], 0, 1)],
    "confident": [CopyCandidate([1, 0], [0, 0], [0.95, 0.9], 0, 1)],
    "two": [CopyCandidate([0, 1], [0, 0], [0.5, 0.4], 0, 1),
            CopyCandidate([2, 1, 2], [0, 0, 0], [0.2, 0.7, 0.5], 0, 1)],
    "weak": [CopyCandidate([1, 1], [0, 0], [0.01, 0.01], 0, 1)],
}
PARAMS = [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9), SamplingParams(1.3, top_k=2)]
SPS = {"steep": steep, "flat": flat, "medium": medium}
VOCABS = [[2, 0], [1, 0], [2, 1]]  # pruned draft vocabularies (draft index i = target id v[i]): 2 tokens, out of order


def grid(n: int, seed: int = 0, policies: list = POLICIES, vocabs: list | None = None) -> list[dict]:
    """n configurations drawn (seeded) from the product of the factors above (and of `vocabs`, if given)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        name, policy = rnd.choice(policies)
        hybrid = rnd.random() < 0.75
        copy = rnd.choice(list(COPIES)) if hybrid else "none"
        sps = rnd.choice(list(SPS))
        out.append(dict(id=f"{i}-{name}-{'hybrid-' + copy if hybrid else 'plain'}-{sps}", seed=1000 + i,
                        policy=policy, hybrid=hybrid, copy=COPIES[copy], sps=SPS[sps],
                        skip=rnd.choice([0.9, 2.0]), max_nodes=rnd.choice([2, 3, 64]),
                        params=rnd.choice(PARAMS), sharp=rnd.choice([1.0, 2.5]), depth=len(policy.widths),
                        conf=rnd.choice(["random", "rising"])))
        if vocabs:
            out[-1]["vocab"] = rnd.choice(vocabs)
            out[-1]["id"] += "-vocab" + "".join(map(str, out[-1]["vocab"]))
    return out


def near_issue(n: int, seed: int = 1) -> list[dict]:
    """n perturbations of `issue_case`: draft and target distributions and confidences moved by noise, other copy
    candidates, tree shapes that expand one of several siblings (beam 1), cost curves that cut after a few
    proposals, warping. Round 2's budget fails many of them; the random grid rarely hits this corner (the bias
    needs a sibling pruned behind a deeper proposal and a target that tells the difference)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = [TreePolicy([2, 1], 1, 3), TreePolicy([2, 2], 1, 4), TreePolicy([2, 1, 1], 1, 4)]
    out = []
    for i in range(n):
        base = issue_case()
        policy = rnd.choice(shapes)
        gamma = len(policy.widths)
        logits = torch.randn(gamma, V, V, generator=g, dtype=torch.float64)
        logits[0, ANCHOR] = base["tables"][0][0, ANCHOR] + 0.2 * torch.randn(V, generator=g, dtype=torch.float64)
        conf = torch.full((gamma, V), 2.2, dtype=torch.float64) + 0.3 * torch.randn(gamma, V, generator=g,
                                                                                   dtype=torch.float64)
        conf[0] = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
        target = base["target"][(ANCHOR,)] + 0.2 * torch.randn(V, generator=g, dtype=torch.float64)
        copy = rnd.choice(["weak", "weak", "one", "two"])
        out.append(dict(base, id=f"near-{i}-{copy}", policy=policy, tables=(logits, conf), depth=gamma,
                        target={(ANCHOR,): target}, copy=COPIES[copy] if copy != "weak" else base["copy"],
                        sps=rnd.choice([steep, medium]), params=rnd.choice(PARAMS[:2])))
    return out


def issue_case() -> dict:
    """The issue's reproduction as an exact case: draft q = (.5, .3, .2) at the root with confidence σ(0) = .5,
    the highest-q sibling expanded (beam 1) under a uniform slot-2 distribution with confidence σ(2.2) ≈ .9, a
    weak copy candidate (2, 2), target p = (.6, .1, .3), a cost curve that admits two proposals. Round 2's budget
    ranked the expanded sibling's child (.5 · .9) ahead of the second sibling (.5 · .5), so the second sibling
    survived only when its own q was the larger: p came out as (.625, .10, .27)."""
    logits = torch.zeros(2, V, V, dtype=torch.float64)
    logits[0, ANCHOR] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    conf = torch.tensor([[0.0] * V, [2.2] * V], dtype=torch.float64)
    return dict(id="issue", seed=7, policy=TreePolicy([2, 1], 1, 3), hybrid=True, tables=(logits, conf),
                target={(ANCHOR,): torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64).log()},
                copy=[CopyCandidate([2, 2], [0, 0], [0.01, 0.01], 0, 1)], sps=steep, skip=0.9, max_nodes=64,
                params=SamplingParams(1.0), sharp=2.0, depth=2)


def assert_exact(configs):
    bad = [f"{cfg['id']}: {err:.2e}" for cfg in configs if (err := exact_error(cfg)) > TOL]
    assert not bad, "round output differs from the target's law: " + "; ".join(bad)


def test_enumerator_reproduces_sampling_without_replacement_exactly():
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    law = enumerate_round(lambda d: d.without_replacement(q, [2])[0].tolist())
    for a, b in itertools.permutations(range(3), 2):
        assert law[(a, b)] == pytest.approx(float(q[0, a] * q[0, b] / (1 - q[0, a])), abs=1e-15)


def test_the_issue_case_is_exact():
    assert exact_error(issue_case()) < TOL


def test_rounds_around_the_issue_emit_the_target_distribution_exactly():
    assert_exact(near_issue(40))


@pytest.mark.parametrize("chunk", range(8))
def test_every_round_emits_the_target_distribution_exactly(chunk):
    """240 configurations (30 per chunk, so the failures of one show up beside the others)."""
    assert_exact(grid(240)[chunk::8])


@pytest.mark.parametrize("chunk", range(2))
def test_rounds_of_a_pruned_draft_vocabulary_emit_the_target_distribution_exactly(chunk):
    """80 configurations whose drafter covers two of the three tokens (tree.py maps its draws to target ids and
    expands its distributions for acceptance); the target puts mass on the third, which only a correction or bonus
    token or a copy candidate can emit. Chains and trees up to depth 4, plain and hybrid, all occur."""
    assert_exact(grid(80, seed=2, policies=POLICIES + DEEP, vocabs=VOCABS)[chunk::2])
