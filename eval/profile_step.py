"""Where one training step's time goes: target forward, p_t, drafter forward, backward, optimizer.

Measured with the trainer's own setup and loss on the recipe's data; with `train.feature_cache` on, the profiled
batches are cached first, so the table shows a cached epoch's step (cache read instead of target forward).

    python eval/profile_step.py recipes/smollm2_135m.yaml --set target.dtype=float32 --steps 8 --threads 2

Each phase is timed with wall-clock timers around the trainer's calls (the first `--warmup` steps are not
counted); prints a markdown table (mean ms per step, share) and writes it to `--out` as JSON when asked. Nothing
is saved to a run directory except the recipe's draft vocabulary ranking (label counts; seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dspark_train.config import load_recipe  # noqa: E402
from dspark_train.data import train_batch  # noqa: E402
from dspark_train.hardware import detect  # noqa: E402
from dspark_train.layout import RunDir  # noqa: E402
from dspark_train.losses import block_positions, dspark_loss, target_distribution  # noqa: E402
from dspark_train.train import (setup_accelerator, setup_data, setup_draft_vocab, setup_models,  # noqa: E402
                                setup_training, training_order)

PHASES = ("target forward", "cache read", "p_t (LM head at block slots)", "drafter forward + loss",
          "backward", "clip + optimizer")


def profile(recipe, steps: int, warmup: int) -> dict:
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
        totals, tokens = defaultdict(float), 0
        batches = [train_batch(data.train, order, i * cfg.batch_size, cfg.batch_size, recipe, gamma, pad_id)
                   for i in range(warmup + steps)]
        if tr.features.cache is not None:  # time the cached epochs: fill the cache with these batches first
            for b in batches:
                tr.features(b)
        tr.engine.train()
        for step in range(warmup + steps):
            t = {}
            mark = time.perf_counter()

            def lap(name):
                nonlocal mark
                now = time.perf_counter()
                t[name] = t.get(name, 0.0) + now - mark
                mark = now
            batch = batches[step]
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
            if step >= warmup:
                for k, v in t.items():
                    totals[k] += v
                tokens += batch.num_tokens
        total = sum(totals.values())
        return {"cpu": detect("cpu").describe(), "threads": torch.get_num_threads(), "dtype": recipe.target.dtype,
                "steps": steps, "batch_size": cfg.batch_size, "anchors_per_seq": recipe.data.anchors_per_seq,
                "tokens_per_step": tokens / steps, "step_ms": 1000 * total / steps,
                "phases": {k: {"ms": 1000 * totals[k] / steps, "share": totals[k] / total}
                           for k in PHASES if k in totals}}


def table(p: dict) -> str:
    rows = [f"| {k} | {v['ms']:.0f} | {v['share']:.0%} |" for k, v in p["phases"].items()]
    return "\n".join([
        f"{p['cpu']}, {p['threads']} thread(s), target {p['dtype']}, batch {p['batch_size']} × "
        f"{p['anchors_per_seq']} anchors, {p['tokens_per_step']:.0f} tokens/step, mean of {p['steps']} steps",
        "", "| phase | ms / step | share |", "|---|---|---|", *rows, f"| **step** | **{p['step_ms']:.0f}** | 100% |"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "smollm2_135m.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    ap.add_argument("--out", default=None, help="also write the profile as JSON here")
    args = ap.parse_args()
    overrides = ["logging.trackers=[]", *args.overrides]
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    p = profile(load_recipe(args.recipe, overrides), args.steps, args.warmup)
    print(table(p))
    if args.out:
        Path(args.out).write_text(json.dumps(p, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
