"""EAGLE-3 (drafter kind eagle3, drafters/eagle3.py): the training-time test computes exactly what decoding drafts,
no information leaks, greedy decoding is lossless in every mode, calibration's anchor replay is the decoder's
rounds, the artifact round-trips with its fingerprint, and recipes that make no sense for it are refused.
Tiny fp32 targets; sampling exactness is in test_exact_sampling.py (path-dependent drafters) and the trainer in
test_train.py."""
import pytest
import torch

from dspark_train.config import DrafterConfigSection, RecipeError, TargetConfig, load_recipe
from dspark_train.decoding import SpeculativeDecoder, TreePolicy
from dspark_train.drafters import Drafter, build_drafter
from dspark_train.target import default_feature_layers, load_target

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
SMALL = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, vocab_size=16,
             initializer_range=0.3)
GAMMA = 4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return load_target(TargetConfig(config=TINY, dtype="float32", num_feature_layers=3))


@pytest.fixture(scope="module")
def small():
    return load_target(TargetConfig(config=SMALL, dtype="float32", feature_layers=[1, 2]))


def make(target, gamma=GAMMA, scale=True, **kw) -> Drafter:
    """An eagle3 drafter; `scale`: weights enlarged so every path shows in the logits."""
    torch.manual_seed(0)
    d = build_drafter(DrafterConfigSection(kind="eagle3", block_size=gamma, **kw), target).eval()
    if scale:
        with torch.no_grad():
            for name, p in d.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.15 if p.dim() > 1 and p.shape[-1] >= 64 else 0.3)
                else:
                    p.uniform_(0.5, 1.5)  # per-channel scales, so a misplaced or missing norm shows
    return d


def batch(target, T=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, target.vocab_size, (2, T), generator=g)
    f = target.forward_features(ids)
    return ids, f.features, f.last_hidden


def run(d, ids, feats, last, anchors):
    with torch.no_grad():
        return d(feats, last, ids, torch.as_tensor(anchors))


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


def walk(d, rnd, tokens, width=3, full=False):
    """head_step down the teacher-forced chain of `tokens` [R, γ] (the token at anchor+k): candidate 1 of each
    step is the chain's (candidate 0 when alone), the others random siblings whose scratch entries must stay
    invisible to it; every candidate of the next step descends from the chain's. Returns logits [R, γ, V] and
    confidences [R, γ]."""
    rows, logits, confs, j = None, [], [], min(1, width - 1)
    for k in range(d.config.block_size):
        cand = torch.randint(4, d.config.vocab_size, (tokens.shape[0], width))
        cand[:, j] = tokens[:, k]
        lg, cf, rows = d.head_step(rnd, k, cand, rows, full=full)
        logits.append(lg[:, j])
        confs.append(cf[:, j])
        rows = rows[:, [j] * width]
    return torch.stack(logits, 1), torch.stack(confs, 1)


