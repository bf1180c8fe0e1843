"""Where a decoding round's time goes, phase by phase, and how close the measured speedup comes to its bound.

On the real target (SmolLM2-135M-Instruct, dtype auto) with a drafter artifact (default: the demo's), over the
first --n prompts of each benchmark, plain `generate` and the speculative decoder run interleaved per prompt in
each mode (chain, tree, adaptive, hybrid). Each round's wall time is split by the phase timings the decoder records
in its RoundTrace (clock reads at its own phase boundaries, the device synchronised): target verify forward, LM
head, drafter propose (backbone), head steps, tree building (the rest of drafting), copy drafter (hybrid: query,
merge, budget, index update), mask and position ids, acceptance, KV-cache update, context extension, trace and
stop checks, other (the round's wall time outside them: the loop itself). Each phase is given in ms per round and as
a fraction of one plain decoding step t1 measured in the same run.

Bound: with τ the tokens a round commits, B its verified tokens and SPS(B) the measured cost curve (target
steps per second at B tokens, this run), a round cannot cost less than 1/SPS(B) + the drafter's forwards
(propose + head steps + context extension), so the speedup over plain decoding is at most
Σ τ · t1 / Σ (1/SPS(B) + t_drafter). efficiency = measured decode speedup ÷ that bound (1.0: every other cost is
zero); overhead = round cost − verify − drafter, as a fraction of t1.

    python -m bench.bench_round [ARTIFACT] [--benchmarks gsm8k,humaneval] [--n 4] [--max-new-tokens 96]
        [--modes chain,tree,adaptive,hybrid] [--threads 2] [--out eval/results/round-<cpu>.json]

Name the CPU next to every figure (the JSON and the table do); compare variants only within one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark_train.artifacts.reader import load_artifact
from dspark_train.data.chat import prompt_ids, user_messages
from dspark_train.decoding import SpeculativeDecoder, measure_sps
from dspark_train.evaluation.evaluate import generation_kwargs, hf_method, load_benchmark, target_config
from dspark_train.hardware import detect
from dspark_train.target import load_target
from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent

PHASES = ("verify", "lm head", "propose", "head steps", "tree build", "copy drafter", "mask + positions",
          "acceptance", "kv update", "context extension", "trace + stop", "other")
DRAFTER_PHASES = ("propose", "head steps", "context extension")


def phases(r) -> dict[str, float]:
    """One round's seconds by phase (all but "other"), from the timings the decoder recorded (RoundTrace)."""
    return {"verify": r.t_verify - r.t_lm_head, "lm head": r.t_lm_head, "propose": r.t_propose,
            "head steps": r.t_head_steps,
            "tree build": r.t_draft - r.t_propose - r.t_head_steps - r.t_copy - r.t_mask - r.t_extend,
            "copy drafter": r.t_copy, "mask + positions": r.t_mask, "acceptance": r.t_accept, "kv update": r.t_kv,
            "context extension": r.t_extend, "trace + stop": r.t_book - r.t_accept - r.t_kv}


def run_mode(target, dec, plain, prompts, mode: str, max_new: int, sps: dict) -> dict:
    """Interleaved plain / speculative decodes of every prompt in `mode`; the phase table and the bound."""
    hybrid = mode == "hybrid"
    gen = lambda p, n: dec.generate(p, n, mode=mode, hybrid=hybrid)  # noqa: E731
    gen(prompts[0], 8)  # warm-up (allocations, policy resolution)
    plain(prompts[0], 8)
    t_plain = n_plain = t_spec = n_spec = t_pre = 0.0
    rounds = []
    for i, p in enumerate(prompts):
        for who in ((0, 1) if i % 2 == 0 else (1, 0)):  # alternate who goes first: drift cancels
            if who == 0:
                t0 = time.perf_counter()
                ids, _ = plain(p, max_new)
                t_plain += time.perf_counter() - t0
                n_plain += len(ids)
            else:
                t0 = time.perf_counter()
                tr = gen(p, max_new)
                t_spec += time.perf_counter() - t0
                n_spec += len(tr.tokens)
                t_pre += tr.t_prefill
                rounds += tr.rounds
    n_rounds = len(rounds)
    decode_s = t_spec - t_pre
    split = [phases(r) for r in rounds]
    per_round = {k: 1e3 * sum(ph[k] for ph in split) / n_rounds for k in PHASES if k != "other"}
    round_ms = 1e3 * decode_s / n_rounds
    per_round["other"] = max(0.0, round_ms - sum(per_round.values()))
    t1 = (t_plain - t_pre) / max(1.0, n_plain - len(prompts))  # plain seconds per decoded token (prefill out)
    tau = statistics.fmean(r.n_accepted + 1 for r in rounds)
    verified = [len(r.tokens) + 1 for r in rounds]
    drafter_ms = sum(per_round[k] for k in DRAFTER_PHASES)
    curve = dict(zip(sps["tokens"], sps["steps_per_s"]))
    floor_s = sum(1.0 / curve[min(b, max(curve))] for b in verified) + drafter_ms / 1e3 * n_rounds
    committed = sum(r.committed for r in rounds)
    bound = committed * t1 / floor_s
    speedup = (t1 * (n_spec - len(prompts))) / decode_s
    return {"mode": mode, "rounds": n_rounds, "tau": round(tau, 3), "verified_per_round": round(statistics.fmean(
        verified), 2), "t1_ms": round(1e3 * t1, 2), "round_ms": round(round_ms, 2),
        "phases_ms": {k: round(v, 3) for k, v in per_round.items()},
        "phases_of_step": {k: round(v / (1e3 * t1), 4) for k, v in per_round.items()},
        "overhead_of_step": round((round_ms - per_round["verify"] - per_round["lm head"] - drafter_ms) / (1e3 * t1),
                                  4),
        "tokens_per_s": round(n_spec / t_spec, 2), "plain_tokens_per_s": round(n_plain / t_plain, 2),
        "speedup": round((n_spec / t_spec) / (n_plain / t_plain), 3), "decode_speedup": round(speedup, 3),
        "bound": round(bound, 3), "efficiency": round(speedup / bound, 3)}


