"""The served report (`dspark eval --engine`, evaluation/served.py measures): the engine's counters read from its
Prometheus /metrics, served τ and acceptance by position from them, the side-by-side entry of one benchmark (ours,
served, the ratios, output checks, where a step's time goes), the < 50 % alarm, served.md and the acceptance plot.
Nothing here imports torch or talks to a server.

vLLM 0.32's counters: `vllm:spec_decode_num_drafts_total` (speculative steps), `…_num_draft_tokens_total` (tokens
drafted), `…_num_accepted_tokens_total` and `…_num_accepted_tokens_per_pos_total{position="k"}` (drafts whose
position k was accepted, which greedy acceptance counts only when 0..k−1 were: a prefix count), one series per
engine index and model name; its request histograms' `_sum` and `_count` give the engine's own time per request.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

from ..layout import atomic_path

ALARM = 0.5  # served accepted drafts per step under this share of ours: the engine misreads the drafter
TAU_TOLERANCE, ACCEPT_TOLERANCE = 0.02, 0.02  # served τ within 2 % of ours, acceptance at positions 1-4 within 0.02
LIKELY_CAUSES = (
    "the block's slot layout (config.json sample_from_anchor / dspark_train.slot_layout: vLLM's dflash runs the "
    "fill-in layout only)",
    "feature-layer ids (aux_hidden_state_layer_ids must be the drafter's feature_layers)",
    "a learned MASK row lost (an engine that reloads embed_tokens from the target: train with drafter.mask_token_id)",
    "num_speculative_tokens ≠ the drafter's γ (block_size)",
    "the draft vocabulary map (d2t offsets, the pruned LM-head rows)")


# --------------------------------------------------------------------------- the engine's counters
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_POSITION = re.compile(r'(?:^|,)\s*position="(\d+)"')
SPEC = {"drafts": "vllm:spec_decode_num_drafts_total", "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
        "accepted": "vllm:spec_decode_num_accepted_tokens_total"}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
TIMES = {"requests": "vllm:e2e_request_latency_seconds_count", "e2e_s": "vllm:e2e_request_latency_seconds_sum",
         "prefill_s": "vllm:request_prefill_time_seconds_sum", "decode_s": "vllm:request_decode_time_seconds_sum",
         "generated": "vllm:generation_tokens_total"}


def parse_metrics(text: str) -> dict[tuple[str, Optional[int]], float]:
    """Prometheus text → {(sample name, position label or None): value summed over every other label} (one
    engine's counters may be split by engine index and model name)."""
    out: dict[tuple[str, Optional[int]], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.groups()
        pos = _POSITION.search(labels or "")
        key = (name, int(pos.group(1)) if pos else None)
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


@dataclass
class Counters:
    """What an engine has counted since it started (the subset read here); `after - before` is one benchmark's."""

    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)
    requests: float = 0.0
    e2e_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated: float = 0.0
    speculative: bool = False  # the engine exposes the speculative-decoding counters at all

    @classmethod
    def from_text(cls, text: str) -> "Counters":
        m = parse_metrics(text)
        per_pos = sorted((k[1], v) for k, v in m.items() if k[0] == PER_POSITION and k[1] is not None)
        return cls(**{f: m.get((n, None), 0.0) for f, n in {**SPEC, **TIMES}.items()},
                   accepted_per_pos=[v for _, v in per_pos], speculative=(SPEC["drafts"], None) in m)

    def __sub__(self, before: "Counters") -> "Counters":
        pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0.0)
               for i, a in enumerate(self.accepted_per_pos)]
        return Counters(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)
                           if f.name not in ("accepted_per_pos", "speculative")},
                        accepted_per_pos=pos, speculative=self.speculative)


def acceptance(c: Counters) -> dict:
    """The engine's τ (1 + accepted / drafts: the bonus included, as ours), its γ (draft tokens per draft), and
    per position k the share of drafts whose drafts 1..k were all accepted (vLLM counts position k only when
    1..k−1 were accepted) and that share given 1..k−1: our `accept_rate_by_position` and conditional one."""
    if not c.drafts:
        return {"tau": None, "gamma": None, "accept_rate_by_position": [], "conditional_accept_by_position": [],
                "drafts": 0, "draft_tokens": int(c.draft_tokens), "accepted": int(c.accepted)}
    survival = [a / c.drafts for a in c.accepted_per_pos]
    conditional = [s / prev if prev else None for s, prev in zip(survival, [1.0, *survival])]
    return {"tau": 1 + c.accepted / c.drafts, "gamma": c.draft_tokens / c.drafts, "accept_rate_by_position": survival,
            "conditional_accept_by_position": conditional, "drafts": int(c.drafts),
            "draft_tokens": int(c.draft_tokens), "accepted": int(c.accepted)}