# ---------------------------------------------------------------------- training forward == inference
@pytest.mark.parametrize("opts", [{}, {"qk_norm": False}, {"draft_vocab_size": 120}])
def test_training_forward_equals_the_decoders_rounds_and_the_replay(target, opts):
    """The training-time test at sampled anchors computes, slot for slot, what decoding drafts when it is fed the
    same tokens: context committed in uneven chunks (the KV cache grows past its first allocation), rounds
    whose sibling candidates write scratch entries the true path must not see, anchors 1 and 2 (few or no
    context entries), and calibration's replay at every anchor at once (`blocks_at`)."""
    vocab = opts.pop("draft_vocab_size", None)
    d = make(target, **opts)
    T = 300
    ids, feats, last = batch(target, T=T)
    if vocab:
        d.set_draft_vocab(torch.cat([ids.flatten().unique(), torch.arange(4)]).unique()[:vocab])
    anchors = [1, 2, 7, 50, 180, 290]
    ref = run(d, ids, feats, last, [anchors, anchors])
    assert ref.logits.shape == (2, len(anchors), GAMMA, vocab or target.vocab_size)
    st = d.init_state(2)
    done = 0
    for a, p in enumerate(anchors):
        cuts = sorted({done, p, *[done + (p - done) * i // 3 for i in (1, 2)]})
        for lo, hi in zip(cuts, cuts[1:]):
            d.extend_context(st, feats[:, lo:hi], last[:, lo:hi], ids[:, lo:hi])
        done = p
        assert st.length == p
        rnd = d.propose(st, ids[:, p])
        logits, confs = walk(d, rnd, ids[:, p:p + GAMMA])
        assert close(logits, ref.logits[:, a]) and close(confs, ref.conf_logits[:, a]), p
    assert st.kv.shape[4] >= T  # grew beyond the first 256 slots
    for a, p in enumerate(anchors):  # the decoder's prefill: the whole context in a fresh state's first chunk
        fresh = d.init_state(2)
        d.extend_context(fresh, feats[:, :p], last[:, :p], ids[:, :p])
        logits, confs = walk(d, d.propose(fresh, ids[:, p]), ids[:, p:p + GAMMA])
        assert close(logits, ref.logits[:, a]) and close(confs, ref.conf_logits[:, a]), p
    rnd = d.blocks_at(feats, last, ids, torch.tensor([anchors, anchors]))
    pos = torch.tensor(anchors)[:, None] + torch.arange(GAMMA)
    logits, confs = walk(d, rnd, ids[:, pos].flatten(0, 1), width=1)
    assert close(logits.view_as(ref.logits), ref.logits) and close(confs.view_as(ref.conf_logits), ref.conf_logits)
    full, _, _ = d.head_step(d.propose(st, ids[:, done]), 0, ids[:, done, None], full=True)
    assert full.shape[-1] == target.vocab_size and (vocab is None or torch.isinf(full).sum() > 0)


def test_information_flow(target):
    """Slot k of the chain at anchor p sees the target's features before p, the tokens up to p+k (context
    entries pair tokens with features) and its own earlier slots: nothing later, nothing of another chain."""
    d = make(target)
    ids, feats, last = batch(target)
    anchors = [[5, 20, 33], [9, 20, 40]]
    ref = run(d, ids, feats, last, anchors)
    a, p, k = 1, 20, 2
    alone = run(d, ids, feats, last, [[p, -1], [-1, p]])  # packing and padding change nothing
    assert close(alone.logits[0, 0], ref.logits[0, a]) and close(alone.logits[1, 1], ref.logits[1, a])
    f2 = feats.clone()
    f2[:, p:] += torch.randn_like(f2[:, p:])  # features from the anchor on: invisible (and all of last_hidden)
    out = run(d, ids, f2, torch.randn_like(last), anchors)
    assert close(out.logits[:, a], ref.logits[:, a]) and close(out.conf_logits[:, a], ref.conf_logits[:, a])
    assert not close(out.logits[0, 2], ref.logits[0, 2], 1e-3)  # ... but not to a later chain
    f3 = feats.clone()
    f3[:, p - 1] += torch.randn_like(f3[:, p - 1])  # the feature before the anchor: step 0's hidden
    assert not close(run(d, ids, f3, last, anchors).logits[:, a, 0], ref.logits[:, a, 0], 1e-3)
    i2 = ids.clone()
    i2[:, p + k] = (ids[:, p + k] + 7) % target.vocab_size  # the token at p+k: slots k.. (autoregressive)
    out = run(d, i2, feats, last, [[p], [p]])
    changed = [not close(out.logits[:, 0, j], ref.logits[:, a, j], 1e-3) for j in range(GAMMA)]
    assert changed == [j >= k for j in range(GAMMA)]
    i3 = ids.clone()
    i3[:, p + GAMMA:] = 4  # tokens after the chain: invisible; a token before the anchor: a context entry's
    i3[:, p - 3] = (ids[:, p - 3] + 1) % target.vocab_size
    out = run(d, i3, feats, last, [[p], [p]])
    assert not close(out.logits[:, 0], ref.logits[:, a], 1e-3)
    i3[:, p - 3] = ids[:, p - 3]
    assert close(run(d, i3, feats, last, [[p], [p]]).logits[:, 0], ref.logits[:, a])


# ---------------------------------------------------------------------- lossless decoding
WIDE = TreePolicy([6, 4, 3, 2], beam=6, node_budget=40)


def prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(target, prompt, n):
    out = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0,
                                eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_greedy_is_lossless_in_every_mode(small):
    """fp32 greedy output equals the target's own in chain, tree (the default: EAGLE-2's reranked beam tree, and a
    wide fixed one), adaptive (a calibration's policy), hybrid (copy branches) and batched modes. The 16-token
    target makes an untrained drafter's drafts hit often, so multi-token acceptance and off-first-branch
    paths happen."""
    from dspark_train.policy.calibration import Calibration
    d = make(small, gamma=3, scale=False)
    cal = Calibration(3, [1.0] * 3, [0.1] * 3, [0.1] * 3, [0.5] * 3, [0.5] * 3, [0.2] * 3, [0.2] * 3,
                      adaptive={"depth_threshold": 0.05, "width_threshold": 0.8, "max_width": 3, "node_budget": 8,
                                "beam": 2}, cost_profile={"tokens": [1, 2], "steps_per_s": [10.0, 9.0]})
    dec = SpeculativeDecoder(small, d, calibration=cal.to_json(), retune=False)
    assert dec.policies["tree"].rerank
    rounds = {}
    ps = prompts(6, 16, seed=1)
    for p in ps:
        ref = hf_greedy(small, p, 20)
        for mode, policy in (("chain", None), ("tree", None), ("wide", WIDE), ("adaptive", None), ("hybrid", None)):
            tr = dec.generate(p, 20, mode="tree" if mode == "wide" else mode, eos_token_id=[], policy=policy)
            assert tr.tokens == ref, f"{mode} diverged for prompt {p}"
            rounds.setdefault(mode, []).extend(tr.rounds)
    batched = dec.generate_batch(ps, 20, eos_token_id=[])
    assert [t.tokens for t in batched.requests] == [hf_greedy(small, p, 20) for p in ps]
    assert max(r.n_accepted for r in rounds["chain"]) >= 2
    assert any(r.n_accepted and not r.accepted[0] for r in rounds["wide"])  # a path off the first branch
    assert max(r.verified for r in rounds["tree"]) == 16 and max(max(r.depths, default=0) for r in rounds["tree"]) == 3
    assert max(r.verified for r in rounds["adaptive"]) <= 8


def test_the_decoder_commits_exactly_the_accepted_tokens_to_the_drafter(small):
    """Every round hands the drafter the committed tokens with their features, in order, also where the accepted
    path leaves the tree's first branch or runs through copied nodes: its context entries are the text's."""
    d = make(small, gamma=3, scale=False)
    seen, extend = [], d.extend_context

    def spy(state, features, last_hidden, token_ids=None):
        assert features.shape[1] == token_ids.shape[1]
        seen.extend(token_ids[0].tolist())
        return extend(state, features, last_hidden, token_ids)
    d.extend_context = spy
    dec = SpeculativeDecoder(small, d)
    off_branch = 0
    for p in prompts(4, 16, seed=3):
        for mode, policy in (("tree", WIDE), ("hybrid", WIDE)):
            seen.clear()
            tr = dec.generate(p, 20, mode=mode, eos_token_id=[], policy=policy)
            last = tr.rounds[-1].committed
            assert seen == (p + tr.tokens)[:len(p) + len(tr.tokens) - last - 1], mode  # up to the last anchor
            off_branch += sum(bool(r.n_accepted and not r.accepted[0]) for r in tr.rounds)
    assert off_branch


def test_the_anchor_replay_is_the_decoders_rounds(small):
    """Calibration replays greedy drafting at every anchor of the target's own greedy texts (`blocks_at` +
    head_step); at the anchors where decoding rounds started it must give their confidences and survival."""
    from dspark_train.calibration.heldout import anchor_stats
    from dspark_train.data.examples import Example, anchor_candidates
    d = make(small, gamma=3, scale=False)
    dec = SpeculativeDecoder(small, d)
    examples, starts = [], {}
    for i, p in enumerate(prompts(6, 16, seed=5)):
        trace = dec.generate(p, max_new_tokens=16, policy=TreePolicy.chain(3), eos_token_id=[])
        examples.append(Example(str(i), p + trace.tokens, [0] * len(p) + [1] * len(trace.tokens)))
        pos = len(p)
        for r in trace.rounds:
            starts[(i, pos)] = r
            pos += r.committed
    stats = anchor_stats(small, d, examples, anchors_per_chunk=5)
    keys = [(i, a) for i, e in enumerate(examples) for a in anchor_candidates(torch.tensor(e.loss_mask)).tolist()]
    checked = 0
    for row, key in enumerate(keys):
        r = starts.get(key)
        if r is None or len(r.tokens) < 3 or stats.depth[row] < 3:
            continue
        assert torch.allclose(torch.tensor(stats.conf_logits[row]), torch.tensor(r.conf_logits), atol=1e-4)
        assert torch.allclose(torch.tensor(stats.top_probs[row]), torch.tensor(r.draft_probs), atol=1e-5)
        assert stats.n_spine[row] == r.n_accepted, key
        checked += 1
    assert checked >= 12 and stats.n_spine.max() >= 1


# ---------------------------------------------------------------------- artifact, recipe
def test_save_load_round_trip_and_fingerprint(target, tmp_path):
    from dspark_train.drafters.loading import FingerprintMismatch, load_local
    d = make(target)
    ids, feats, last = batch(target)
    d.set_draft_vocab(torch.arange(4, 200))
    ref = run(d, ids, feats, last, [[5, 20], [9, 30]])
    d.save_pretrained(tmp_path)
    loaded = load_local(tmp_path, target)
    assert loaded.config.kind == "eagle3" and loaded.config.head == "none" and loaded.config.num_layers == 1
    out = run(loaded, ids, feats, last, [[5, 20], [9, 30]])
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.conf_logits, ref.conf_logits)
    other = load_target(TargetConfig(config=TINY, dtype="float32"))  # 5 feature layers: not this drafter's
    with pytest.raises(FingerprintMismatch, match="feature_layers"):
        load_local(tmp_path, other)


def test_recipes_that_make_no_sense_for_eagle3_are_refused(repo):
    tiny = repo / "recipes" / "tiny.yaml"
    assert load_recipe(tiny, ["drafter.kind=eagle3"]).target.num_feature_layers == 3  # EAGLE-3's default
    assert load_recipe(tiny, ["drafter.kind=eagle3", "target.num_feature_layers=5"]).target.num_feature_layers == 5
    assert load_recipe(tiny).target.num_feature_layers is None  # dspark: unchanged (5 spread layers)
    for override, key in (("drafter.head=rnn", "drafter.head"), ("drafter.num_layers=2", "drafter.num_layers"),
                          ("drafter.sample_from_anchor=false", "drafter.sample_from_anchor"),
                          ("drafter.mask_token_id=3", "drafter.mask_token_id"),
                          ("drafter.init=target", "drafter.init")):
        with pytest.raises(RecipeError, match=key):
            load_recipe(tiny, ["drafter.kind=eagle3", override])
    assert default_feature_layers(30, 3) == [2, 15, 27]  # SmolLM2: vLLM's (2, L//2, L-3)
    assert default_feature_layers(30) == [1, 8, 14, 20, 27]  # the others: 5 spread evenly
    recipe = load_recipe(repo / "recipes" / "smollm2_135m_eagle3.yaml")
    assert recipe.drafter.kind == "eagle3" and recipe.target.num_feature_layers == 3


def test_decoding_without_token_ids_or_context_is_refused(target):
    d = make(target)
    ids, feats, last = batch(target)
    st = d.init_state(2)
    with pytest.raises(ValueError, match="committed position"):
        d.propose(st, ids[:, 0])
    with pytest.raises(ValueError, match="token_ids"):
        d.extend_context(st, feats[:, :5], last[:, :5])
