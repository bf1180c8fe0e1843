"""KV-cache surgery on transformers' DynamicCache (5.x: `cache.layers[i].keys/values`, [B, H, L, D]).

After a verify pass the cache holds the committed context plus every verified node; only the accepted path
may stay. A chain's accepted path is a prefix of the new slots (a crop, free: a view); a tree's is not
(move the path's slots down, then crop). Sliding-window layers would need their own bookkeeping: refused.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


def _layers(cache):
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"KV compaction supports full-attention DynamicLayer only, got {type(layer)}")
        yield layer


def keep_slots(cache, ctx_len: int, slots: list[int]) -> None:
    """Keep cache[:ctx_len] and the new slots ctx_len + slots (ascending), dropping every other new slot."""
    n = len(slots)
    moved = slots != list(range(n))
    idx = None
    for layer in _layers(cache):
        if moved:
            if idx is None:
                idx = torch.tensor(slots, device=layer.keys.device) + ctx_len
            layer.keys[:, :, ctx_len:ctx_len + n] = layer.keys[:, :, idx]
            layer.values[:, :, ctx_len:ctx_len + n] = layer.values[:, :, idx]
        layer.keys = layer.keys[:, :, :ctx_len + n]
        layer.values = layer.values[:, :, :ctx_len + n]


def gather_slots(cache, index: torch.Tensor) -> None:
    """Batched compaction: row b keeps slots index[b] (shape [B, L']; padding entries point anywhere and are
    masked out by the caller)."""
    for layer in _layers(cache):
        b, h, _, d = layer.keys.shape
        ix = index[:, None, :, None].expand(b, h, index.shape[1], d)
        layer.keys = layer.keys.gather(2, ix)
        layer.values = layer.values.gather(2, ix)


def select_rows(cache, rows: torch.Tensor) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys[rows]
        layer.values = layer.values[rows]
