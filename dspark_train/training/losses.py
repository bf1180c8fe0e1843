"""The DSpark training loss: 0.1·CE + 0.9·D(p_d, p_t) + 1.0·BCE(c, c*), each weighted by exp(−(k−1)/λ).

D is the paper's L1 distance ‖p_d − p_t‖₁ by default (`loss="l1"`). L1 (total variation) saturates at 2 while the
drafter is far from the target, so its gradients are weak at a cold start; `loss="kl"` uses the forward KL
(p_t ‖ p_d) instead, and `loss="kl_to_l1"` blends them, (1 − α)·KL + α·L1, with α the slot's current acceptance
estimate Σ min(p_d, p_t) (detached; KL while the draft is far off, L1, the quantity acceptance follows, once it is
close) or a schedule α = min(1, progress / blend_end) passed in by the trainer.

c* is the sampling acceptance rate Σ min(p_d, p_t) = 1 − ½‖p_d − p_t‖₁ (the paper's label), or, with
`conf_label="greedy"`, whether the draft's argmax is the target's argmax: the acceptance event of greedy
decoding itself, for drafters served greedily.

p_t comes from the frozen LM head applied only at the positions a block needs, never to the whole sequence.
With a pruned draft vocabulary D the distances are still against the *full* target distribution, with
m = Σ_{v∈D} p_t(v) the target mass the drafter can reach:
- L1: ‖p_d − p_t‖₁ = Σ_{v∈D} |p_d(v) − p_t(v)| + (1 − m), since p_d is zero outside D.
- KL: the literal KL(p_t ‖ p_d) is infinite whenever m < 1 (p_d is zero where p_t is not), and that part does
  not depend on the drafter. We use the KL over the outcomes the drafter can represent, weighted by how often
  they occur: m · KL(p̃_t ‖ p_d) with p̃_t = p_t|_D / m the target conditioned on D, i.e.
  Σ_{v∈D} p_t(v) · log(p_t(v) / (m · p_d(v))). It is ≥ 0, zero exactly at p_d = p̃_t (which also minimises the
  L1 above and has the target's argmax whenever that is in D), equals the plain forward KL without pruning, and
  a position whose target mass lies mostly outside D (m → 0) pulls on the drafter only weakly.
All softmaxes in fp32.

Held-out statistics (`summarise`): the soft acceptance estimate per slot, τ_sim = 1 + Σ_k Π_{i≤k} acc_i, and a
greedy one: slot k's event is "the drafter's argmax (fed the data's previous tokens) equals the target's argmax",
a block survives through k while all its events 1..k hold, and τ_greedy = 1 + Σ_k P(survive through k) over the
blocks whose slot k is supervised. The dev-set τ we report is greedy decoding, so τ_greedy is the one to compare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def position_weights(gamma: int, decay: float) -> torch.Tensor:
    """w_k = exp(−(k−1)/λ) for block slots k = 1..γ."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float32) / decay)


@dataclass
class TargetDist:
    """p_t at block slots: probabilities on the draft vocabulary and the mass outside it."""
    probs: torch.Tensor  # [N, Vd] fp32
    outside: torch.Tensor  # [N] fp32, 1 − Σ_D p_t (zero without pruning)
    greedy: Optional[torch.Tensor] = None  # [N] long, target argmax in draft-vocabulary ids (−1: outside); on request


