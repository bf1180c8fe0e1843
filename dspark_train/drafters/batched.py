"""Batched drafting over requests with ragged contexts: one drafter pass per round whatever the number of requests.

`Drafter.propose` / `extend_context` keep rows in lockstep (one `DraftState.length` for the batch), which suits the
batch-1 decoder. Requests decoded together commit different numbers of tokens each round, so here every row keeps
its own length: row r's context K/V sit left-aligned at slots 0..len_r−1 of one cache, and the block's γ scratch
slots follow the longest row (slots Lmax..Lmax+γ−1), shared by all rows; a boolean mask lets row r see its own
context and its block only, and each row's block gets its own RoPE positions len_r.. . The arithmetic is the
batch-1 path's (same layers, same projections), so a row's block equals what `propose` gives for it alone, up to
the rounding of batched matmuls. DSpark/DFlash backbones and Medusa heads batch; a kind without this path
(`supports_ragged` false) is drafted per request by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .model import DraftBlock


@dataclass
class RaggedDraftState:
    """Inference cache of R requests with their own lengths (see the module docstring)."""

    lengths: list[int] = field(default_factory=list)  # committed positions of each row = its next anchor's position
    kv: Optional[torch.Tensor] = None  # [layers, 2, R, Hkv, capacity, head_dim]
    last_hidden: Optional[torch.Tensor] = None  # medusa: [R, d] at each row's last committed position

    @property
    def batch_size(self) -> int:
        return len(self.lengths)


def supports_ragged(drafter) -> bool:
    """Whether this drafter kind has the batched path (the others draft one request at a time)."""
    return drafter.config.kind in ("dspark", "medusa")


def init_ragged(drafter, batch_size: int) -> RaggedDraftState:
    if not supports_ragged(drafter):
        raise NotImplementedError(f"batched drafting is not implemented for drafter kind {drafter.config.kind!r}")
    return RaggedDraftState([0] * batch_size)


def _reserve(drafter, state: RaggedDraftState, need: int) -> None:
    cap = 0 if state.kv is None else state.kv.shape[4]
    if need <= cap:
        return
    c, w = drafter.config, drafter.conf.weight
    # zeros, not empty: a masked slot's weight is 0, but 0 × NaN (uninitialised memory) would still be NaN
    kv = torch.zeros(c.num_layers, 2, state.batch_size, c.num_key_value_heads, max(need, 2 * cap, 256), c.head_dim,
                     dtype=w.dtype, device=w.device)
    if state.kv is not None:
        kv[..., :cap, :] = state.kv
    state.kv = kv


@torch.no_grad()
def extend_ragged(drafter, state: RaggedDraftState, features: torch.Tensor, last_hidden: torch.Tensor,
                  counts: list[int]) -> RaggedDraftState:
    """Append row r's first counts[r] positions of features [R, n, m·d] / last_hidden [R, n, d] (the rest of
    each row is padding) to its own context: projected, K/V cached at slots len_r.. (RoPE positions alike)."""
    R, n = last_hidden.shape[:2]
    if R != state.batch_size or len(counts) != R:
        raise ValueError(f"extend_ragged: {R} rows of features and {len(counts)} counts for {state.batch_size} rows")
    dev = last_hidden.device
    if drafter.config.kind == "medusa":
        idx = torch.tensor([max(c, 1) - 1 for c in counts], device=dev)
        new = last_hidden[torch.arange(R, device=dev), idx]
        keep = torch.tensor([c > 0 for c in counts], device=dev)[:, None]
        state.last_hidden = new if state.last_hidden is None else torch.where(keep, new, state.last_hidden)
        state.lengths = [ln + c for ln, c in zip(state.lengths, counts)]
        return state
    start = torch.tensor(state.lengths, device=dev)
    _reserve(drafter, state, max(state.lengths) + n + drafter.num_slots)
    pos = start[:, None] + torch.arange(n, device=dev)[None]  # [R, n]
    cos, sin = drafter._rope_table(int(pos.max()) + 1, dev)
    cos, sin = cos[pos][:, None], sin[pos][:, None]  # [R, 1, n, hd]: each row its own positions
    ctx = drafter.ctx_norm(drafter.fc(features.to(drafter.conf.weight.dtype)))
    rows = torch.tensor([r for r, c in enumerate(counts) for _ in range(c)], dtype=torch.long, device=dev)
    cols = torch.tensor([j for c in counts for j in range(c)], dtype=torch.long, device=dev)
    slots = start[rows] + cols
    for i, layer in enumerate(drafter.layers):
        k, v = layer.attn.kv(ctx, cos, sin)  # [R, Hkv, n, hd]
        state.kv[i, 0, rows, :, slots] = k[rows, :, cols]
        state.kv[i, 1, rows, :, slots] = v[rows, :, cols]
    state.lengths = [ln + c for ln, c in zip(state.lengths, counts)]
    return state


@torch.no_grad()
def propose_ragged(drafter, state: RaggedDraftState, anchor_ids: torch.Tensor) -> DraftBlock:
    """One backbone pass for every row's block [anchor_r, MASK…] at position len_r: `propose` for R requests."""
    R = state.batch_size
    if anchor_ids.shape[0] != R:
        raise ValueError(f"propose_ragged: {anchor_ids.shape[0]} anchors for {R} rows")
    if drafter.config.kind == "medusa":
        if state.last_hidden is None:
            raise ValueError("medusa drafting needs at least one committed position (extend_ragged first)")
        h = state.last_hidden.to(drafter.conf.weight.dtype)
        return drafter._block(torch.stack([h + torch.nn.functional.silu(m(h)) for m in drafter.medusa], 1))
    g = drafter.num_slots
    dev = anchor_ids.device
    L = max(state.lengths)
    _reserve(drafter, state, L + g)
    kv = state.kv
    lengths = torch.tensor(state.lengths, device=dev)
    x = torch.cat((drafter._embed(anchor_ids[:, None]), drafter._mask_vec().expand(R, g - 1, -1)), 1)
    pos = lengths[:, None] + torch.arange(g, device=dev)[None]  # [R, g]
    cos, sin = drafter._rope_table(int(pos.max()) + 1, dev)
    cos, sin = cos[pos][:, None], sin[pos][:, None]
    slot = torch.arange(L + g, device=dev)
    mask = ((slot[None] < lengths[:, None]) | (slot[None] >= L))[:, None, None, :].expand(R, 1, g, L + g)
    for i, layer in enumerate(drafter.layers):
        def join(kb, vb, i=i):  # the blocks' K/V go to the shared scratch slots after the longest context
            kv[i, 0, :, :, L:L + g] = kb
            kv[i, 1, :, :, L:L + g] = vb
            return kv[i, 0, :, :, :L + g], kv[i, 1, :, :, :L + g]
        x = layer(x, join, cos, sin, mask)
    return drafter._block(drafter.norm(x)[:, g - drafter.config.block_size:])


def select_ragged(state: RaggedDraftState, rows: list[int]) -> RaggedDraftState:
    """Keep only these rows (requests that go on), in this order."""
    state.lengths = [state.lengths[r] for r in rows]
    if state.kv is not None:
        state.kv = state.kv[:, :, torch.tensor(rows, dtype=torch.long, device=state.kv.device)]
    if state.last_hidden is not None:
        state.last_hidden = state.last_hidden[torch.tensor(rows, dtype=torch.long, device=state.last_hidden.device)]
    return state