def table(results: list[dict]) -> str:
    modes = [r["mode"] for r in results]
    lines = ["| phase (ms per round; × t1) | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for k in PHASES:
        lines.append(f"| {k} | " + " | ".join(f"{r['phases_ms'][k]:.2f} ({r['phases_of_step'][k]:.3f})"
                                              for r in results) + " |")
    for label, key, fmt in (("round ms", "round_ms", ".2f"), ("t1 ms (plain step)", "t1_ms", ".2f"),
                            ("τ", "tau", ".2f"), ("verified / round", "verified_per_round", ".1f"),
                            ("overhead × t1", "overhead_of_step", ".3f"), ("speedup", "speedup", ".3f"),
                            ("bound", "bound", ".3f"), ("efficiency", "efficiency", ".3f")):
        lines.append(f"| **{label}** | " + " | ".join(format(r[key], fmt) for r in results) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", default="runs/demo/artifact")
    ap.add_argument("--benchmarks", default="gsm8k,humaneval")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--modes", default="chain,tree,adaptive,hybrid")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None, help="JSON (default eval/results/round-<cpu>[-label].json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(target_config(None, Path(args.artifact), args.dtype))
    drafter = load_artifact(args.artifact, target=target)
    dec = SpeculativeDecoder(target, drafter, calibration=drafter.calibration)
    prompts = []
    for name in args.benchmarks.split(","):
        bench = load_benchmark(name, args.data_root, args.n)
        prompts += [prompt_ids(target.tokenizer, user_messages(t[:1])) for t in bench.prompts]
    plain = hf_method(target.model, generation_kwargs(target))
    prof = measure_sps(target, max_tokens=64, context=256)
    sps = {"tokens": list(prof.tokens), "steps_per_s": list(prof.steps_per_s)}
    machine = detect(target.device.type)
    print(f"{machine.describe()}; {target.name} {target.precision}; {len(prompts)} prompts × {args.max_new_tokens} "
          "new tokens; SPS(1, 8, 16, 32) = " + ", ".join(f"{sps['steps_per_s'][b - 1]:.1f}" for b in (1, 8, 16, 32)),
          flush=True)
    results = []
    for mode in args.modes.split(","):
        if mode == "adaptive" and drafter.calibration is None:
            continue
        results.append(run_mode(target, dec, plain, prompts, mode, args.max_new_tokens, sps))
        print(f"{mode}: τ {results[-1]['tau']:.2f}, speedup {results[-1]['speedup']:.3f}, "
              f"efficiency {results[-1]['efficiency']:.3f}", flush=True)
    print(table(results))
    label = f"-{args.label}" if args.label else ""
    stem = Path(args.out or REPO / "eval" / "results" / f"round-{machine.slug}{label}")
    head = (f"Decoder round cost ({args.label or 'this tree'}): {args.artifact}, {len(prompts)} prompts of "
            f"{args.benchmarks} × {args.max_new_tokens} new tokens, {target.precision.value}, "
            f"{torch.get_num_threads()} threads.")
    out = write_result(stem.with_suffix(""), {"label": args.label, "dtype": target.precision.value,
                                               "threads": torch.get_num_threads(), "artifact": args.artifact,
                                               "sps": sps, "prompts": len(prompts),
                                               "max_new_tokens": args.max_new_tokens, "results": results},
                       head + "\n\n" + table(results), f"Round cost breakdown{': ' + args.label if args.label else ''}",
                       machine.to_dict())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
