"""The trainer: online target features, the DSpark loss, accelerate (+ DeepSpeed ZeRO) and resumable checkpoints.

    python -m dspark_train.train RECIPE [--set k=v ...]                     one process
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m dspark_train.train RECIPE

`train` reads top to bottom: set up the accelerator, the target and drafter, the data, the draft vocabulary and
the optimizer; `restore` the latest checkpoint if there is one; then each step accumulates `loss_step` over
micro-batches, logs a `step_record`, evaluates and checkpoints on schedule; `save_final` writes the drafter.

Under DeepSpeed two plugins run side by side (launch.py): "drafter" (ZeRO-2/3, trained) and "target" (ZeRO-3
inference, the frozen target sharded across ranks). Checkpoints (checkpoint.py) are consolidated and world-size
free, and the data a step sees depends only on the global sample position (data.GlobalOrder), so a run resumes
at any number of processes, with or without DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Progress, gather_full_state, restore, save_checkpoint
from .config import Recipe, TrainConfig, exit_code, load_recipe, recipe_to_yaml
from .data import (Batch, Example, GlobalOrder, conversations_path, eval_batches, load_conversations,
                   split_heldout, tokenize, train_batch)
from .launch import deepspeed_plugins, resolve_mixed_precision
from .layout import HELDOUT_VERSION, RunDir, replace_dir, staging_dir, write_atomic
from .losses import LossOutput, block_positions, dspark_loss, position_weights, summarise, target_distribution
from .runlock import holds_lock
from .vocab import count_draft_tokens, load_draft_vocab, save_draft_vocab, select_draft_vocab


# =========================================================================== setup
def setup_accelerator(recipe: Recipe, run: RunDir) -> tuple[Any, bool]:
    """The seeded Accelerator: DeepSpeed plugins from the launch, a gloo/nccl process group across ranks.
    Returns (accelerator, whether the target is sharded under its own ZeRO-3 plugin)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from transformers.integrations import unset_hf_deepspeed_config

    train_cfg = recipe.train
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    plugins = deepspeed_plugins(recipe)
    handlers = []
    if plugins or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # without gloo on CPU every rank runs alone
        backend = recipe.distributed.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=60)))
    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision),
        gradient_accumulation_steps=train_cfg.grad_accum, deepspeed_plugins=plugins,
        log_with=recipe.logging.trackers or None, project_dir=str(run.root), kwargs_handlers=handlers)
    # accelerate registers the active DeepSpeed config with transformers, which would then build models inside
    # zero.Init (already sharded): the target must load whole, so the drafter can copy its embedding/LM head
    unset_hf_deepspeed_config()
    set_seed(train_cfg.seed)
    return acc, plugins is not None and "target" in plugins


def setup_models(recipe: Recipe, acc, sharded_target: bool):
    """The frozen target and the drafter built from it (it copies the target's embedding/LM head before any
    sharding). A sharded target stays where it loaded: DeepSpeed places its shards."""
    from .drafters import build_drafter
    from .target import load_target

    target = load_target(recipe.target)
    if not sharded_target:
        target.model.to(acc.device)
    return target, build_drafter(recipe.drafter, target)


@dataclass
class TrainingData:
    train: list[Example]
    heldout: list[Example]


def setup_data(recipe: Recipe, run: RunDir, acc, tokenizer, gamma: int) -> TrainingData:
    """Load the conversations, split off the held-out set, tokenise both. The main process records the resolved
    recipe and the held-out ids in the run directory (calibrate and export read them)."""
    data_cfg = recipe.data
    path = conversations_path(recipe)
    convs = load_conversations(path, data_cfg.max_prompts, data_cfg.skip_bad_lines)
    train_convs, held_convs = split_heldout(convs, data_cfg.heldout, data_cfg.seed)
    train_ex, dropped = tokenize(train_convs, tokenizer, data_cfg.max_seq_len, gamma)
    held_ex, held_dropped = tokenize(held_convs, tokenizer, data_cfg.max_seq_len, gamma)
    acc.print(f"data: {path.name}: {len(train_ex)} train / {len(held_ex)} held-out sequences, "
              f"{dropped + held_dropped} dropped as shorter than one block (γ+1 = {gamma + 1} supervised tokens)")
    if acc.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        write_atomic(run.recipe, recipe_to_yaml(recipe))
        write_atomic(run.heldout, json.dumps({"format_version": HELDOUT_VERSION, "conversations": str(path),
                                              "seed": data_cfg.seed, "ids": [str(c["id"]) for c in held_convs]},
                                             indent=1))
    return TrainingData(train_ex, held_ex)


