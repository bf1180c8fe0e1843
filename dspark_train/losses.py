"""The DSpark training loss: 0.1·CE + 0.9·L1(p_d, p_t) + 1.0·BCE(c, c*), each weighted by exp(−(k−1)/λ).

c* is the sampling acceptance rate Σ min(p_d, p_t) = 1 − ½‖p_d − p_t‖₁ (the paper's label), or, with
`conf_label="greedy"`, whether the draft's argmax is the target's argmax: the acceptance event of greedy
decoding itself, for drafters served greedily.

p_t comes from the frozen LM head applied only at the positions a block needs, never to the whole sequence.
With a pruned draft vocabulary D the L1 distance is still against the *full* target distribution:
‖p_d − p_t‖₁ = Σ_{v∈D} |p_d(v) − p_t(v)| + (1 − Σ_{v∈D} p_t(v)), since p_d is zero outside D.
All softmaxes in fp32.
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
        logp = F.log_softmax((h.to(lm_head_weight.dtype) @ lm_head_weight.T).float(), dim=-1)
        p = (logp if draft_vocab is None else logp[:, draft_vocab]).exp()
        probs.append(p)
        outside.append((1.0 - p.sum(-1)).clamp_min(0.0) if draft_vocab is not None
                       else torch.zeros(len(p), device=p.device))
        if greedy:  # only for conf_label="greedy": a [N, |D|] comparison per chunk otherwise wasted
            top = logp.argmax(-1)
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


@dataclass
class LossOutput:
    loss: torch.Tensor  # the objective (scalar); normalised by a constant, see `dspark_loss`
    sums: torch.Tensor  # [5 + 2γ] summable statistics for logging: see `summarise`


def dspark_loss(logits: torch.Tensor, conf_logits: torch.Tensor, p_t: TargetDist, rows: torch.Tensor,
                draft_labels: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor,
                ce_weight: float, l1_weight: float, conf_weight: float, conf_label: str = "soft") -> LossOutput:
    """Loss over the valid slots of a batch of blocks.

    logits [B,A,γ,Vd] and conf_logits [B,A,γ] from the drafter; p_t rows for the valid slots (in the order of
    `valid.nonzero()`, `rows` maps each to its p_t row); draft_labels [B,A,γ] label ids in draft-vocabulary
    space (−1 = outside the draft vocabulary): CE is skipped where the label is not draftable, L1 and BCE are not.

    The objective is Σ w_k·term / (B·A·Σ_k w_k): a constant denominator, so averaging over ranks and
    micro-batches gives exactly the loss of one big batch (2 processes × 2 rows ≡ 1 process × 4 rows)."""
    B, A, G = valid.shape
    w = weights.to(logits.device)[None, None, :].expand(B, A, G)[valid]  # [N]
    logp_d = F.log_softmax(logits[valid].float(), dim=-1)  # [N, Vd]
    pt = p_t.probs[rows]
    l1 = (logp_d.exp() - pt).abs().sum(-1) + p_t.outside[rows]  # [N], in [0, 2]
    draft_lbl = draft_labels[valid]
    has_lbl = draft_lbl >= 0
    ce = -logp_d.gather(1, draft_lbl.clamp_min(0)[:, None])[:, 0] * has_lbl
    c_star = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
    label = c_star if conf_label == "soft" else (logp_d.argmax(-1) == p_t.greedy[rows]).float()
    bce = F.binary_cross_entropy_with_logits(conf_logits[valid].float(), label, reduction="none")
    denom = B * A * float(weights.sum())
    loss = (ce_weight * (w * ce).sum() + l1_weight * (w * l1).sum() + conf_weight * (w * bce).sum()) / denom
    k = torch.nonzero(valid)[:, 2]
    acc_sum = torch.zeros(G, device=logits.device).index_add_(0, k, c_star)
    acc_cnt = torch.zeros(G, device=logits.device).index_add_(0, k, torch.ones_like(c_star))
    sums = torch.cat([torch.stack([(w * ce).sum(), (w * has_lbl).sum(), (w * l1).sum(), (w * bce).sum(), w.sum()]),
                      acc_sum, acc_cnt]).detach()
    return LossOutput(loss, sums)


def summarise(sums: torch.Tensor) -> dict:
    """Means from (rank-summed) `LossOutput.sums`: weighted CE / L1 / BCE, per-position acceptance estimate
    acc_k = mean(1 − ½‖p_d − p_t‖₁) and the simulated τ = 1 + Σ_k Π_{i≤k} acc_i."""
    s = sums.double().cpu()
    G = (len(s) - 5) // 2
    acc = (s[5:5 + G] / s[5 + G:].clamp_min(1)).tolist()
    tau, surv = 1.0, 1.0
    for a in acc:
        surv *= a
        tau += surv
    return {"ce": float(s[0] / s[1].clamp_min(1e-9)), "l1": float(s[2] / s[4].clamp_min(1e-9)),
            "conf_bce": float(s[3] / s[4].clamp_min(1e-9)), "acc": acc, "tau": tau}