@torch.no_grad()
def target_distribution(last_hidden: torch.Tensor, lm_head_weight: torch.Tensor, positions: torch.Tensor,
                        draft_vocab: Optional[torch.Tensor], chunk: int = 1024, greedy: bool = False) -> TargetDist:
    """softmax(lm_head(last_hidden)) at the given flat positions only (gather first), in row chunks.

    The matmul runs in the head's dtype, as the target's own verification does; the softmax in fp32."""
    hidden = last_hidden.reshape(-1, last_hidden.shape[-1])[positions]
    probs, outside, tops = [], [], []
    for h in hidden.split(chunk):
        logits = (h.to(lm_head_weight.dtype) @ lm_head_weight.T).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = ((logits if draft_vocab is None else logits[:, draft_vocab]) - lse).exp()
        probs.append(p)
        outside.append((1.0 - p.sum(-1)).clamp_min(0.0) if draft_vocab is not None
                       else torch.zeros(len(p), device=p.device))
        if greedy:  # only for conf_label="greedy": a [N, |D|] comparison per chunk otherwise wasted
            top = logits.argmax(-1)
            if draft_vocab is not None:
                hit = draft_vocab[None, :] == top[:, None]
                top = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(top, -1))
            tops.append(top)
    if not probs:
        V = lm_head_weight.shape[0] if draft_vocab is None else len(draft_vocab)
        return TargetDist(hidden.new_zeros((0, V), dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32),
                          hidden.new_zeros(0, dtype=torch.long) if greedy else None)
    return TargetDist(torch.cat(probs), torch.cat(outside), torch.cat(tops) if greedy else None)