def setup_draft_vocab(recipe: Recipe, run: RunDir, acc, target, drafter, examples: list[Example]) -> None:
    """Prune the drafter's vocabulary when `drafter.draft_vocab_size` asks: the run's recorded choice on a resume,
    else the top of `vocab.count_draft_tokens`' ranking (recorded for the resume)."""
    size = recipe.drafter.draft_vocab_size
    if not size or drafter.draft_vocab is not None:
        return
    if run.draft_vocab.is_file():
        vocab = load_draft_vocab(run.draft_vocab)
    else:
        counts = count_draft_tokens(target, examples, acc, recipe.train.batch_size, recipe.data.vocab_sample_seqs)
        vocab = select_draft_vocab(counts.cpu(), size, target.tokenizer)
        covered = float(counts[vocab.to(counts.device)].sum() / counts.sum().clamp_min(1))
        acc.print(f"draft vocabulary: {len(vocab)} of {target.vocab_size} tokens, {covered:.1%} of counted "
                  f"labels + target argmaxes")
        if acc.is_main_process:
            save_draft_vocab(run.draft_vocab, vocab)
    drafter.set_draft_vocab(vocab)


def lr_lambda(max_steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * max_steps)

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))
    return f


@dataclass
class Training:
    """What the loop works on, built by `setup_training` (plain fields, no behaviour)."""

    engine: Any  # the prepared drafter (DeepSpeed engine or wrapped module): forward, backward, accumulate
    drafter: Any  # the same drafter unwrapped: draft vocabulary, id mapping, config for the final save
    opt: Any  # the prepared optimizer: step / zero_grad
    raw_opt: torch.optim.AdamW  # the optimizer as built: its param groups (lr) and, without DeepSpeed, moments
    scheduler: torch.optim.lr_scheduler.LambdaLR
    named: list  # trainable (name, parameter) pairs in a fixed order: the checkpoint's keys
    target: Any  # the FrozenTarget
    lm_head: torch.Tensor  # the target's LM head weight on this device, taken before sharding: p_t
    dtype: torch.dtype  # the drafter's parameter dtype: target features are cast to it
    position_weights: torch.Tensor  # exp(−(k−1)/λ) per block slot


def setup_training(recipe: Recipe, acc, target, drafter, sharded_target: bool) -> Training:
    """AdamW + warmup-cosine schedule, then `prepare`: the trained drafter first, the frozen target under its own
    plugin second."""
    from transformers.integrations import unset_hf_deepspeed_config

    train_cfg = recipe.train
    lm_head = target.lm_head.weight.detach().to(acc.device)
    named = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    raw_opt = torch.optim.AdamW([p for _, p in named], lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_opt, lr_lambda(train_cfg.max_steps, train_cfg.warmup_ratio))
    engine, opt = acc.prepare(drafter, raw_opt)
    unwrapped = acc.unwrap_model(engine)
    unwrapped.attach_target(target)  # DeepSpeed casts parameters, not buffers: re-copy in the training dtype
    if sharded_target:
        acc.state.select_deepspeed_plugin("target")
        acc.prepare(target.model)
        acc.state.select_deepspeed_plugin("drafter")
    unset_hf_deepspeed_config()  # again (selecting re-registers): the final drafter is built plainly on rank 0
    weights = position_weights(unwrapped.config.block_size, train_cfg.decay_lambda).to(acc.device)
    return Training(engine, unwrapped, opt, raw_opt, scheduler, named, target, lm_head,
                    next(unwrapped.parameters()).dtype, weights)


# =========================================================================== one step, evaluation, logging
def loss_step(tr: Training, batch: Batch, train_cfg: TrainConfig) -> tuple[LossOutput, float]:
    """Target features → p_t at block positions → drafter → DSpark loss. Returns (LossOutput, target seconds)."""
    start = time.perf_counter()
    feats = tr.target.forward_features(batch.input_ids, batch.attention_mask)
    pos, rows = block_positions(batch.anchor_pos, batch.valid, batch.input_ids.shape[1])
    p_t = target_distribution(feats.last_hidden, tr.lm_head, pos, tr.drafter.draft_vocab,
                              greedy=train_cfg.conf_label == "greedy")
    target_s = time.perf_counter() - start
    out = tr.engine(feats.features.to(tr.dtype), feats.last_hidden.to(tr.dtype), batch.input_ids, batch.anchor_pos)
    loss = dspark_loss(out.logits, out.conf_logits, p_t, rows, tr.drafter.to_draft_ids(batch.labels), batch.valid,
                       tr.position_weights, train_cfg.ce_weight, train_cfg.l1_weight, train_cfg.conf_weight,
                       train_cfg.conf_label)
    return loss, target_s


