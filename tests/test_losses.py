"""Loss terms against direct computations: p_t at block positions, pruned-vocabulary L1, CE, BCE, invariance."""
import math

import pytest
import torch
import torch.nn.functional as F

from dspark_train.training import losses as L

torch.manual_seed(0)
B, T, A, G, V, d = 3, 12, 4, 3, 20, 8


@pytest.fixture()
def setup():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g)
    anchors = torch.tensor([[0, 3, 5, -1], [2, 4, 8, 9], [1, -1, -1, -1]])
    valid = torch.zeros(B, A, G, dtype=torch.bool)
    for b in range(B):
        for a in range(A):
            if anchors[b, a] >= 0:
                n = int(torch.randint(1, G + 1, (1,), generator=g))
                valid[b, a, :n] = True
    labels = torch.randint(0, V, (B, A, G), generator=g)
    return hidden, W, anchors, valid, labels


def test_position_weights():
    w = L.position_weights(4, 4.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-0.25), math.exp(-0.5), math.exp(-0.75)]))


def test_target_distribution_only_at_block_positions(setup):
    hidden, W, anchors, valid, _ = setup
    pos, rows = L.block_positions(anchors, valid, T)
    assert len(pos) < int(valid.sum())  # overlapping blocks share positions
    full = F.softmax(hidden @ W.T, -1)
    dist = L.target_distribution(hidden, W, pos, None, chunk=4)
    expect = torch.stack([full[b, anchors[b, a] + k] for b, a, k in torch.nonzero(valid).tolist()])
    assert torch.allclose(dist.probs[rows], expect, atol=1e-6) and torch.all(dist.outside == 0)
    D = torch.tensor([0, 3, 4, 9, 15])
    pruned = L.target_distribution(hidden, W, pos, D)
    assert torch.allclose(pruned.probs[rows], expect[:, D], atol=1e-6)
    assert torch.allclose(pruned.outside[rows], 1 - expect[:, D].sum(-1), atol=1e-6)


def _loss(setup, draft_vocab, logits, conf, conf_label="soft"):
    hidden, W, anchors, valid, labels = setup
    pos, rows = L.block_positions(anchors, valid, T)
    dist = L.target_distribution(hidden, W, pos, draft_vocab, greedy=conf_label == "greedy")
    draft_labels = labels
    if draft_vocab is not None:
        t2d = torch.full((V,), -1, dtype=torch.long)
        t2d[draft_vocab] = torch.arange(len(draft_vocab))
        draft_labels = t2d[labels]
    return L.dspark_loss(logits, conf, dist, rows, draft_labels, valid, L.position_weights(G, 4.0), 0.1, 0.9, 1.0,
                         conf_label)


def test_pruned_l1_equals_full_l1_with_zero_outside(setup):
    hidden, W, anchors, valid, labels = setup
    D = torch.tensor([0, 2, 3, 4, 7, 9, 11, 15, 18])
    logits = torch.randn(B, A, G, len(D))
    conf = torch.randn(B, A, G)
    out = _loss(setup, D, logits, conf)
    # reference: draft distribution scattered into the full vocabulary (zero outside D)
    p_d = torch.zeros(B, A, G, V)
    p_d[..., D] = F.softmax(logits, -1)
    p_t = F.softmax(hidden @ W.T, -1)
    w = L.position_weights(G, 4.0)
    num_l1 = num_ce = num_bce = ce_w = 0.0
    acc = torch.zeros(G)
    for b, a, k in torch.nonzero(valid).tolist():
        pt = p_t[b, anchors[b, a] + k]
        l1 = (p_d[b, a, k] - pt).abs().sum()
        num_l1 += w[k] * l1
        c = 1 - 0.5 * l1
        acc[k] += c
        num_bce += w[k] * F.binary_cross_entropy_with_logits(conf[b, a, k], c)
        lbl = int(labels[b, a, k])
        if lbl in D.tolist():
            num_ce += -w[k] * torch.log(p_d[b, a, k, lbl])
            ce_w += w[k]
    wsum = sum(w[k] for _, _, k in torch.nonzero(valid).tolist())
    s = L.summarise(out.sums)
    assert s["l1"] == pytest.approx(float(num_l1 / wsum), rel=1e-5)
    assert s["conf_bce"] == pytest.approx(float(num_bce / wsum), rel=1e-5)
    assert s["ce"] == pytest.approx(float(num_ce / ce_w), rel=1e-5)
    denom = B * A * float(w.sum())
    assert float(out.loss) == pytest.approx(float((0.1 * num_ce + 0.9 * num_l1 + num_bce) / denom), rel=1e-5)
    counts = valid.sum((0, 1)).float()
    assert s["acc"] == pytest.approx((acc / counts).tolist(), rel=1e-5)