# --------------------------------------------------------------------------- side by side
def strip_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """Generated ids without a final stop token (engines and transformers differ in returning it)."""
    return list(ids[:-1]) if ids and ids[-1] in stops else list(ids)


def _throughput(samples: Sequence[dict]) -> tuple[int, float]:
    return sum(len(s["ids"]) for s in samples), sum(s["seconds"] for s in samples)


def _ms(seconds: float, n: float) -> Optional[float]:
    return 1000 * seconds / n if n else None


def served_entry(run: dict, ours: dict, our_outputs: list[dict], stops: list[int], gamma: int) -> dict:
    """One benchmark side by side: the engine's τ, acceptance by position and client tokens/s (speculating and
    plain), ours from our report entry (primary drafter, chain), the ratios served/ours, served greedy output
    against the engine's plain output and the engine's plain against ours, and where each side's time goes."""
    c_spec, c_plain = run["counters"]["spec"], run["counters"]["plain"]
    served = acceptance(c_spec)
    tok, sec = _throughput(run["spec"])
    ptok, psec = _throughput(run["plain"])
    tps, ptps = tok / sec if sec else 0.0, ptok / psec if psec else 0.0
    spec_ids = [strip_stop(s["ids"], stops) for s in run["spec"]]
    plain_ids = [strip_stop(s["ids"], stops) for s in run["plain"]]
    ours_plain = [strip_stop(o["plain"], stops) for o in our_outputs]
    served.update({
        "n_prompts": len(spec_ids), "tokens_per_s": tps, "plain_tokens_per_s": ptps,
        "speedup": tps / ptps if ptps else None, "generated_tokens": tok, "seconds": sec,
        "plain_generated_tokens": ptok, "plain_seconds": psec,
        "prompt_ids_identical": sum(s["prompt_ok"] and p["prompt_ok"] for s, p in zip(run["spec"], run["plain"])),
        "identical_to_engine_plain": sum(a == b for a, b in zip(spec_ids, plain_ids)),
        "engine_plain_identical_to_ours": sum(a == b for a, b in zip(plain_ids, ours_plain)),
        "divergences": [{"prompt": i, "position": pos, "plain_token": _at(b, pos), "served_token": _at(a, pos)}
                        for i, (a, b) in enumerate(zip(spec_ids, plain_ids)) if (pos := _first_diff(b, a)) is not None],
        # where the time goes (item 5): wall per plain token and per speculative step on the client, and the
        # engine's own decode time per step from its histograms (API server and HTTP excluded)
        "timing": {"plain_ms_per_token": _ms(psec, ptok), "ms_per_step": _ms(sec, c_spec.drafts),
                   "engine_plain_decode_ms_per_step": _ms(c_plain.decode_s, c_plain.generated - c_plain.requests),
                   "engine_decode_ms_per_step": _ms(c_spec.decode_s, c_spec.drafts),
                   "engine_prefill_ms_per_request": _ms(c_spec.prefill_s, c_spec.requests),
                   "api_overhead_ms_per_request": _ms(sec - c_spec.e2e_s, c_spec.requests)},
    })
    t = served["timing"]
    t["step_cost_in_plain_tokens"] = (t["ms_per_step"] / t["plain_ms_per_token"]
                                      if t["ms_per_step"] and t["plain_ms_per_token"] else None)
    mine = {k: ours.get(k) for k in ("tau", "accept_rate_by_position", "conditional_accept_by_position", "rounds",
                                     "tokens_per_s", "baseline_tokens_per_s", "speedup", "lossless")}
    mine["gamma"] = gamma
    mine["timing"] = {"plain_ms_per_token": _ms(ours["baseline_seconds"], ours["baseline_generated_tokens"]),
                      "ms_per_step": _ms(ours["seconds"], ours["rounds"])}
    mine["timing"]["step_cost_in_plain_tokens"] = (
        mine["timing"]["ms_per_step"] / mine["timing"]["plain_ms_per_token"]
        if mine["timing"]["ms_per_step"] and mine["timing"]["plain_ms_per_token"] else None)
    ratio = {"tau": _div(served["tau"], ours.get("tau")), "speedup": _div(served["speedup"], ours.get("speedup")),
             "accepted_per_step": _div(_minus1(served["tau"]), _minus1(ours.get("tau")))}
    gap = [abs(s - o) for s, o in zip(served["accept_rate_by_position"], ours.get("accept_rate_by_position") or [])]
    worst = max(gap[:4], default=None)
    # issue [SV]'s goals: the engine reads the drafter as we do (greedy, fp32 on both sides)
    goals = {"tau_within_2pct": None if ratio["tau"] is None else abs(ratio["tau"] - 1) <= TAU_TOLERANCE,
             "accept_pos_1_4_within_0_02": None if worst is None else worst <= ACCEPT_TOLERANCE}
    return {"ours": mine, "served": served, "ratio": ratio, "max_accept_gap_pos_1_4": worst, "goals": goals}