def _flat_config(recipe: Recipe) -> dict:
    """Scalar-only recipe for tracker hparams (tensorboard rejects lists and None)."""
    out = {}
    for section, values in recipe.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class MetricsLog:
    """Each record as a JSON line in metrics.jsonl (main process; appended, so a resumed run re-logs the steps
    after its checkpoint) and its numbers to the trackers (wandb, tensorboard)."""

    def __init__(self, recipe: Recipe, run: RunDir, acc):
        self.acc = acc
        if recipe.logging.trackers:
            acc.init_trackers(recipe.logging.project, config=_flat_config(recipe), init_kwargs={
                "wandb": {"name": recipe.logging.run_name or run.root.name, "dir": str(run.root)}})
        self.file = open(run.metrics, "a") if acc.is_main_process else None
        if self.file and self.file.tell() and run.metrics.read_bytes()[-1:] != b"\n":
            self.file.write("\n")  # a line torn by a kill: keep the next record on its own line

    def __call__(self, record: dict, step: int) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
            self.file.flush()
        self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()


@torch.no_grad()
def evaluate(tr: Training, batches: list[Batch], train_cfg: TrainConfig, acc, log: MetricsLog, step: int) -> dict:
    """Held-out L1 / CE / confidence BCE / τ_sim / acceptance by position, summed over ranks, printed and logged."""
    tr.engine.eval()
    sums = None
    for b in batches:
        out, _ = loss_step(tr, b.to(acc.device), train_cfg)
        sums = out.sums if sums is None else sums + out.sums
    tr.engine.train()
    ev = summarise(acc.reduce(sums, "sum"))
    acc.print(f"eval step {step}: L1 {ev['l1']:.4f}  CE {ev['ce']:.3f}  τ_sim {ev['tau']:.3f}  acc/pos "
              + " ".join(f"{a:.2f}" for a in ev["acc"]), flush=True)
    log({"eval/l1": ev["l1"], "eval/ce": ev["ce"], "eval/conf_bce": ev["conf_bce"], "eval/tau": ev["tau"],
         **{f"eval/acc_{k + 1}": a for k, a in enumerate(ev["acc"])}}, step)
    return ev


def step_record(acc, loss: float, sums: torch.Tensor, target_s: float, seconds: float, tokens: int, lr: float,
                grad_norm) -> dict:
    """One optimizer step's record, reduced over ranks: loss and its parts, lr, gradient norm, tokens (total and
    per rank), throughput, and the time split between the target's forward and the drafter's step."""
    world = acc.num_processes
    stats = acc.reduce(torch.tensor([loss / world, target_s, seconds - target_s], device=acc.device), "sum")
    rank_tokens = acc.gather(torch.tensor([tokens], device=acc.device)).tolist()
    parts = summarise(acc.reduce(sums, "sum"))
    target_s, drafter_s = float(stats[1]) / world, float(stats[2]) / world
    return {"train/loss": float(stats[0]), "train/ce": parts["ce"], "train/l1": parts["l1"],
            "train/conf_bce": parts["conf_bce"], "train/tau": parts["tau"], "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "train/tokens": sum(rank_tokens), "train/rank_tokens": rank_tokens,
            "train/tokens_per_s": sum(rank_tokens) / seconds,
            "time/target_s": target_s, "time/drafter_s": drafter_s,
            "time/drafter_target_ratio": drafter_s / max(target_s, 1e-9)}


def show_step(bar, acc, rec: dict, step: int, log_every: int) -> None:
    """Advance the progress bar; every `log_every` steps print a summary line."""
    bar.update(1)
    bar.set_postfix(loss=f"{rec['train/loss']:.4f}", l1=f"{rec['train/l1']:.3f}",
                    tok_s=f"{rec['train/tokens_per_s']:.0f}")
    if step % log_every == 0:
        line = (f"step {step}: loss {rec['train/loss']:.4f}  L1 {rec['train/l1']:.4f}  lr {rec['train/lr']:.2e}  "
                f"{rec['train/tokens_per_s']:.0f} tok/s  drafter/target time {rec['time/drafter_target_ratio']:.2f}")
        if bar.disable:
            acc.print(line, flush=True)
        else:
            bar.write(line)


