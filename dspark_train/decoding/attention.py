"""Row-exact verification attention: make a multi-token verify pass round exactly like single-token steps.

In bf16 a verify pass over N tokens and N one-token decode steps differ in one place only: SDPA with N
queries and a mask reduces in another order than SDPA with one query and no mask (the linear layers, norms
and RoPE are row-independent on CPU; measured on SmolLM2: per-layer outputs are bitwise equal up to the
first attention that differs). This attention runs each verified row as its own one-query SDPA call over
exactly the keys that row may see (committed context + its tree ancestors + itself), with the arguments
transformers uses for a decode step, so greedy speculative output equals plain bf16 greedy bit for bit at
the price of N small attention calls per layer. Prefill and one-token steps go to the stock SDPA path.

`use_row_exact_attention(model)` installs it once; `row_exact(model, layers)` marks the first `layers` decoder
layers for the span of a with-block (a decoder's generate), every other layer and every other caller of the
same model (plain `generate`, prompt lookup) runs stock SDPA through it. Marking only the first layer is what
the lossless check uses: the cache entering layer 1 is then bit-identical to plain decoding's at 1/L of the cost.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "dspark_row_exact"
FLAG = "_dspark_row_exact"  # set on a layer's attention module while its verification rows run row by row


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
    if (query.shape[2] == 1 or attention_mask is None or attention_mask.dtype != torch.bool
            or not getattr(module, FLAG, False)):
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
    """Route a transformers model's attention through `row_exact_attention` (masks are built as for SDPA); no
    layer is marked, so it computes exactly what stock SDPA does until `row_exact` marks some."""
    AttentionInterface.register(NAME, row_exact_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def attention_layers(model) -> list:
    """The attention modules of a transformers model in layer order (transformers' `*Attention` classes carry
    their `layer_idx`)."""
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    return sorted(mods, key=lambda m: m.layer_idx)


# the key/value projections of an attention module, as transformers' decoder models name them (fused or not)
KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")


def _one_row_at_a_time(module, args, output):
    """Forward hook: the projection recomputed row by row, as a one-token step computes it (fp32 matmuls on MKL
    round differently for 1, 2, 3 or 5 rows than for 4 or 8)."""
    x = args[0].reshape(-1, args[0].shape[-1])
    if x.shape[0] == 1:
        return output
    return torch.cat([torch.nn.functional.linear(r[None], module.weight, module.bias) for r in x]).view_as(output)


@contextmanager
def row_exact(model, layers: int, projections: bool = False):
    """Verification attention row by row in the first `layers` layers (all: bit-identical to one-token
    decoding where the other kernels act on each row alone) for the span of the block; `projections`: those
    layers' key/value projections row by row too, so their cache is a one-token step's where matmuls depend on
    the number of rows. The previous marks come back after the block."""
    mods = attention_layers(model)
    before = [getattr(m, FLAG, False) for m in mods]
    hooks = [lin.register_forward_hook(_one_row_at_a_time) for m in mods if projections and m.layer_idx < layers
             for name, lin in m.named_children() if name in KV_PROJECTIONS] if layers else []
    try:
        for m in mods:
            setattr(m, FLAG, m.layer_idx < layers)
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, b in zip(mods, before):
            setattr(m, FLAG, b)


@torch.no_grad()
def measure_row_exact(target, tokens: int = 8, context: int = 256, repeats: int = 5) -> dict:
    """Row-exact verification on this machine and dtype, against one-token steps over the same cache.
    `row_exact`: a verify pass with row-exact attention in every layer gives their logits bit for bit (it
    relies on the other kernels acting on each row alone: true of bf16 on CPUs here, not of fp32 matmuls on MKL).
    The lossless check's setting, the first layer row-exact: `check_layers` leading layers of its cache equal
    the steps' bit for bit, with the first layer's key/value projections also row by row where that is needed
    (`check_projections`: fp32 here) and possible. Costs: median ms of a verify pass of `tokens` rows over a
    `context`-slot cache, stock, in the check's setting and with every layer row-exact, interleaved `repeats`
    times; `step_ms` is one decode step; `*_cost` the extra over the stock pass (a lower bound of a round's:
    drafting and bookkeeping come on top)."""
    from transformers import DynamicCache

    from .cache import keep_slots

    model = target.model
    use_row_exact_attention(model)
    context = min(context, (target.context_window or context + tokens) - tokens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (1, context + tokens), generator=g).to(target.device)
    cache = DynamicCache(config=target.config)
    target.forward_features(ids[:, :context], cache=cache)
    pos = torch.arange(context, context + tokens, device=target.device)[None]

    def new_slots():
        kv = [(layer.keys[..., context:, :].clone(), layer.values[..., context:, :].clone()) for layer in cache.layers]
        keep_slots(cache, context, [])
        return kv

    def verify(layers: int, projections: bool = False):
        with row_exact(model, layers, projections):
            out = target.forward_features(ids[:, context:], position_ids=pos, cache=cache)
        return target.logits(out.last_hidden[0]), new_slots()

    def steps():
        rows = [target.logits(target.forward_features(ids[:, context + i:context + i + 1], cache=cache)
                              .last_hidden[0, -1]) for i in range(tokens)]
        return torch.stack(rows), new_slots()

    def agreeing(kv, ref) -> int:
        return next((i for i, (a, b) in enumerate(zip(kv, ref)) if not (torch.equal(a[0], b[0])
                                                                        and torch.equal(a[1], b[1]))), len(ref))

    ref_logits, ref_kv = steps()
    exact = torch.equal(verify(target.num_layers)[0], ref_logits)
    # what the check may claim: the caches of layers 0 and 1 (the first layer's attention row-exact), or of layer
    # 0 alone where its projections must run row by row (its queries and output projection still do not); more
    # layers agreeing on this probe would be luck
    projections = False
    check_layers = min(agreeing(verify(1)[1], ref_kv), 2)
    if check_layers == 0:
        check_layers = min(agreeing(verify(1, True)[1], ref_kv), 1)
        projections = check_layers > 0
    variants = {"stock": (0, False), "check": (1, projections), "exact": (target.num_layers, False)}
    times = {k: [] for k in (*variants, "step")}
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
    for _ in range(repeats):
        for name, (layers, proj) in variants.items():
            sync()
            t0 = time.perf_counter()
            verify(layers, proj)
            sync()
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        target.forward_features(ids[:, context:context + 1], cache=cache)
        sync()
        times["step"].append(time.perf_counter() - t0)
        keep_slots(cache, context, [])
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"row_exact": exact, "check_layers": check_layers, "check_projections": projections, "tokens": tokens,
            "context": context, "repeats": repeats, "step_ms": ms["step"], "stock_ms": ms["stock"],
            "check_ms": ms["check"], "exact_ms": ms["exact"], "check_cost": ms["check"] / ms["stock"] - 1,
            "exact_cost": ms["exact"] / ms["stock"] - 1}