def test_loss_is_additive_over_row_splits(setup):
    """Two halves averaged (what 2 ranks or 2 micro-batches do) equal the whole batch."""
    hidden, W, anchors, valid, labels = setup
    logits = torch.randn(B, A, G, V)
    conf = torch.randn(B, A, G)
    whole = _loss(setup, None, logits, conf).loss
    hidden = torch.cat([hidden, hidden[:1]])  # 4 rows so halves are equal
    anchors, valid, labels = (torch.cat([x, x[:1]]) for x in (anchors, valid, labels))
    logits, conf = torch.cat([logits, logits[:1]]), torch.cat([conf, conf[:1]])
    whole4 = _loss((hidden, W, anchors, valid, labels), None, logits, conf).loss
    halves = [_loss((hidden[s], W, anchors[s], valid[s], labels[s]), None, logits[s], conf[s]).loss
              for s in (slice(0, 2), slice(2, 4))]
    assert float(whole4) == pytest.approx(float(sum(halves) / 2), rel=1e-6)
    assert float(whole) != pytest.approx(float(whole4))


def test_gradients_and_soft_label(setup):
    logits = torch.randn(B, A, G, V, requires_grad=True)
    conf = torch.randn(B, A, G, requires_grad=True)
    out = _loss(setup, None, logits, conf)
    out.loss.backward()
    _, _, _, valid, _ = setup
    assert logits.grad[~valid].abs().sum() == 0 and logits.grad[valid].abs().sum() > 0
    assert conf.grad[~valid].abs().sum() == 0
    # a perfect draft: L1 = 0, acceptance 1, τ = 1 + γ
    hidden, W, anchors, valid, labels = setup
    full = (hidden @ W.T)
    perfect = torch.zeros(B, A, G, V)
    for b, a, k in torch.nonzero(valid).tolist():
        perfect[b, a, k] = full[b, anchors[b, a] + k]
    s = L.summarise(_loss(setup, None, perfect, conf.detach()).sums)
    assert s["l1"] < 1e-5 and s["tau"] == pytest.approx(1 + G, abs=1e-4)


def test_summarise_tau():
    sums = torch.tensor([0, 1, 0, 0, 1, 0] + [0.8, 1.0, 0.25] + [1, 2, 1] + [0] * 6, dtype=torch.float)
    s = L.summarise(sums)
    assert s["acc"] == pytest.approx([0.8, 0.5, 0.25])
    assert s["tau"] == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert "tau_greedy" not in s  # training steps carry no target argmax
    greedy = torch.tensor([0, 1, 0, 0, 1, 0] + [0.8, 1.0, 0.25] + [1, 2, 1] + [1, 1, 0] + [1, 2, 1.0])
    s = L.summarise(greedy)
    assert s["survival_greedy"] == pytest.approx([1.0, 0.5, 0.0]) and s["tau_greedy"] == pytest.approx(2.5)