# =========================================================================== the final drafter
def save_final(acc, run: RunDir, tr: Training, progress: Progress, data: TrainingData, ev: dict) -> None:
    """<run>/final: a plain drafter with the consolidated fp32 weights, `save_pretrained` into a staging dir and
    renamed into place; train_summary.json beside it. Collective: every rank calls."""
    weights, _ = gather_full_state(acc, tr.named, tr.raw_opt, with_moments=False)
    if not acc.is_main_process:
        return
    final = type(tr.drafter)(tr.drafter.config)  # same config: pruned shapes and d2t/t2d buffers included
    keys = final.state_dict().keys()
    final.load_state_dict({**weights, **{n: b.cpu() for n, b in tr.drafter.named_buffers() if n in keys}})
    staging = staging_dir(run.final)
    shutil.rmtree(staging, ignore_errors=True)
    final.save_pretrained(staging)
    replace_dir(staging, run.final)
    write_atomic(run.train_summary, json.dumps({
        "steps": progress.step, "tokens": progress.tokens,
        "tokens_per_s": progress.tokens / max(progress.seconds, 1e-9), "world_size": acc.num_processes,
        "train_sequences": len(data.train), "heldout_sequences": len(data.heldout),
        "final": {k: v for k, v in ev.items() if k != "acc"} | {"acc_by_position": ev.get("acc")}}, indent=1))
    print(f"final drafter saved to {run.final}", flush=True)


# =========================================================================== training
@holds_lock(lambda recipe: recipe.resolve_path(recipe.train.output_dir), "dspark train", main_process_only=True)
def train(recipe: Recipe) -> Path:
    """Train the recipe's drafter; returns the run directory (final drafter in <run>/final). The main process
    holds the run directory's lock throughout (runlock.py): a second trainer on it is refused."""
    from tqdm.auto import tqdm

    train_cfg = recipe.train
    run = RunDir(recipe.resolve_path(train_cfg.output_dir))
    acc, sharded_target = setup_accelerator(recipe, run)
    world, rank = acc.num_processes, acc.process_index
    resume = run.latest_checkpoint()
    acc.print(f"resuming from {resume}" if resume else f"starting {run.root}", flush=True)
    target, drafter = setup_models(recipe, acc, sharded_target)
    gamma, pad_id = drafter.config.block_size, target.tokenizer.pad_token_id
    data = setup_data(recipe, run, acc, target.tokenizer, gamma)
    setup_draft_vocab(recipe, run, acc, target, drafter, data.train)
    tr = setup_training(recipe, acc, target, drafter, sharded_target)
    progress = restore(resume, acc, tr.engine, tr.named, tr.raw_opt, tr.scheduler) if resume else Progress()

    held = eval_batches(data.heldout, train_cfg.batch_size, rank, world, recipe.data.anchors_per_seq, gamma, pad_id)
    order = GlobalOrder(len(data.train), recipe.data.seed)
    log = MetricsLog(recipe, run, acc)
    ev = evaluate(tr, held, train_cfg, acc, log, progress.step) if progress.step == 0 and held else {}
    bar = tqdm(total=train_cfg.max_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (acc.is_main_process and recipe.logging.progress_bar))
    tr.engine.train()
    while progress.step < train_cfg.max_steps:
        started, loss, sums, target_s, tokens = time.perf_counter(), 0.0, None, 0.0, 0
        for micro in range(train_cfg.grad_accum):  # ranks and micro-batches take consecutive global positions
            start = progress.position + (micro * world + rank) * train_cfg.batch_size
            batch = train_batch(data.train, order, start, train_cfg.batch_size, recipe, gamma, pad_id).to(acc.device)
            with acc.accumulate(tr.engine):
                out, batch_target_s = loss_step(tr, batch, train_cfg)
                acc.backward(out.loss)
                grad_norm = (acc.clip_grad_norm_(tr.engine.parameters(), train_cfg.grad_clip)
                             if acc.sync_gradients else None)
                tr.opt.step()
                tr.opt.zero_grad()
            loss += float(out.loss.detach()) / train_cfg.grad_accum
            sums = out.sums if sums is None else sums + out.sums
            target_s += batch_target_s
            tokens += batch.num_tokens
        lr = tr.scheduler.get_last_lr()[0]
        tr.scheduler.step()
        seconds = time.perf_counter() - started
        rec = step_record(acc, loss, sums, target_s, seconds, tokens, lr, grad_norm)
        step = progress.advance(train_cfg.batch_size * world * train_cfg.grad_accum, rec["train/tokens"], seconds)
        log(rec, step)
        show_step(bar, acc, rec, step, train_cfg.log_every)
        if held and (step % train_cfg.eval_every == 0 or step == train_cfg.max_steps):
            ev = evaluate(tr, held, train_cfg, acc, log, step)
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.max_steps:
            save_checkpoint(acc, run, progress, tr.named, tr.raw_opt, tr.scheduler, train_cfg.keep_checkpoints)
    bar.close()
    if held and not ev:  # a rerun of a finished run
        ev = evaluate(tr, held, train_cfg, acc, log, progress.step)
    save_final(acc, run, tr, progress, data, ev)
    log.close()
    acc.end_training()
    return run.root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_train.train", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return exit_code(lambda: train(load_recipe(args.recipe, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
