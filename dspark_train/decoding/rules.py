"""The target's generation_config rules: the one the decoder applies exactly, and the ones it cannot.

A model's generation_config may set logits processors that transformers' `generate` applies by default, e.g.
`repetition_penalty: 1.05` in Qwen2.5-Instruct. Lossless means equal to the target's own decoding, so the decoder
applies what it can reproduce bit for bit: the repetition penalty is a per-context transform of the fp32 logits
(each verified node's context is the committed tokens plus its own path), applied with transformers' own
arithmetic. Anything else (n-gram bans, minimum lengths, biases, extra samplers, beams) the decoder does not
implement, so plain decoding must run without it; `plain_overrides` is what turns them off, and
`generation_rules` says which were honoured and which turned off (the eval report prints both).
"""
from __future__ import annotations

from typing import Optional

import torch

# generation_config fields that change what plain `generate` emits, with the value that turns each off
NEUTRAL = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
           "bad_words_ids": None, "sequence_bias": None, "min_length": 0, "min_new_tokens": None,
           "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
           "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "remove_invalid_values": False,
           "renormalize_logits": False, "guidance_scale": None, "watermarking_config": None, "stop_strings": None,
           "num_beams": 1, "penalty_alpha": None, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
           "eta_cutoff": 0.0, "top_h": None, "cache_implementation": None}


def repetition_penalty(generation_config) -> float:
    """The penalty the target's generation_config sets (1.0: none)."""
    p = getattr(generation_config, "repetition_penalty", None)
    return 1.0 if p is None else float(p)


def generation_rules(generation_config) -> dict:
    """{"honoured": rules the decoder applies as plain decoding does, "disabled": rules plain decoding is run
    without because the decoder cannot reproduce them} for a target's generation_config."""
    p = repetition_penalty(generation_config)
    disabled = {}
    for k, off in NEUTRAL.items():
        v = getattr(generation_config, k, None)
        if v is not None and v != off:
            disabled[k] = v if isinstance(v, (bool, int, float, str, list)) else repr(v)
    return {"honoured": {"repetition_penalty": p} if p != 1.0 else {}, "disabled": disabled}


def plain_overrides(generation_config) -> dict:
    """`generate` keyword arguments that make plain decoding follow the decoder's rules: the repetition penalty
    as configured, every rule the decoder cannot reproduce off."""
    return {**NEUTRAL, "repetition_penalty": repetition_penalty(generation_config)}


class RepetitionPenalty:
    """transformers' repetition penalty (score < 0: × p, else ÷ p, on every id already in the context) for
    the decoder's rows: the first token's row and each verified node's row, whose context is the committed
    ids plus the node's own path. Same fp32 operations as RepetitionPenaltyLogitsProcessor, so the same bits."""

    def __init__(self, penalty: float, context: torch.Tensor, vocab_size: int):
        self.penalty = penalty
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=context.device)
        self.seen[context] = True

    def commit(self, ids: list[int]) -> None:
        self.seen[torch.tensor(ids, device=self.seen.device)] = True

    def apply(self, logits: torch.Tensor, tokens: Optional[list[int]] = None,
              parents: Optional[list[int]] = None) -> torch.Tensor:
        """Penalised rows: logits [V] (the committed context alone) or [N, V] for a tree's nodes (`tokens`,
        `parents` with node 0 the anchor, already committed)."""
        mask = self.seen
        if logits.dim() == 2:
            mask = mask.expand_as(logits).clone()
            rows, cols = [], []
            for i in range(1, len(tokens)):
                j = i
                while j > 0:
                    rows.append(i)
                    cols.append(tokens[j])
                    j = parents[j]
            if rows:
                mask[torch.tensor(rows, device=mask.device), torch.tensor(cols, device=mask.device)] = True
        p = self.penalty
        return torch.where(mask, torch.where(logits < 0, logits * p, logits / p), logits)