def block_positions(anchor_pos: torch.Tensor, valid: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions (b·T + p + k) of the hidden states whose p_t supervises valid slots, deduplicated
    (overlapping blocks share positions), and for each valid slot its row in that list."""
    B, A, G = valid.shape
    pos = anchor_pos.unsqueeze(-1) + torch.arange(G, device=anchor_pos.device)  # slot k ← last_hidden[p+k]
    flat = (torch.arange(B, device=pos.device).view(B, 1, 1) * seq_len + pos)[valid]
    unique, rows = torch.unique(flat, return_inverse=True)
    return unique, rows


LOSSES = ("l1", "kl", "kl_to_l1")


def l1_distance(logp_d: torch.Tensor, pt: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """‖p_d − p_t‖₁ per row over the full vocabulary: the draft-vocabulary part plus the mass outside it."""
    return (logp_d.exp() - pt).abs().sum(-1) + outside


def forward_kl(logp_d: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """m·KL(p̃_t ‖ p_d) per row, p̃_t = p_t|_D / m (see the module docstring): Σ_D p_t·(log p_t − log m − log p_d)."""
    m = pt.sum(-1)
    return torch.xlogy(pt, pt).sum(-1) - torch.xlogy(m, m) - (pt * logp_d).sum(-1)


def divergence(logp_d: torch.Tensor, pt: torch.Tensor, outside: torch.Tensor, kind: str,
               alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distribution term per row: "l1", "kl", or "kl_to_l1" = (1 − α)·KL + α·L1 (α a scalar or per row,
    treated as a constant)."""
    if kind == "l1":
        return l1_distance(logp_d, pt, outside)
    if kind == "kl":
        return forward_kl(logp_d, pt)
    if kind == "kl_to_l1":
        return (1 - alpha) * forward_kl(logp_d, pt) + alpha * l1_distance(logp_d, pt, outside)
    raise ValueError(f"unknown loss {kind!r} (use one of {', '.join(LOSSES)})")


def greedy_survival(hit: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B,A,γ] survival of greedy drafting from per-slot argmax agreement `hit` [N] at the valid slots:
    Π_{i≤k} hit_i (zero at slots that are not valid)."""
    h = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    h[valid] = hit.float()
    return h.cumprod(-1) * valid


@dataclass
class LossOutput:
    loss: torch.Tensor  # the objective (scalar); normalised by a constant, see `dspark_loss`
    sums: torch.Tensor  # [6 + 4γ] summable statistics for logging: see `summarise`


def dspark_loss(logits: torch.Tensor, conf_logits: torch.Tensor, p_t: TargetDist, rows: torch.Tensor,
                draft_labels: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor,
                ce_weight: float, l1_weight: float, conf_weight: float, conf_label: str = "soft",
                loss: str = "l1", blend: Optional[float] = None) -> LossOutput:
    """Loss over the valid slots of a batch of blocks.

    logits [B,A,γ,Vd] and conf_logits [B,A,γ] from the drafter; p_t rows for the valid slots (in the order of
    `valid.nonzero()`, `rows` maps each to its p_t row); draft_labels [B,A,γ] label ids in draft-vocabulary
    space (−1 = outside the draft vocabulary): CE is skipped where the label is not draftable, D and BCE are not.
    `l1_weight` weights the distribution term D of kind `loss`; for "kl_to_l1", α = `blend` when given (a
    schedule), else each slot's acceptance estimate c*.

    The objective is Σ w_k·term / (B·A·Σ_k w_k): a constant denominator, so averaging over ranks and
    micro-batches gives exactly the loss of one big batch (2 processes × 2 rows ≡ 1 process × 4 rows).
    When p_t carries the target's argmax (`target_distribution(..., greedy=True)`), the sums also hold the
    greedy survival statistics τ_greedy is computed from."""
    B, A, G = valid.shape
    w = weights.to(logits.device)[None, None, :].expand(B, A, G)[valid]  # [N]
    logp_d = F.log_softmax(logits[valid].float(), dim=-1)  # [N, Vd]
    pt, outside = p_t.probs[rows], p_t.outside[rows]
    l1 = l1_distance(logp_d, pt, outside)  # [N], in [0, 2]
    c_star = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
    div = l1 if loss == "l1" else divergence(logp_d, pt, outside, loss, c_star if blend is None else blend)
    draft_lbl = draft_labels[valid]
    has_lbl = draft_lbl >= 0
    ce = -logp_d.gather(1, draft_lbl.clamp_min(0)[:, None])[:, 0] * has_lbl
    hit = None if p_t.greedy is None else (logp_d.argmax(-1) == p_t.greedy[rows])
    label = c_star if conf_label == "soft" else hit.float()
    bce = F.binary_cross_entropy_with_logits(conf_logits[valid].float(), label, reduction="none")
    denom = B * A * float(weights.sum())
    objective = (ce_weight * (w * ce).sum() + l1_weight * (w * div).sum() + conf_weight * (w * bce).sum()) / denom
    k = torch.nonzero(valid)[:, 2]
    zeros = torch.zeros(G, device=logits.device)
    acc_sum = zeros.index_add(0, k, c_star)
    count = zeros.index_add(0, k, torch.ones_like(c_star))
    if hit is None:
        surv_sum = surv_cnt = zeros
    else:
        surv_sum, surv_cnt = greedy_survival(hit, valid).sum((0, 1)), count
    sums = torch.cat([torch.stack([(w * ce).sum(), (w * has_lbl).sum(), (w * l1).sum(), (w * bce).sum(), w.sum(),
                                   (w * div).sum()]), acc_sum, count, surv_sum, surv_cnt]).detach()
    return LossOutput(objective, sums)


def summarise(sums: torch.Tensor) -> dict:
    """Means from (rank-summed) `LossOutput.sums`: weighted CE / L1 / BCE / distribution term, per-position
    acceptance estimate acc_k = mean(1 − ½‖p_d − p_t‖₁), the simulated τ = 1 + Σ_k Π_{i≤k} acc_i, and, when the
    sums carry them, greedy survival P(survive through k) and τ_greedy = 1 + Σ_k P(survive through k)."""
    s = sums.double().cpu()
    G = (len(s) - 6) // 4
    acc_sum, count, surv_sum, surv_cnt = s[6:].view(4, G)
    acc = (acc_sum / count.clamp_min(1)).tolist()
    tau, surv = 1.0, 1.0
    for a in acc:
        surv *= a
        tau += surv
    out = {"ce": float(s[0] / s[1].clamp_min(1e-9)), "l1": float(s[2] / s[4].clamp_min(1e-9)),
           "conf_bce": float(s[3] / s[4].clamp_min(1e-9)), "div": float(s[5] / s[4].clamp_min(1e-9)),
           "acc": acc, "tau": tau}
    if surv_cnt.sum() > 0:
        survival = (surv_sum / surv_cnt.clamp_min(1)).tolist()
        out |= {"survival_greedy": survival, "tau_greedy": 1.0 + sum(survival)}
    return out
