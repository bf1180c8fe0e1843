"""Loss terms against direct computations: p_t at block positions, pruned-vocabulary L1, CE, BCE, invariance."""
import math

import pytest
import torch
import torch.nn.functional as F

from dspark_train import losses as L

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
    sums = torch.tensor([0, 1, 0, 0, 1] + [0.8, 1.0, 0.25] + [1, 2, 1], dtype=torch.float)
    s = L.summarise(sums)
    assert s["acc"] == pytest.approx([0.8, 0.5, 0.25])
    assert s["tau"] == pytest.approx(1 + 0.8 + 0.4 + 0.1)


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