def _first_diff(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return i if i is not None else (None if len(a) == len(b) else min(len(a), len(b)))


def _at(ids: Sequence[int], i: int) -> Optional[int]:
    return ids[i] if i < len(ids) else None


def _div(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def _minus1(tau) -> Optional[float]:
    return None if tau is None else tau - 1


def alarm(name: str, entry: dict, found: Sequence[str] = ()) -> Optional[dict]:
    """The silent-zero failure of one benchmark: served accepted drafts per step under ALARM × ours (ours must
    have accepted some: with none there is nothing to compare) → {benchmark, served, ours, causes}, else None.
    Causes: a γ mismatch the counters show and `found` (seen in the export) first, then every likely one."""
    ours, served = _minus1(entry["ours"]["tau"]), _minus1(entry["served"]["tau"])
    if not ours or ours <= 0 or (served is not None and served >= ALARM * ours):
        return None
    causes = list(found)
    gs, go = entry["served"]["gamma"], entry["ours"]["gamma"]
    if gs is not None and abs(gs - go) > 1e-9:
        causes.insert(0, f"num_speculative_tokens: the engine drafts {gs:g} tokens per step, our γ is {go}")
    return {"benchmark": name, "served": served, "ours": ours,
            "causes": causes + [c for c in LIKELY_CAUSES if c not in causes]}


def alarm_message(alarms: Sequence[dict]) -> str:
    """One line for every alarmed benchmark: what was accepted on each side, then the likely causes."""
    where = ", ".join(f"{a['benchmark']} ({_f(a['served'], '.3f')} vs {a['ours']:.3f})" for a in alarms)
    causes = list(dict.fromkeys(c for a in alarms for c in a["causes"]))
    return (f"served acceptance (accepted drafts per step) under {ALARM:.0%} of ours on {where}: the engine reads the "
            "drafter otherwise than we do; likely causes: " + "; ".join(causes))


# --------------------------------------------------------------------------- report files
def _f(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def _yes(ok: Optional[bool]) -> str:
    return "—" if ok is None else "yes" if ok else "**no**"


def render_served(r: dict) -> str:
    """served.md: the side-by-side table, acceptance by position, where the time goes, alarms and divergences."""
    from ..hardware import Capabilities

    e, s = r["engine"], r["settings"]
    where = Capabilities.from_dict(r["machine"]).describe() if r.get("machine") else r["device"]
    how = (f"{e['name']} {e.get('version') or '(a running server)'}, method {e.get('method') or 'the server’s'}, "
           f"num_speculative_tokens {e['num_speculative_tokens']}, batch 1" + (f", {e['settings']}" if e.get(
               "settings") else ""))
    # what was served where (issue [SV] 4): a server started here runs on this machine's device; one reached by URL
    # runs wherever it runs
    served_where = (f"served by the server at {e['server']} (without speculation: {e['plain_server']})"
                    if e.get("server") else f"served on this machine's {e.get('device') or r['device']}, both "
                    "servers started here")
    lines = [f"# Served vs ours: {r['drafter']} on {r['target']}", "", served_where + ".", "",
             f"machine {where} · dtype {r['dtype']} (both sides) · engine {how} · ours: chain, γ "
             f"{r['ours']['gamma']}, {r['threads']} threads · max_new_tokens {s['max_new_tokens']} · temperature "
             f"{s['temperature']}", "",
             "τ counts the bonus token on both sides (served: 1 + accepted / drafts from the engine's counters; ours: "
             "committed tokens per verify round). Speedup: tokens/s over the same side's plain decoding (served: the "
             "same engine without speculation, client wall clock; ours: transformers `generate`), one request at a "
             "time.", "",
             "| dev set | prompts | our τ | served τ | τ served/ours | our speedup | served speedup | speedup "
             "served/ours | served = engine plain | engine plain = ours |", "|" + "---|" * 10]
    for b, x in r["benchmarks"].items():
        o, v, q = x["ours"], x["served"], x["ratio"]
        lines.append(f"| {b} | {v['n_prompts']} | {_f(o['tau'], '.3f')} | {_f(v['tau'], '.3f')} | {_f(q['tau'], '.3f')}"
                     f" | {_f(o['speedup'])}× | {_f(v['speedup'])}× | {_f(q['speedup'])} | "
                     f"{v['identical_to_engine_plain']}/{v['n_prompts']} | "
                     f"{v['engine_plain_identical_to_ours']}/{v['n_prompts']} |")
    depth = max((len(x["served"]["accept_rate_by_position"]) for x in r["benchmarks"].values()), default=0)
    if depth:
        lines += ["", "Acceptance by position (share of steps whose drafts 1..k all survived), ours / served:", "",
                  "| dev set | " + " | ".join(str(k) for k in range(1, depth + 1)) + " | max gap at 1–4 |",
                  "|" + "---|" * (depth + 2)]
        for b, x in r["benchmarks"].items():
            ours, served = x["ours"]["accept_rate_by_position"] or [], x["served"]["accept_rate_by_position"]
            cells = [f"{_f(ours[k] if k < len(ours) else None)} / {_f(served[k] if k < len(served) else None)}"
                     for k in range(depth)]
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {_f(x['max_accept_gap_pos_1_4'], '.3f')} |")
    lines += ["", "Where the time goes (ms, wall clock, batch 1): per plain token, per speculative step (verify "
              "round), and a step's cost in plain tokens (speedup ≈ τ ÷ that); the engine's own decode time per step "
              "from its histograms, and what its API server and HTTP add per request:", "",
              "| dev set | ours: plain/token | ours: step | ours: step in tokens | served: plain/token | "
              "served: step | served: step in tokens | engine decode/step plain, spec | API + HTTP/request |",
              "|" + "---|" * 9]
    for b, x in r["benchmarks"].items():
        o, v = x["ours"]["timing"], x["served"]["timing"]
        lines.append(f"| {b} | {_f(o['plain_ms_per_token'], '.1f')} | {_f(o['ms_per_step'], '.1f')} | "
                     f"{_f(o['step_cost_in_plain_tokens'])} | {_f(v['plain_ms_per_token'], '.1f')} | "
                     f"{_f(v['ms_per_step'], '.1f')} | {_f(v['step_cost_in_plain_tokens'])} | "
                     f"{_f(v['engine_plain_decode_ms_per_step'], '.1f')}, "
                     f"{_f(v['engine_decode_ms_per_step'], '.1f')} | "
                     f"{_f(v['api_overhead_ms_per_request'], '.0f')} |")
    lines += ["", "Goals (greedy, same dtype): served τ within 2 % of ours, acceptance at positions 1–4 within 0.02: "
              + ", ".join(f"{b} {_yes(g['tau_within_2pct'])} / {_yes(g['accept_pos_1_4_within_0_02'])}"
                          for b, g in ((b, x["goals"]) for b, x in r["benchmarks"].items())) + "."]
    divs = [(b, d) for b, x in r["benchmarks"].items() for d in x["served"]["divergences"] or []]
    if divs:
        lines += ["", f"Served outputs that part from the engine's plain output ({len(divs)}), the context re-scored "
                  "by our target:", ""]
        lines += [f"- {b} prompt {d['prompt']}: position {d['position']}: "
                  + ("near-tie" if d.get("kind") == "near_tie" else "**ERROR**")
                  + (f", fp32 gap {_f(d.get('fp32_gap'), '.4f')} vs rounding {_f(d.get('rounding'), '.4f')}"
                     if d.get("fp32_gap") is not None else ", one output stopped where the other went on")
                  for b, d in divs]
    if r["alarms"]:
        lines += ["", f"**Alarm**: {alarm_message(r['alarms'])}"]
    return "\n".join(lines) + "\n"


def plot_served(r: dict, path: Path) -> Path:
    """Acceptance by position, ours and served, one panel per benchmark."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    benches = list(r["benchmarks"])
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], benches):
        x = r["benchmarks"][b]
        for label, side, style in (("ours (chain)", x["ours"], "o-"), (f"served ({r['engine']['name']})",
                                                                       x["served"], "s--")):
            ys = side["accept_rate_by_position"] or []
            ax.plot(range(1, len(ys) + 1), ys, style, label=f"{label}, τ {_f(side['tau'], '.3f')}")
        ax.set_title(b)
        ax.set_xlabel("draft position k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("acceptance (drafts 1..k survived)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
