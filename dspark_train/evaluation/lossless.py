"""Is greedy speculative output the target's own? Where it parts from plain greedy decoding, each divergence is
re-scored in fp32 and classified: a near-tie that the eval dtype's rounding explains, or an error.

A bf16 verify pass over N tokens and N one-token steps round differently (different reduction orders), so outputs
can part where the target's top two logits nearly tie. `classify_divergences` measures the rounding each context
shows and the fp32 gap between the two tokens; `verdict` turns the classes into the report's `lossless` (with
`near_ties` / `errors` counts); `dspark eval` exits 1 (LosslessError) when any divergence is an error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

NEAR_TIE_MARGIN = 4.0  # a near-tie's fp32 gap is within this many times the rounding seen at that context


class LosslessError(RuntimeError):
    """A greedy divergence no rounding explains (`dspark eval` exits 1 naming the cases, after the report)."""


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` numbers at |x| (bf16: 8 significant bits, fp16: 11, fp32: 24)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 24)
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - bits + 1)


@torch.no_grad()
def classify_divergences(target, cases: Sequence[tuple[list[int], int, int]]) -> list[dict]:
    """Is each greedy divergence (context, plain token a, speculative token b) rounding or a real error?

    The context is re-scored in fp32 (the target's own weights, its parameters cast up for the call and restored:
    bf16 → fp32 → bf16 is exact). A greedy pass in the eval dtype picks a, the speculative one b; if each pass's
    logits are within e of the fp32 ones, the fp32 gap l32(a) − l32(b) lies within ±2e. e is what this context
    shows: the larger deviation |l(x) − l32(x)| of the eval-dtype forward at a and b, at least one unit of that
    dtype at the logits' magnitude. A near-tie: |gap| ≤ NEAR_TIE_MARGIN · e; anything wider is an error: the
    speculative decoder emitted a token the target would not pick, rounding or not."""
    if not cases:
        return []
    model = target.model
    low = [(x[-1], target.model(input_ids=torch.tensor([x], device=target.device)).logits[0, -1].float())
           for x, _, _ in cases]
    params = [p for p in model.parameters() if p.is_floating_point()]
    kept = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.float()
        high = [model(input_ids=torch.tensor([x], device=target.device)).logits[0, -1].float() for x, _, _ in cases]
    finally:
        for p, d in zip(params, kept):
            p.data = d
    out = []
    for (_, a, b), (_, lo), hi in zip(cases, low, high):
        dev = max(abs(float(lo[a] - hi[a])), abs(float(lo[b] - hi[b])), ulp(float(hi.max()), target.dtype))
        gap = float(hi[a] - hi[b])
        top2 = lo.topk(2).values.tolist()
        out.append({"top2_logit_gap": top2[0] - top2[1], "fp32_gap": gap, "fp32_argmax": int(hi.argmax()),
                    "rounding": dev, "tolerance": NEAR_TIE_MARGIN * dev,
                    "kind": "near_tie" if abs(gap) <= NEAR_TIE_MARGIN * dev else "error"})
    return out


def verdict(entry: dict) -> None:
    """`lossless` from the classified divergences: identical outputs, or every divergence a near-tie (counted in
    `near_ties`); any error makes it False (`errors`)."""
    divs = entry.get("divergences")
    if divs is None or entry.get("lossless") is None:
        return
    entry["near_ties"] = sum(d["kind"] == "near_tie" for d in divs)
    entry["errors"] = sum(d["kind"] == "error" for d in divs)
    entry["lossless"] = entry["errors"] == 0


# --------------------------------------------------------------------------- the run