# --------------------------------------------------------------------------- cold-start losses
def _kl_inputs(pruned: bool):
    """Random float64 rows: draft log-probs over Vd = 5 tokens; p_t on those 5, with mass outside when pruned."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    full = torch.softmax(torch.randn(4, 7 if pruned else 5, generator=g, dtype=torch.float64), -1)
    pt = full[:, :5]
    return logits, pt, 1 - pt.sum(-1)


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("kind", ["kl", "l1", "kl_to_l1"])
def test_distribution_terms_pass_gradcheck(kind, pruned):
    logits, pt, outside = _kl_inputs(pruned)
    alpha = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)  # a per-row constant, as the trainer passes it

    def f(z):
        return L.divergence(F.log_softmax(z, -1), pt, outside, kind, alpha)
    assert torch.autograd.gradcheck(f, (logits,))


def test_forward_kl_hand_computed():
    """Full vocabulary: KL([.6,.4] ‖ [.5,.5]) = .6 ln 1.2 + .4 ln .8. Pruned (D = 2 tokens, target mass .2
    outside): p_t|D = [.6, .2], m = .8, p̃_t = [.75, .25]; m·KL(p̃_t ‖ [.5,.5]) = .8·(.75 ln 1.5 + .25 ln .5)."""
    logp_d = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    full = L.forward_kl(logp_d, torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    assert float(full) == pytest.approx(0.6 * math.log(1.2) + 0.4 * math.log(0.8), abs=1e-12)  # 0.0201
    pt, out = torch.tensor([[0.6, 0.2]], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    kl = float(L.forward_kl(logp_d, pt))
    assert kl == pytest.approx(0.8 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), abs=1e-12)  # 0.10465
    assert float(L.l1_distance(logp_d, pt, out)) == pytest.approx(0.1 + 0.3 + 0.2)
    # the blend at this slot's acceptance α = 1 − ½·0.6 = 0.7: 0.3·KL + 0.7·L1
    assert float(L.divergence(logp_d, pt, out, "kl_to_l1", torch.tensor(0.7))) == pytest.approx(0.3 * kl + 0.7 * 0.6)
    # zero exactly at the conditioned target, positive elsewhere
    assert float(L.forward_kl(torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64)), pt)) == pytest.approx(
        0, abs=1e-12)


def test_kl_loss_in_the_full_objective(setup):
    """loss="kl" / "kl_to_l1" replace L1 in the objective by the direct per-slot computation (pruned vocabulary),
    the blend's α being each slot's acceptance 1 − ½·L1; CE, BCE and the logged L1 do not change."""
    hidden, W, anchors, valid, labels = setup
    D = torch.tensor([0, 2, 3, 4, 7, 9, 11, 15, 18])
    logits = torch.randn(B, A, G, len(D))
    conf = torch.randn(B, A, G)
    p_t = F.softmax(hidden @ W.T, -1)
    w = L.position_weights(G, 4.0)
    kl_num = blend_num = wsum = 0.0
    for b, a, k in torch.nonzero(valid).tolist():
        pt, pd = p_t[b, anchors[b, a] + k], F.softmax(logits[b, a, k], -1)
        m = pt[D].sum()
        kl = (pt[D] * torch.log(pt[D] / (m * pd))).sum()
        l1 = (pd - pt[D]).abs().sum() + 1 - m
        kl_num += w[k] * kl
        blend_num += w[k] * ((0.5 * l1) * kl + (1 - 0.5 * l1) * l1)
        wsum += w[k]
    runs = {kind: _loss_kind(setup, D, logits, conf, kind) for kind in ("l1", "kl", "kl_to_l1")}
    stats = {kind: L.summarise(out.sums) for kind, out in runs.items()}
    assert stats["kl"]["div"] == pytest.approx(float(kl_num / wsum), rel=1e-5)
    assert stats["kl_to_l1"]["div"] == pytest.approx(float(blend_num / wsum), rel=1e-5)
    assert stats["l1"]["div"] == pytest.approx(stats["l1"]["l1"])
    for kind in ("kl", "kl_to_l1"):
        assert (stats[kind]["l1"], stats[kind]["ce"], stats[kind]["conf_bce"]) == pytest.approx(
            (stats["l1"]["l1"], stats["l1"]["ce"], stats["l1"]["conf_bce"]))
        diff = float(runs[kind].loss - runs["l1"].loss) * B * A * float(w.sum())
        assert diff == pytest.approx(0.9 * (stats[kind]["div"] - stats["l1"]["l1"]) * float(wsum), rel=1e-4)
    scheduled = L.summarise(_loss_kind(setup, D, logits, conf, "kl_to_l1", blend=0.25).sums)
    assert scheduled["div"] == pytest.approx(0.75 * stats["kl"]["div"] + 0.25 * stats["l1"]["l1"], rel=1e-5)


def _loss_kind(setup, D, logits, conf, kind, blend=None):
    hidden, W, anchors, valid, labels = setup
    pos, rows = L.block_positions(anchors, valid, T)
    dist = L.target_distribution(hidden, W, pos, D)
    t2d = torch.full((V,), -1, dtype=torch.long)
    t2d[D] = torch.arange(len(D))
    return L.dspark_loss(logits, conf, dist, rows, t2d[labels], valid, L.position_weights(G, 4.0), 0.1, 0.9, 1.0,
                         loss=kind, blend=blend)


def test_greedy_tau_is_block_survival_of_argmax_agreement(setup):
    """τ_greedy = 1 + Σ_k P(slots 1..k all have draft argmax = target argmax), over blocks whose slot k is valid."""
    hidden, W, anchors, valid, labels = setup
    logits = torch.randn(B, A, G, V)
    full = (hidden @ W.T)
    for b, a, k in torch.nonzero(valid).tolist()[::2]:  # make every other valid slot agree with the target
        logits[b, a, k] = full[b, anchors[b, a] + k]
    pos, rows = L.block_positions(anchors, valid, T)
    dist = L.target_distribution(hidden, W, pos, None, greedy=True)
    s = L.summarise(L.dspark_loss(logits, torch.zeros(B, A, G), dist, rows, labels, valid,
                                  L.position_weights(G, 4.0), 0.1, 0.9, 1.0).sums)
    surv, cnt = torch.zeros(G), torch.zeros(G)
    for b in range(B):
        for a in range(A):
            alive = True
            for k in range(G):
                if not valid[b, a, k]:
                    break
                alive = alive and int(logits[b, a, k].argmax()) == int(full[b, anchors[b, a] + k].argmax())
                surv[k] += alive
                cnt[k] += 1
    expect = (surv / cnt).tolist()
    assert s["survival_greedy"] == pytest.approx(expect) and 0 < expect[0] < 1
    assert s["tau_greedy"] == pytest.approx(1 + sum(expect))


def test_greedy_confidence_label_is_argmax_agreement(setup):
    """conf_label="greedy": BCE against 1[argmax p_d = argmax p_t]; a target argmax outside the pruned draft
    vocabulary can never be drafted, so its label is 0. CE and L1 do not change."""
    hidden, W, anchors, valid, labels = setup
    D = torch.tensor([0, 2, 3, 4, 7, 9, 11, 15, 18])
    logits = torch.randn(B, A, G, len(D))
    conf = torch.randn(B, A, G)
    full = hidden @ W.T
    pos, rows = L.block_positions(anchors, valid, T)
    dist = L.target_distribution(hidden, W, pos, D, greedy=True)
    top = full.argmax(-1)
    expect = [int((D == top[b, anchors[b, a] + k]).nonzero()[0]) if top[b, anchors[b, a] + k] in D else -1
              for b, a, k in torch.nonzero(valid).tolist()]
    assert dist.greedy[rows].tolist() == expect and -1 in expect and max(expect) >= 0
    w = L.position_weights(G, 4.0)
    num = wsum = 0.0
    for i, (b, a, k) in enumerate(torch.nonzero(valid).tolist()):
        y = float(int(logits[b, a, k].argmax()) == expect[i])
        num += w[k] * F.binary_cross_entropy_with_logits(conf[b, a, k], torch.tensor(y))
        wsum += w[k]
    soft, greedy = (L.summarise(_loss(setup, D, logits, conf, lbl).sums) for lbl in ("soft", "greedy"))
    assert greedy["conf_bce"] == pytest.approx(float(num / wsum), rel=1e-5) != soft["conf_bce"]
    assert (greedy["l1"], greedy["ce"]) == (soft["l1"], soft["ce"])
    assert (L.target_distribution(hidden, W, pos, None, greedy=True).greedy == top.flatten()[pos]).all()
