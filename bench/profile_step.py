"""Where one training step's time goes: target forward, p_t, drafter forward, backward, optimizer.

Measured with the trainer's own setup and loss on the recipe's data; with `data.feature_cache` on, the profiled
batches are cached first, so the table shows a cached epoch's step (cache read instead of target forward).

    python -m bench.profile_step recipes/smollm2_135m.yaml --set target.dtype=float32 --steps 8 --threads 2

Each phase is timed with wall-clock timers around the trainer's calls (the first `--warmup` steps are not
counted; "data" is building the batch: anchors, labels, padding); one more step counts each phase's FLOPs with
torch's FlopCounterMode (matmuls, attention), so the table also gives the achieved rate against this machine's
measured matmul peak (a 2048³ product in bf16 and fp32; the higher is the reference). Prints a markdown table and
writes it to `--out` as JSON when asked. Nothing is saved to a run directory except the recipe's draft vocabulary
ranking (label counts; seconds).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dspark_train.config import load_recipe
from dspark_train.data.examples import train_batch
from dspark_train.hardware import Capabilities, detect
from dspark_train.layout import RunDir
from dspark_train.training.losses import block_positions, dspark_loss, target_distribution
from dspark_train.training.loop import (setup_accelerator, setup_data, setup_draft_vocab, setup_models,
                                        setup_training, training_order)

REPO = Path(__file__).resolve().parent.parent

PHASES = ("data", "target forward", "cache read", "p_t (LM head at block slots)", "drafter forward + loss",
          "backward", "clip + optimizer")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """This machine's measured matmul rate (FLOP/s) for an n×n×n product in `dtype`, the best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def profile(recipe, steps: int, warmup: int) -> dict:
    """Mean wall time per phase over `steps` steps (after `warmup`), and each phase's FLOPs counted once by
    torch's FlopCounterMode (matmuls and attention) on an extra, untimed step."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = recipe.train
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        acc, sharded = setup_accelerator(recipe, run)
        target, drafter = setup_models(recipe, acc, sharded)
        gamma, pad_id = drafter.config.block_size, target.tokenizer.pad_token_id
        data = setup_data(recipe, run, acc, target.tokenizer, gamma)
        setup_draft_vocab(recipe, run, acc, target, drafter, data.train)
        tr = setup_training(recipe, run, acc, target, drafter, sharded, data)
        order = training_order(recipe, data.train, acc.num_processes)
        totals, flops, tokens = defaultdict(float), defaultdict(float), 0
        make = lambda i: train_batch(data.train, order, i * cfg.batch_size, cfg.batch_size, recipe, gamma,  # noqa
                                     pad_id)
        if tr.features.cache is not None:  # time the cached epochs: fill the cache with these batches first
            for i in range(warmup + steps + 1):
                tr.features(make(i))
        tr.engine.train()
        for step in range(warmup + steps + 1):
            counting = step == warmup + steps  # the last step only counts FLOPs
            t = {}
            mark = time.perf_counter()
            counter = None

            def lap(name):
                nonlocal mark, counter
                now = time.perf_counter()
                t[name] = t.get(name, 0.0) + now - mark
                if counter is not None:
                    counter.__exit__(None, None, None)
                    flops[name] += counter.get_total_flops()
                    counter = FlopCounterMode(display=False)
                    counter.__enter__()
                mark = time.perf_counter()

            if counting:
                counter = FlopCounterMode(display=False)
                counter.__enter__()
            batch = make(step)
            lap("data")
            features, last_hidden = tr.features(batch)
            lap("cache read" if tr.features.cache is not None else "target forward")
            pos, rows = block_positions(batch.anchor_pos, batch.valid, batch.input_ids.shape[1])
            p_t = target_distribution(last_hidden, tr.lm_head, pos, tr.drafter.draft_vocab,
                                      greedy=cfg.conf_label == "greedy")
            lap("p_t (LM head at block slots)")
            out = tr.engine(features.to(tr.dtype), last_hidden.to(tr.dtype), batch.input_ids, batch.anchor_pos)
            loss = dspark_loss(out.logits, out.conf_logits, p_t, rows, tr.drafter.to_draft_ids(batch.labels),
                               batch.valid, tr.position_weights, cfg.ce_weight, cfg.l1_weight, cfg.conf_weight,
                               cfg.conf_label, cfg.loss)
            lap("drafter forward + loss")
            acc.backward(loss.loss)
            lap("backward")
            acc.clip_grad_norm_(tr.engine.parameters(), cfg.grad_clip)
            tr.opt.step()
            tr.opt.zero_grad()
            lap("clip + optimizer")
            if counter is not None:
                counter.__exit__(None, None, None)
                flops["tokens"] = batch.num_tokens
            elif step >= warmup:
                for k, v in t.items():
                    totals[k] += v
                tokens += batch.num_tokens
        total = sum(totals.values())
        scale = (tokens / steps) / max(1, flops.pop("tokens"))  # the counted step's FLOPs, per mean step
        peak = {str(d).removeprefix("torch."): matmul_peak(d) for d in (torch.bfloat16, torch.float32)}
        return {"machine": detect("cpu").to_dict(), "threads": torch.get_num_threads(),
                "dtype": str(target.dtype).removeprefix("torch."), "steps": steps, "batch_size": cfg.batch_size,
                "anchors_per_seq": recipe.data.anchors_per_seq, "tokens_per_step": tokens / steps,
                "step_ms": 1000 * total / steps, "tokens_per_s": tokens / total, "matmul_peak_flops": peak,
                "phases": {k: {"ms": 1000 * totals[k] / steps, "share": totals[k] / total,
                               "gflop": flops.get(k, 0.0) * scale / 1e9}
                           for k in PHASES if k in totals}}


def table(p: dict) -> str:
    peak = max(p["matmul_peak_flops"].values())
    rows = []
    for k, v in p["phases"].items():
        rate = v["gflop"] / max(v["ms"], 1e-9)  # GFLOP per ms = TFLOP/s
        rows.append(f"| {k} | {v['ms']:.0f} | {v['share']:.0%} | {v['gflop']:.1f} | {rate:.2f} | "
                    f"{rate * 1e12 / peak:.0%} |")
    step_gflop = sum(v["gflop"] for v in p["phases"].values())
    step_rate = step_gflop / p["step_ms"]
    return "\n".join([
        f"{Capabilities.from_dict(p['machine']).describe()}, target {p['dtype']}, batch {p['batch_size']} × "
        f"{p['anchors_per_seq']} anchors, {p['tokens_per_step']:.0f} tokens/step ({p['tokens_per_s']:.0f} tok/s), "
        f"mean of {p['steps']} steps; measured matmul peak "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in p["matmul_peak_flops"].items()), "",
        "| phase | ms / step | share | GFLOP | TFLOP/s | of peak |", "|---|---|---|---|---|---|", *rows,
        f"| **step** | **{p['step_ms']:.0f}** | 100% | {step_gflop:.1f} | {step_rate:.2f} | "
        f"{step_rate * 1e12 / peak:.0%} |"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "smollm2_135m.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    ap.add_argument("--out", default=None, help="also write the profile here (a stem: <out>.json and <out>.md, "
                                                "eval/results/ form)")
    ap.add_argument("--title", default="Training step profile", help="the result's title (with --out)")
    args = ap.parse_args()
    overrides = ["logging.trackers=[]", *args.overrides]
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    p = profile(load_recipe(args.recipe, overrides), args.steps, args.warmup)
    print(table(p))
    if args.out:
        from bench.resultfile import write_result
        write_result(Path(args.out).with_suffix(""), p, table(p), args.title, p["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
