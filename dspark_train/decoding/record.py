"""What a greedy pass leaves behind for the lossless check (evaluation/lossless.py) to compare bit for bit.

Both sides fill the same record: our decoder (generate(record=True)) and plain transformers `generate` (the
eval's recording logits processor). Per emitted token, the row of logits that chose it: its argmax and its two
highest values. Per cache slot, the keys and values of every layer over the committed context, as the last
forward left them: a stale slot, a slot kept from the wrong branch or a position id off by one changes them
bit for bit, where the outputs may not change at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PassRecord:
    """argmax[i] / top2[i]: the argmax and the two highest logits of the row that chose emitted token i (after
    any logits rule, such as a repetition penalty); kv[l] = (keys, values) [heads, slots, dim] of layer l."""

    argmax: torch.Tensor  # [T] long
    top2: torch.Tensor  # [T, 2] float32
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax [N], top-2 values [N, 2]) of logits rows [N, V] (argmax: the first maximum, as greedy takes it)."""
        logits = logits.float()
        return logits.argmax(-1).cpu(), logits.topk(2, dim=-1).values.cpu()

    @classmethod
    def build(cls, rows: list[tuple[torch.Tensor, torch.Tensor]], cache, slots: int, tokens: int) -> "PassRecord":
        """From per-forward row summaries (PassRecord.rows) and a transformers cache whose first `slots` slots
        hold the committed context (batch row 0); the first `tokens` emitted tokens are kept."""
        argmax = torch.cat([a for a, _ in rows])[:tokens]
        top2 = torch.cat([t for _, t in rows])[:tokens]
        kv = [(layer.keys[0, :, :slots], layer.values[0, :, :slots]) for layer in cache.layers]
        return cls(argmax, top2, kv)
