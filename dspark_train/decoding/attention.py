"""Row-exact verification attention: make a multi-token verify pass round exactly like single-token steps.

In bf16 a verify pass over N tokens and N one-token decode steps differ in one place only: SDPA with N
queries and a mask reduces in another order than SDPA with one query and no mask (the linear layers, norms
and RoPE are row-independent on CPU; measured on SmolLM2: per-layer outputs are bitwise equal up to the
first attention that differs). This attention runs each verified row as its own one-query SDPA call over
exactly the keys that row may see (committed context + its tree ancestors + itself), with the arguments
transformers uses for a decode step, so greedy speculative output equals plain bf16 greedy bit for bit at
the price of N small attention calls per layer. Prefill and one-token steps go to the stock SDPA path.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "dspark_row_exact"


_rows_of: list = [None, None]  # (mask, per-row key indices): every layer of one forward shares the mask


def _rows(mask: torch.Tensor) -> list[list[tuple[int, torch.Tensor | None]]]:
    """Per batch row and query: (number of visible keys, their indices or None when they are 0..n-1)."""
    if _rows_of[0] is not mask:
        out = []
        for b in range(mask.shape[0]):
            row = []
            for i in range(mask.shape[2]):
                keys = mask[b, 0, i].nonzero().squeeze(-1)
                n = keys.numel()
                row.append((n, None if int(keys[-1]) + 1 == n else keys))
            out.append(row)
        _rows_of[:] = [mask, out]
    return _rows_of[1]


def row_exact_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    if query.shape[2] == 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    rows = _rows(attention_mask)
    out = []
    for b in range(query.shape[0]):
        kb, vb, per_query = key[b:b + 1], value[b:b + 1], rows[b if len(rows) > 1 else 0]
        outs = []
        for i, (n, keys) in enumerate(per_query):
            k = kb[:, :, :n] if keys is None else kb.index_select(2, keys)
            v = vb[:, :, :n] if keys is None else vb.index_select(2, keys)
            outs.append(sdpa_attention_forward(module, query[b:b + 1, :, i:i + 1], k, v, None, dropout, scaling,
                                               False)[0])
        out.append(torch.cat(outs, dim=1))
    return torch.cat(out, dim=0), None


def use_row_exact_attention(model) -> None:
    """Switch a transformers model to row-exact verification attention (masks are built as for SDPA)."""
    AttentionInterface.register(NAME, row_exact_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
