"""Is greedy speculative output the target's own? Shown bit for bit, not argued from a margin.

Plain decoding (transformers `generate`) and our decoder each leave a record of the pass that made their output
(decoding/record.py): per emitted token the argmax and top-2 logits of the row that chose it, and the KV cache of
the committed context. `check` compares them up to the first token where the outputs part:

- cache parity. Linear layers, norms and RoPE act on each row alone (bit for bit on CPU), so with row-exact
  verification attention (decoding/attention.py) in the first E layers the keys and values of layers 0..E are
  plain decoding's, bit for bit, in any dtype. The eval runs E = 1 by default (its cost: a round's first-layer
  attention, row by row) and E = all layers when exact attention is on. A stale slot, a slot kept from the wrong
  branch, a position id off by one or a wrong tree mask changes these bits at once, whether or not an output
  token changes, and whatever the logit margins.
- logits parity (E = all layers): every row that chose a token equals plain decoding's row bit for bit.
- argmax: every emitted token is the argmax of the row the decoder computed for it.

Where outputs part with stock attention beyond layer E, the prompt is decoded again with row-exact attention in
every layer (a replay, untimed); it must reproduce plain decoding token for token with every layer's cache and
every logits row bit-identical, over the whole output (every later divergence of the timed run included). The
timed run and the replay are the same code on the same drafter; they differ only in the order stock attention
sums in layers above E. So a timed divergence is rounding, shown rather than estimated: "rounding". Anything
else is an "error" (`dspark eval` exits 1: LosslessError). Where the kernels are not row-independent
(`attention.measure_row_exact` says so: fp32 matmuls on this CPU depend on the number of rows; a GPU's may) no
cache is compared and nothing is replayed: in fp32, whose verify and step logits differ by about an ulp, a
divergence is an error (the project's contract: identical in fp32); in a low precision it is "unproven" and the
report's `lossless` is null.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import LogitsProcessor

from ..decoding.attention import measure_row_exact
from ..decoding.record import PassRecord
from .report import Sample, first_divergence

EXACT_BUDGET = 0.10  # auto: row-exact attention in every layer when it costs at most this share of a verify pass


class LosslessError(RuntimeError):
    """Greedy output parted from plain decoding where no rounding can explain it, or a bit-level check failed
    (`dspark eval` exits 1 naming the cases, after the report)."""


def compare(plain_ids: list[int], plain: PassRecord, ids: list[int], ours: PassRecord, prompt_len: int,
            layers: int, logits: bool) -> dict:
    """Bit-level comparison of two greedy passes over the same prompt, up to the first token where they part.

    `layers`: how many leading layers' caches must match; `logits`: whether the chosen rows must match too
    (row-exact attention in every layer). Returns {"position": first differing token or None, "tokens": tokens
    compared, "slots": cache slots compared, "layers", "mismatch": None or what differed first, "plain_gap" /
    "drafter_gap": each pass's top-2 logit gap at the divergence (None without one)}."""
    pos = first_divergence(plain_ids, ids)
    d = len(ids) if pos is None else pos
    mismatch = None
    bad = [i for i, (t, a) in enumerate(zip(ids, ours.argmax.tolist())) if t != a]
    if bad:
        mismatch = f"token {bad[0]} is not the argmax of the row that chose it"
    slots = min(prompt_len + d, plain.kv[0][0].shape[1], ours.kv[0][0].shape[1])
    for layer in range(layers):
        if mismatch is not None:
            break
        for what, i in (("keys", 0), ("values", 1)):
            a, b = plain.kv[layer][i][:, :slots], ours.kv[layer][i][:, :slots]
            if not torch.equal(a, b):
                slot = int((a != b).any(0).any(-1).nonzero()[0])
                mismatch = f"layer {layer} {what} differ at cache slot {slot} (token {slot - prompt_len})"
                break
    if logits and mismatch is None and not torch.equal(plain.top2[:d], ours.top2[:d]):
        row = int((plain.top2[:d] != ours.top2[:d]).any(-1).nonzero()[0])
        mismatch = f"the logits row choosing token {row} differs from plain decoding's"
    gaps = {}
    if pos is not None:
        for name, rec, out in (("plain_gap", plain, plain_ids), ("drafter_gap", ours, ids)):
            gaps[name] = float(rec.top2[pos, 0] - rec.top2[pos, 1]) if pos < len(out) else None
    return {"position": pos, "tokens": d, "slots": slots, "layers": layers, "mismatch": mismatch,
            "plain_gap": gaps.get("plain_gap"), "drafter_gap": gaps.get("drafter_gap")}


def check(plain_ids: list[int], plain: PassRecord, ids: list[int], ours: PassRecord, prompt_len: int,
          cache_layers: int, every: bool, replay: Optional[Callable[[], tuple[list[int], PassRecord]]],
          strict: bool = False) -> dict:
    """One greedy generation judged: `compare` at the run's exactness (`cache_layers` leading layers; `every`:
    row-exact attention in every layer, logits rows too), then, for a divergence under stock attention, the
    replay (`replay()` → ids and record with row-exact attention in every layer) compared in full. Adds "kind":
    None (identical, every check passed), "rounding", "error" or, without a replay, "unproven" ("error" when
    `strict`: fp32, whose verify and step logits differ by ~1 ulp, must be identical), and "replay" (its
    comparison) where one ran."""
    num_layers = len(plain.kv)
    out = compare(plain_ids, plain, ids, ours, prompt_len, cache_layers, every)
    if out["mismatch"] is not None:
        out["kind"] = "error"
    elif out["position"] is None:
        out["kind"] = None
    elif every:
        out["kind"], out["mismatch"] = "error", "the outputs part under row-exact attention in every layer"
    elif replay is None:
        out["kind"] = "error" if strict else "unproven"
        out["mismatch"] = "the outputs part (fp32: they must be identical)" if strict else None
    else:
        r_ids, r_rec = replay()
        again = compare(plain_ids, plain, r_ids, r_rec, prompt_len, num_layers, True)
        if again["position"] is not None and again["mismatch"] is None:
            again["mismatch"] = f"the replay with row-exact attention parts from plain decoding at token " \
                                f"{again['position']}"
        out["replay"] = {k: again[k] for k in ("tokens", "slots", "layers", "mismatch")}
        out["kind"] = "rounding" if again["mismatch"] is None else "error"
    return out


def verdict(entry: dict, checks: list[dict]) -> None:
    """`lossless` and its evidence for one benchmark entry (method_metrics' dict, its divergences included) from
    its generations' checks: False on any error, None when a divergence is unproven and none is an error, else
    True. Each divergence gets its check's kind, gaps and replay; one without a check (no record of the pass)
    is an error: nothing shows it is rounding. `lossless_evidence` sums up what was compared."""
    by_key = {(c["prompt"], c["turn"]): c for c in checks}
    errors = [c for c in checks if c["kind"] == "error" and c["position"] is None]  # same ids, other bits
    for d in entry.get("divergences") or []:
        c = by_key.get((d["prompt"], d["turn"])) or {"kind": "error", "prompt": d["prompt"], "turn": d["turn"],
                                                      "mismatch": "no record of the pass to compare"}
        d.update({k: c.get(k) for k in ("kind", "mismatch", "plain_gap", "drafter_gap", "replay")})
        errors += [c] if c["kind"] == "error" else []
    unproven = sum(d["kind"] == "unproven" for d in entry.get("divergences") or [])
    entry["lossless_evidence"] = {
        "generations_checked": len(checks), "tokens_compared": sum(c["tokens"] for c in checks),
        "cache_slots_compared": sum(c["slots"] for c in checks),
        "cache_layers_compared": max((c["layers"] for c in checks), default=0),
        "replays": sum("replay" in c for c in checks),
        "rounding": sum(c["kind"] == "rounding" for c in checks), "errors": len(errors), "unproven": unproven,
        "mismatches": [f"prompt {c['prompt']} turn {c['turn']}: {c['mismatch']}" for c in errors]}
    entry["lossless"] = False if errors else None if unproven else True


# --------------------------------------------------------------------------- in the eval run
class Recording(LogitsProcessor):
    """Last of `generate`'s logits processors: keeps each step's final row (PassRecord.rows), changes nothing."""

    def __init__(self):
        self.rows = []

    def __call__(self, input_ids, scores):
        self.rows.append(PassRecord.rows(scores))
        return scores


@dataclass
class Checked:
    """How one of our decoders' greedy outputs are checked against plain decoding (`check`):
    cache layers compared bit for bit, whether its logits rows must match too (row-exact attention in every
    layer), and the replay with row-exact attention in every layer (None: not needed, or not possible here)."""

    cache_layers: int
    every: bool
    replay: Optional[Callable]  # evaluate.Method
    strict: bool  # fp32: a divergence no replay can examine is an error


def judge(plain: Sample, ours: Sample, prompt: list[int], max_new_tokens: int, how: Checked, where: dict) -> None:
    """ours.check from the two passes' records (the records are dropped: the verdict is what stays)."""
    if plain.record is None or ours.record is None:
        return
    replay = None
    if how.replay is not None:
        def replay():
            ids, _, record = how.replay(prompt, max_new_tokens)
            return ids, record
    ours.check = {**where, **check(plain.ids, plain.record, ours.ids, ours.record, len(prompt), how.cache_layers,
                                   how.every, replay, how.strict)}
    ours.record = None


def checks_of(samples: list[list[Sample]]) -> list[dict]:
    """The checks of a method's samples [prompt][turn] (verdict's input)."""
    return [s.check for turns in samples for s in turns if s.check is not None]


def exact_attention_choice(setting: str, greedy: bool, target, tokens: int) -> dict:
    """How many leading layers verify with row-exact attention, and why, from a measurement here
    (attention.measure_row_exact over `tokens` rows): every layer when asked (on) or, under auto, when that costs
    at most EXACT_BUDGET of a stock verify pass (so at most that of a round) and makes verification bit-identical
    to one-token steps here; else, for greedy runs, the first layer only (with its key/value projections row by
    row where matmuls depend on the number of rows): what the lossless check compares, its cost measured too."""
    cost = measure_row_exact(target, tokens=tokens, repeats=3)
    of, extra = target.num_layers, cost["exact_cost"]
    budget = f"a stock verify pass of {tokens} tokens here (auto's budget {EXACT_BUDGET:.0%})"
    if setting == "on" or (setting == "auto" and cost["row_exact"] and extra <= EXACT_BUDGET):
        layers, projections = of, False
        why = (f"{'asked for' if setting == 'on' else 'auto'}: every layer costs {extra:+.0%} of {budget}"
               + ("" if cost["row_exact"] else "; the other kernels here depend on the number of rows, so this "
                  "does not make verification bit-identical to one-token steps"))
    else:
        check = greedy and cost["check_layers"] > 0
        layers, projections = (1, cost["check_projections"]) if check else (0, False)
        why = (f"{'asked for' if setting == 'off' else 'auto'}: every layer would cost {extra:+.0%} of "
               + budget + ("" if cost["row_exact"] else " and would not make verification bit-identical here"))
        if check:
            why += (f"; the first layer{' with its key/value projections' if projections else ''} row by row "
                    f"({cost['check_cost']:+.0%}) so the cache of {cost['check_layers']} layer"
                    f"{'s' if cost['check_layers'] > 1 else ''} can be compared bit for bit")
    return {"setting": setting, "layers": layers, "projections": projections, "of": of,
            "row_exact_here": cost["row_exact"], "check_layers": cost["check_layers"] if greedy else 0,
            "reason": why, "measured": {k: round(v, 4) if isinstance(v, float) else v for k, v in cost.items()}}
