"""`dspark eval --concurrency 1,4,16`: R requests decoded together, speculative against plain, per concurrency.

The serving condition the load-aware scheduler exists for (paper §3.2, Algorithm 1): with R requests per target
forward, verification stops being free once the batch fills the machine, and the scheduler must shrink the drafts
(and stop drafting) instead of losing to plain decoding. Per benchmark, one pool of requests (the first `--n`
prompts' first turns, cycled to the largest R) is decoded in batches of R, every batch by each method in turn
(order rotated per batch, so drift hits all alike):

- `speculative`: `generate_batch` (chain drafting, one batched drafter pass per round) with the load-aware prefix
  scheduler on the artifact's calibrated confidences and this machine's SPS(B) measured for each R (R rows of
  1..γ+1 tokens: what its verify forwards compute);
- `plain`: `generate_batch` without a drafter (our batched plain decoding: the same ragged cache and stop rules);
- `plain-hf`: transformers' batched `generate` (left-padded), the plain decoding a user already has.

Speedup is against the faster of the two plain decoders (named per row). Static batching: a batch's requests start
together and each leaves when it stops; its latency is its own finish time (transformers' `generate` returns them
all at the end: the batch's). Greedy losslessness is per request: every request's speculative output against its
own plain one-at-a-time decode (the R = 1 plain run, else decoded for the check), divergences re-scored in fp32.
Writes concurrency.json, concurrency.md and speedup_vs_concurrency.png under --out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..artifacts.reader import load_artifact, resolve_artifact
from ..data.chat import prompt_ids, user_messages
from ..decoding import BatchSPS, SpeculativeDecoder, load_or_measure_sps, smooth_sps
from ..decoding.scheduler import SPSProfile
from ..drafters.batched import supports_ragged
from ..hardware import detect
from ..layout import atomic_path, write_atomic
from ..policy.calibration import describe_noise
from ..runlock import holds_lock
from ..target import load_target
from .evaluate import fit_prompt, generation_kwargs, load_benchmark, prompt_label, target_config
from .lossless import LosslessError
from .settings import EvalConfig
from .report import first_divergence

CONCURRENCY_JSON, CONCURRENCY_MD, CONCURRENCY_PLOT = ("concurrency.json", "concurrency.md",
                                                      "speedup_vs_concurrency.png")
METHODS = ("speculative", "plain", "plain-hf")


def batch_sps(target, rows: Sequence[int], gamma: int, context: int) -> BatchSPS:
    """SPS(B) of R-row forwards of 1..γ+1 tokens per row for each R (cached per machine key), smoothed."""
    profiles = {}
    for r in sorted(set(rows) | {1}):
        p = load_or_measure_sps(target, max_tokens=r * (gamma + 1), context=context, batch_size=r)
        print(f"SPS(B), {r} row{'s' if r > 1 else ''}: {describe_noise(p.tokens, p.meta)}", flush=True)
        profiles[r] = SPSProfile(p.tokens, smooth_sps(p.steps_per_s), p.meta)
    return BatchSPS(profiles)


def hf_batch(model, gen: dict, eos: set):
    """transformers' batched generate, left-padded; each row's ids cut after its first stop token."""
    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        pad = gen["pad_token_id"] if gen["pad_token_id"] is not None else 0
        L = max(map(len, prompts))
        ids = torch.full((len(prompts), L), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            att[i, L - len(p):] = 1
        out = model.generate(ids.to(model.device), attention_mask=att.to(model.device), **gen,
                             max_new_tokens=max_new_tokens)[:, L:].tolist()
        return [row[:next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in out]
    return run


def _pct(xs: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(xs, q)) if len(xs) else None


def measure_concurrency(target, decoder: SpeculativeDecoder, plain: SpeculativeDecoder, hf, pool: list[list[int]],
                        rows: int, cfg: EvalConfig, sps: BatchSPS, eos: list[int]) -> dict:
    """Every method over the pool in batches of `rows` requests; tokens/s, latency, τ, verified tokens per request
    per round, the drafter's share of a round; outputs per request (for the lossless check)."""
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=eos)
    runs = {m: {"tokens": 0, "seconds": 0.0, "latency": [], "outputs": [None] * len(pool)} for m in METHODS}
    steps = []
    for k, start in enumerate(range(0, len(pool), rows)):
        batch = pool[start:start + rows]
        for m in METHODS[k % 3:] + METHODS[:k % 3]:
            seed = cfg.seed + 1000 * k
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            if m == "plain-hf":
                outs = hf(batch, cfg.max_new_tokens)
                secs = time.perf_counter() - t0
                lat = [secs] * len(batch)
            else:
                dec = decoder if m == "speculative" else plain
                bt = dec.generate_batch(batch, cfg.max_new_tokens, seed=seed,
                                        sps=sps if m == "speculative" else None, **kw)
                secs = time.perf_counter() - t0
                outs, lat = [tr.tokens for tr in bt.requests], [tr.t_total for tr in bt.requests]
                if m == "speculative":
                    steps += bt.steps
                    runs[m].setdefault("request_rounds", []).extend(r for tr in bt.requests for r in tr.rounds)
            run = runs[m]
            run["tokens"] += sum(map(len, outs))
            run["seconds"] += secs
            run["latency"] += lat
            run["outputs"][start:start + len(batch)] = outs
    out = {}
    for m, run in runs.items():
        out[m] = {"tokens_per_s": run["tokens"] / run["seconds"] if run["seconds"] else None,
                  "tokens": run["tokens"], "seconds": run["seconds"],
                  "latency_mean_s": float(np.mean(run["latency"])), "latency_p90_s": _pct(run["latency"], 90),
                  "outputs": run["outputs"]}
    spec = out["speculative"]
    rounds = runs["speculative"].get("request_rounds", [])
    drafted = [s for s in steps if s["drafted"]]
    total = sum(s["t_draft"] + s["t_verify"] + s["t_book"] for s in steps)
    spec.update({
        "tau": sum(r.n_accepted + 1 for r in rounds) / len(rounds) if rounds else None,
        "verified_per_request_round": sum(s["tokens"] for s in steps) / sum(s["requests"] for s in steps)
        if steps else None,
        "computed_per_request_round": sum(s["computed"] for s in steps) / sum(s["requests"] for s in steps)
        if steps else None,
        "rounds": len(steps), "drafted_rounds": len(drafted),
        "drafter_share": sum(s["t_draft"] for s in steps) / total if total else None,
        # the drafter's own forwards (backbone pass + head steps) per drafted round, and the whole drafting phase
        # (context catch-up, scheduling, tree building too)
        "drafter_forward_s_per_round": float(np.mean([s["t_propose"] + s["t_head_steps"] for s in drafted]))
        if drafted else None,
        "draft_s_per_round": float(np.mean([s["t_draft"] for s in drafted])) if drafted else None,
    })
    fastest = max(("plain", "plain-hf"), key=lambda m: out[m]["tokens_per_s"] or 0.0)
    out["fastest_plain"] = fastest
    out["speedup"] = (spec["tokens_per_s"] / out[fastest]["tokens_per_s"]) if out[fastest]["tokens_per_s"] else None
    out["speedup_vs_plain"] = spec["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["speedup_vs_plain_hf"] = spec["tokens_per_s"] / out["plain-hf"]["tokens_per_s"]
    return out


def lossless_check(target, pool: list[list[int]], by_rows: dict[int, dict], reference: list[list[int]]) -> None:
    """Greedy, per concurrency: every request's speculative (and both plain) outputs against its one-at-a-time
    plain decode. In fp32 they must be identical: any divergence is an error. In a lower precision a batched,
    padded verify pass rounds unlike a one-token step and is not replayed row-exact here, so a divergence is
    `unproven` (lossless None, not yes); `dspark eval` at batch 1 is where bf16 losslessness is shown bit for bit."""
    strict = target.dtype == torch.float32
    for entry in by_rows.values():
        for m in METHODS:
            outs = entry[m].pop("outputs")
            same = [o == r for o, r in zip(outs, reference)]
            entry[m]["agreement"] = sum(same) / len(same)
            if m != "speculative":
                continue
            divs = [{"request": i, "position": pos, "plain_token": _at(reference[i], pos), "drafter_token": _at(o, pos),
                     "kind": "error" if strict or None in (_at(reference[i], pos), _at(o, pos)) else "unproven"}
                    for i, o in enumerate(outs) if (pos := first_divergence(reference[i], o)) is not None]
            entry[m]["divergences"] = divs
            entry[m]["errors"] = sum(d["kind"] == "error" for d in divs)
            entry[m]["unproven"] = sum(d["kind"] == "unproven" for d in divs)
            entry[m]["lossless"] = False if entry[m]["errors"] else None if entry[m]["unproven"] else True


def _at(ids: Sequence[int], i: int) -> Optional[int]:
    return ids[i] if i < len(ids) else None


@holds_lock(lambda cfg: cfg.out, "dspark eval")
def run_concurrency(cfg: EvalConfig) -> dict:
    """Load, warm up, measure every benchmark at every concurrency, write concurrency.{json,md} and the plot.
    Batched decoding drafts chains: `--mode` and `--hybrid` do not apply (the report says so)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = sorted(set(cfg.concurrency))
    benches = [load_benchmark(spec, cfg.data_root, cfg.n) for spec in cfg.benchmarks]
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = load_target(target_config(cfg.target, resolve_artifact(cfg.artifact), cfg.dtype), device.type)
    target.model.to(device)
    caps = detect(device.type)
    print(f"{caps.describe()}; target dtype {target.precision}", flush=True)
    drafter = load_artifact(cfg.artifact, target=target)
    gamma = drafter.config.block_size
    decoder = SpeculativeDecoder(target, drafter, calibration=drafter.calibration)
    plain = SpeculativeDecoder(target, None)
    gen = generation_kwargs(target, cfg.temperature, cfg.top_p, cfg.top_k)
    eos = list(gen["eos_token_id"] or [])
    hf = hf_batch(target.model, gen, set(eos))
    context = int(((drafter.calibration or {}).get("cost_profile") or {}).get("meta", {}).get("context", 256))
    sps = batch_sps(target, rows, gamma, context)
    greedy = cfg.temperature <= 0

    report = {"target": target.name, "drafter": cfg.artifact, "device": device.type, "device_name": caps.name,
              "machine": caps.to_dict(), "dtype": target.precision.value, "dtype_choice": target.precision.to_dict(),
              "threads": torch.get_num_threads(), "temperature": cfg.temperature, "top_p": cfg.top_p,
              "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens, "concurrency": rows, "gamma": gamma,
              "mode": "chain (batched: Algorithm 1 sets each request's length)",
              "drafter_kind": drafter.config.kind, "batched_drafting": supports_ragged(drafter),
              "sps": {str(r): {"tokens": p.tokens, "steps_per_s": [round(x, 4) for x in p.steps_per_s],
                               "noise": (p.meta or {}).get("noise")} for r, p in sps.profiles.items()},
              "benchmarks": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for bench in benches:
        prompts = [fit_prompt(target, prompt_ids(target.tokenizer, user_messages(turns[:1])), cfg,
                              prompt_label(bench, i, 0))[0] for i, turns in enumerate(bench.prompts)]
        pool = [prompts[i % len(prompts)] for i in range(max(len(prompts), max(rows)))]
        warm = pool[:min(2, len(pool))]
        for run in (lambda: decoder.generate_batch(warm, 8, sps=sps, eos_token_id=eos),
                    lambda: plain.generate_batch(warm, 8, eos_token_id=eos), lambda: hf(warm, 8)):
            run()  # allocator, kernels: excluded from every metric
        by_rows = {}
        for r in rows:
            print(f"{bench.name}: {len(pool)} requests, {r} at a time", flush=True)
            by_rows[r] = measure_concurrency(target, decoder, plain, hf, pool, r, cfg, sps, eos)
        if greedy:  # against one-at-a-time plain decoding: the R = 1 plain run, else decoded for the check
            reference = by_rows[1]["plain"]["outputs"] if 1 in by_rows else \
                [plain.generate(p, cfg.max_new_tokens, eos_token_id=eos).tokens for p in pool]
            lossless_check(target, pool, by_rows, reference)
        else:  # sampled outputs differ by design; the sampling law is checked by the tests (χ²)
            for entry in by_rows.values():
                for m in METHODS:
                    entry[m].pop("outputs")
                entry["speculative"]["lossless"] = None
        report["benchmarks"][bench.name] = {"requests": len(pool), "file": str(bench.path),
                                            "by_concurrency": {str(r): e for r, e in by_rows.items()}}
    write_concurrency(report, Path(cfg.out))
    print(render_concurrency(report))
    errors = [f"{b} R={r} request {d['request']} position {d['position']}" for b, e in report["benchmarks"].items()
              for r, x in e["by_concurrency"].items() for d in x["speculative"].get("divergences") or []
              if d["kind"] == "error"]
    if errors:
        raise LosslessError(f"batched greedy speculative output parted from plain decoding at "
                            f"{len(errors)} place(s): " + "; ".join(errors[:5]))
    return report


# --------------------------------------------------------------------------- report
def _f(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def render_concurrency(report: dict) -> str:
    from ..hardware import Capabilities
    where = Capabilities.from_dict(report["machine"]).describe()
    lines = [f"# Speculative vs plain decoding under load: {report['drafter']} on {report['target']}", "",
             f"machine {where} · dtype {report['dtype']} · temperature "
             f"{report['temperature']} · max_new_tokens {report['max_new_tokens']} · chain γ={report['gamma']}, "
             f"{'one batched drafter pass per round' if report['batched_drafting'] else 'drafted per request'}", "",
             "R requests decoded together (static batches); speedup against the faster plain decoder (ours: "
             "`generate_batch` without a drafter; hf: transformers' batched `generate`); latency per request from "
             "its batch's start (prefill included); verified = tokens per request per round in the verify forward "
             "(anchor included; computed = with the padding to the longest row); drafter = share of round time in "
             "drafting, and the drafter's own forwards per drafted round.", ""]
    for bname, b in report["benchmarks"].items():
        lines += [f"## {bname} ({b['requests']} requests)", "",
                  "| R | speculative tok/s | plain tok/s (ours / hf) | speedup | latency mean / p90 (s) | "
                  "plain latency mean / p90 (s) | τ | verified (computed) | drafted rounds | drafter share "
                  "| drafter fwd ms/round | lossless |", "|" + "---|" * 12]
        for r, e in b["by_concurrency"].items():
            s, p, h = e["speculative"], e["plain"], e["plain-hf"]
            fast = e[e["fastest_plain"]]
            lossless = ("n/a (sampling)" if "divergences" not in s else "yes" if s["lossless"] else
                        f"unproven ({s['unproven']} divergences, {report['dtype']})" if s["lossless"] is None else
                        f"**NO** ({s['errors']} errors)")
            lines.append(
                f"| {r} | {_f(s['tokens_per_s'], '.1f')} | {_f(p['tokens_per_s'], '.1f')} / "
                f"{_f(h['tokens_per_s'], '.1f')} | {_f(e['speedup'])}× (vs {e['fastest_plain']}) | "
                f"{_f(s['latency_mean_s'])} / {_f(s['latency_p90_s'])} | {_f(fast['latency_mean_s'])} / "
                f"{_f(fast['latency_p90_s'])} | {_f(s['tau'])} | {_f(s['verified_per_request_round'])} "
                f"({_f(s['computed_per_request_round'])}) | {s['drafted_rounds']}/{s['rounds']} | "
                f"{_f(s['drafter_share'], '.0%')} | {_f((s['drafter_forward_s_per_round'] or 0) * 1000, '.1f')} | "
                f"{lossless} |")
        lines.append("")
    return "\n".join(lines)


def write_concurrency(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONCURRENCY_JSON, json.dumps(report, indent=1) + "\n")
    write_atomic(out / CONCURRENCY_MD, render_concurrency(report))
    return [out / CONCURRENCY_JSON, out / CONCURRENCY_MD, plot_concurrency(report, out / CONCURRENCY_PLOT)]


def plot_concurrency(report: dict, path: Path) -> Path:
    """Speedup against the fastest plain decoding vs R, one line per benchmark (1.0: plain's speed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (bname, b) in enumerate(report["benchmarks"].items()):
        rs = [int(r) for r in b["by_concurrency"]]
        ax.plot(rs, [b["by_concurrency"][str(r)]["speedup"] for r in rs], "o-", color=f"C{i}", label=bname)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["concurrency"], [str(r) for r in report["concurrency"]])
    ax.set_xlabel("requests decoded together (R)")
    ax.set_ylabel("speedup vs fastest plain decoding")
    ax.set_title(f"{report['target']} · {report['device_name']} · T={report['temperature']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
