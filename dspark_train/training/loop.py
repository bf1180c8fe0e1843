"""The trainer: online target features, the DSpark loss, accelerate (+ DeepSpeed ZeRO) and resumable checkpoints.

    python -m dspark_train.train RECIPE [--set k=v ...]                     one process
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m dspark_train.train RECIPE

`train` reads top to bottom: set up the accelerator, the target and drafter, the data, the draft vocabulary and
the optimizer; `restore` the latest checkpoint if there is one; fix the schedule's horizon (`setup_budget`: the
recipe's max_steps, or a throughput probe under `train.max_minutes`, schedule.py); then each `train_step`
accumulates `loss_step` over micro-batches and logs a `step_record`, the loop evaluates (every `eval_every` steps
and at the `eval_at_minutes` points of the training clock) and checkpoints on schedule; `save_final` writes the
drafter. Target features come online or through the feature cache (`data.feature_cache`, feature_cache.py).

Under DeepSpeed two plugins run side by side (launch.py): "drafter" (ZeRO-2/3, trained) and "target" (ZeRO-3
inference, the frozen target sharded across ranks). Checkpoints (checkpoint.py) are consolidated and world-size
free, and the data a step sees depends only on the global sample position (data.GlobalOrder), so a run resumes
at any number of processes, with or without DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import Progress, gather_full_state, restore, save_checkpoint
from ..config import Recipe, RecipeError, TrainConfig, exit_code, load_recipe, recipe_to_yaml
from ..data.examples import (Batch, Example, GlobalOrder, conversations_paths, eval_batches, load_conversations,
                             split_heldout, tokenize, train_batch)
from ..data.feature_cache import FeatureSource, open_cache
from ..hardware import record_lines, resolve_mixed_precision, run_record
from ..runrecord import save_heldout_split
from .launch import deepspeed_plugins
from .logs import MetricsLog, show_step, step_record
from ..layout import RunDir, replace_dir, staging_dir, write_atomic
from .losses import LossOutput, block_positions, dspark_loss, position_weights, summarise, target_distribution
from .optim import build_optimizer
from .schedule import Budget, Horizon, blend_alpha, probe_horizon, probe_step_seconds
from ..runlock import holds_lock
from ..data.vocab import count_draft_tokens, load_draft_vocab, save_draft_vocab, select_draft_vocab


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
        mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision).value,
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
    from ..drafters import build_drafter
    from ..target import load_target

    target = load_target(recipe.target, acc.device.type)
    if not sharded_target:
        target.model.to(acc.device)
    return target, build_drafter(recipe.drafter, target)


@dataclass
class TrainingData:
    train: list[Example]
    heldout: list[Example]
    paths: list[Path]  # the conversation files (the feature cache's data key)


def setup_data(recipe: Recipe, run: RunDir, acc, tokenizer, gamma: int, notes: Sequence[str] = ()) -> TrainingData:
    """Load the conversations, split off the held-out set, tokenise both. The main process records the resolved
    recipe (headed by `notes` as comments: what `auto` chose) and the held-out ids in the run directory
    (calibrate and export read them)."""
    data_cfg = recipe.data
    paths = conversations_paths(recipe)
    convs = load_conversations(paths, data_cfg.max_prompts, data_cfg.skip_bad_lines)
    train_convs, held_convs = split_heldout(convs, data_cfg.heldout, data_cfg.seed)
    train_ex, dropped = tokenize(train_convs, tokenizer, data_cfg.max_seq_len, gamma)
    held_ex, held_dropped = tokenize(held_convs, tokenizer, data_cfg.max_seq_len, gamma)
    acc.print(f"data: {' + '.join(p.name for p in paths)}: {len(train_ex)} train / {len(held_ex)} held-out sequences, "
              f"{dropped + held_dropped} dropped as shorter than one block (γ+1 = {gamma + 1} supervised tokens)")
    if acc.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        write_atomic(run.recipe, recipe_to_yaml(recipe, notes))
        save_heldout_split(run.heldout, paths, data_cfg.seed, held_convs)
    return TrainingData(train_ex, held_ex, paths)


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
        what = "training labels" + (" + target argmaxes" if recipe.data.vocab_sample_seqs else "")
        acc.print(f"draft vocabulary: {len(vocab)} of {target.vocab_size} tokens, {covered:.1%} of counted {what}")
        if acc.is_main_process:
            save_draft_vocab(run.draft_vocab, vocab)
    drafter.set_draft_vocab(vocab)


def training_order(recipe: Recipe, examples: list[Example], world: int) -> GlobalOrder:
    """The global sample order, length-grouped by optimizer step (batch_size × processes × grad_accum samples, the
    same for any split of a step) in chunks of `data.length_group_batches` steps."""
    step = recipe.train.batch_size * world * recipe.train.grad_accum
    return GlobalOrder(len(examples), recipe.data.seed, [len(e.input_ids) for e in examples],
                       recipe.data.length_group_batches * step, step)


@dataclass
class Training:
    """What the loop works on, built by `setup_training` (plain fields, no behaviour)."""

    engine: Any  # the prepared drafter (DeepSpeed engine or wrapped module): forward, backward, accumulate
    drafter: Any  # the same drafter unwrapped: draft vocabulary, id mapping, config for the final save
    opt: Any  # the prepared optimizer: step / zero_grad
    raw_opt: torch.optim.Optimizer  # the optimizer as built (optim.py): param groups (lr), moments without DeepSpeed
    scheduler: torch.optim.lr_scheduler.LambdaLR
    horizon: Horizon  # the schedule the scheduler follows (changed in place by the probe, a resume, re-estimates)
    named: list  # trainable (name, parameter) pairs in a fixed order: the checkpoint's keys
    target: Any  # the FrozenTarget
    features: FeatureSource  # training batches' target features: online, or through the feature cache
    lm_head: torch.Tensor  # the target's LM head weight on this device, taken before sharding: p_t
    dtype: torch.dtype  # the drafter's parameter dtype: target features are cast to it
    position_weights: torch.Tensor  # exp(−(k−1)/λ) per block slot


def setup_training(recipe: Recipe, run: RunDir, acc, target, drafter, sharded_target: bool,
                   data: TrainingData) -> Training:
    """Optimizer (AdamW, or Muon + AdamW) + warmup-cosine schedule over max_steps (a time budget re-aims it in
    `setup_budget`), then `prepare`: the trained drafter first, the frozen target under its own plugin second;
    the feature cache when the recipe asks for one."""
    from accelerate.utils import DistributedType
    from transformers.integrations import unset_hf_deepspeed_config

    train_cfg = recipe.train
    if train_cfg.optimizer == "muon" and acc.distributed_type == DistributedType.DEEPSPEED:
        raise RecipeError(f"{recipe.source}: train.optimizer: muon is not supported under DeepSpeed ZeRO (it needs "
                          "whole 2-D matrices; ZeRO partitions flattened parameters): use adamw, or launch without "
                          "DeepSpeed")
    lm_head = target.lm_head.weight.detach().to(acc.device)
    named = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    raw_opt = build_optimizer(named, train_cfg)
    horizon = Horizon.fixed(train_cfg.max_steps, train_cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_opt, lambda step: horizon.lr_factor(step))
    engine, opt = acc.prepare(drafter, raw_opt)
    unwrapped = acc.unwrap_model(engine)
    unwrapped.attach_target(target)  # DeepSpeed casts parameters, not buffers: re-copy in the training dtype
    if sharded_target:
        acc.state.select_deepspeed_plugin("target")
        acc.prepare(target.model)
        acc.state.select_deepspeed_plugin("drafter")
    unset_hf_deepspeed_config()  # again (selecting re-registers): the final drafter is built plainly on rank 0
    weights = position_weights(unwrapped.config.block_size, train_cfg.decay_lambda).to(acc.device)
    dtype = next(unwrapped.parameters()).dtype
    cache = open_cache(recipe, run.feature_cache, target, data.paths, acc.process_index)
    if cache is not None:
        acc.print(f"feature cache: {cache.dir} ({cache.fmt}, {len(cache.entries)} sequences stored)")
    features = FeatureSource(target, cache, dtype, acc, sharded_target)
    return Training(engine, unwrapped, opt, raw_opt, scheduler, horizon, named, target, features, lm_head, dtype,
                    weights)


def setup_budget(recipe: Recipe, acc, tr: Training, progress: Progress, probe_batches, epoch_size: int) -> Budget:
    """The schedule's horizon: a resumed run's recorded one; under `train.max_minutes` a fresh run's comes from a
    throughput probe (schedule.py), whose seconds go on the training clock; else max_steps."""
    train_cfg = recipe.train
    if progress.schedule:
        restored = Horizon.from_dict(progress.schedule)
        tr.horizon.warmup, tr.horizon.changes = restored.warmup, restored.changes
    elif train_cfg.max_minutes is not None:
        start = time.perf_counter()
        tr.engine.eval()
        with torch.no_grad():
            per_step = probe_step_seconds(lambda b: loss_step(tr, b.to(acc.device), train_cfg)[1], probe_batches())
        tr.engine.train()
        per_step = float(acc.reduce(torch.tensor([per_step * train_cfg.grad_accum], device=acc.device), "mean"))
        progress.seconds += float(acc.reduce(torch.tensor([time.perf_counter() - start], device=acc.device), "mean"))
        fresh = probe_horizon(per_step, 60.0 * train_cfg.max_minutes - progress.seconds, train_cfg.max_steps,
                              train_cfg.warmup_ratio)
        tr.horizon.warmup, tr.horizon.changes = fresh.warmup, fresh.changes
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.raw_opt, lambda step: tr.horizon.lr_factor(step))
        acc.print(f"time budget {train_cfg.max_minutes:g} min: probe {per_step:.2f} s/step → horizon "
                  f"{tr.horizon.steps} steps (warmup {tr.horizon.warmup})", flush=True)
    progress.schedule = tr.horizon.to_dict()
    return Budget(tr.horizon, train_cfg.max_steps, train_cfg.max_minutes, train_cfg.eval_at_minutes,
                  progress.step, progress.seconds, progress.position // epoch_size)


# =========================================================================== one step, evaluation, logging
def loss_step(tr: Training, batch: Batch, train_cfg: TrainConfig, blend: Optional[float] = None,
              evaluating: bool = False) -> tuple[LossOutput, float]:
    """Target features (the feature source in training, the target itself in evaluation) → p_t at block positions
    → drafter → DSpark loss. Returns (LossOutput, target seconds). Evaluation also carries the target's argmax,
    for the greedy acceptance statistics."""
    start = time.perf_counter()
    if evaluating:
        f = tr.target.forward_features(batch.input_ids, batch.attention_mask)
        features, last_hidden = f.features, f.last_hidden
    else:
        features, last_hidden = tr.features(batch)
    pos, rows = block_positions(batch.anchor_pos, batch.valid, batch.input_ids.shape[1])
    p_t = target_distribution(last_hidden, tr.lm_head, pos, tr.drafter.draft_vocab,
                              greedy=evaluating or train_cfg.conf_label == "greedy")
    target_s = time.perf_counter() - start
    out = tr.engine(features.to(tr.dtype), last_hidden.to(tr.dtype), batch.input_ids, batch.anchor_pos)
    loss = dspark_loss(out.logits, out.conf_logits, p_t, rows, tr.drafter.to_draft_ids(batch.labels), batch.valid,
                       tr.position_weights, train_cfg.ce_weight, train_cfg.l1_weight, train_cfg.conf_weight,
                       train_cfg.conf_label, train_cfg.loss, blend)
    return loss, target_s



@torch.no_grad()
def evaluate(tr: Training, batches: list[Batch], train_cfg: TrainConfig, acc, log: MetricsLog, progress: Progress,
             at_minutes: tuple = ()) -> dict:
    """Held-out L1 / CE / confidence BCE / τ_sim (soft) / τ_greedy / acceptance by position, summed over ranks,
    printed and logged with where training stands (steps, tokens, training-clock seconds; `at_minutes`: the
    wall-clock points this evaluation stands for)."""
    start = time.perf_counter()
    tr.engine.eval()
    sums = None
    blend = blend_alpha(train_cfg, progress.step, tr.horizon)
    for b in batches:
        out, _ = loss_step(tr, b.to(acc.device), train_cfg, blend, evaluating=True)
        sums = out.sums if sums is None else sums + out.sums
    tr.engine.train()
    ev = summarise(acc.reduce(sums, "sum"))
    acc.print(f"eval step {progress.step} ({progress.seconds / 60:.1f} train min): L1 {ev['l1']:.4f}  "
              f"CE {ev['ce']:.3f}  τ_sim {ev['tau']:.3f}  τ_greedy {ev['tau_greedy']:.3f}  acc/pos "
              + " ".join(f"{a:.2f}" for a in ev["acc"]), flush=True)
    log({"eval/l1": ev["l1"], "eval/ce": ev["ce"], "eval/conf_bce": ev["conf_bce"], "eval/div": ev["div"],
         "eval/tau": ev["tau"], "eval/tau_greedy": ev["tau_greedy"],
         **{f"eval/acc_{k + 1}": a for k, a in enumerate(ev["acc"])},
         **{f"eval/survival_greedy_{k + 1}": a for k, a in enumerate(ev["survival_greedy"])},
         "eval/train_seconds": progress.seconds, "eval/tokens": progress.tokens,
         "eval/seconds": time.perf_counter() - start, **({"eval/at_minutes": list(at_minutes)} if at_minutes else {})},
        progress.step)
    return ev


# =========================================================================== the final drafter
def save_final(acc, run: RunDir, tr: Training, progress: Progress, data: TrainingData, ev: dict,
               hardware: Optional[dict] = None) -> None:
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
    cache = tr.features.cache
    write_atomic(run.train_summary, json.dumps({
        "steps": progress.step, "tokens": progress.tokens, "train_seconds": progress.seconds,
        "tokens_per_s": progress.tokens / max(progress.seconds, 1e-9), "world_size": acc.num_processes,
        "schedule": progress.schedule,
        "feature_cache": cache.stats(len(tr.target.feature_layers) + 1, tr.target.hidden_size) if cache else None,
        "train_sequences": len(data.train), "heldout_sequences": len(data.heldout), "hardware": hardware,
        "final": {k: v for k, v in ev.items() if k != "acc"} | {"acc_by_position": ev.get("acc")}}, indent=1))
    print(f"final drafter saved to {run.final}", flush=True)


# =========================================================================== training
def train_step(tr: Training, recipe: Recipe, data: TrainingData, order: GlobalOrder, progress: Progress, acc,
               gamma: int, pad_id: int) -> dict:
    """One optimizer step over grad_accum micro-batches (ranks and micro-batches take consecutive global
    positions); advances `progress` (the training clock by the rank-averaged step time) and returns the record."""
    train_cfg, world, rank = recipe.train, acc.num_processes, acc.process_index
    started, loss, sums, target_s, tokens = time.perf_counter(), 0.0, None, 0.0, 0
    blend = blend_alpha(train_cfg, progress.step, tr.horizon)
    for micro in range(train_cfg.grad_accum):
        start = progress.position + (micro * world + rank) * train_cfg.batch_size
        batch = train_batch(data.train, order, start, train_cfg.batch_size, recipe, gamma, pad_id).to(acc.device)
        with acc.accumulate(tr.engine):
            out, batch_target_s = loss_step(tr, batch, train_cfg, blend)
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
    rec = step_record(acc, loss, sums, target_s, time.perf_counter() - started, tokens, lr, grad_norm)
    progress.advance(train_cfg.batch_size * world * train_cfg.grad_accum, rec["train/tokens"], rec["time/step_s"])
    rec |= {"train/seconds": progress.seconds, "train/horizon": tr.horizon.steps,
            "train/epoch": progress.position / len(data.train)}
    return rec


@holds_lock(lambda recipe: recipe.resolve_path(recipe.train.output_dir), "dspark train", main_process_only=True)
def train(recipe: Recipe) -> Path:
    """Train the recipe's drafter (its main process holding the run's lock); returns the run directory."""
    from tqdm.auto import tqdm

    train_cfg = recipe.train
    run = RunDir(recipe.resolve_path(train_cfg.output_dir))
    acc, sharded_target = setup_accelerator(recipe, run)
    world, rank = acc.num_processes, acc.process_index
    resume = run.latest_checkpoint()
    acc.print(f"resuming from {resume}" if resume else f"starting {run.root}", flush=True)
    target, drafter = setup_models(recipe, acc, sharded_target)
    hardware = run_record(acc.device.type, target.precision, recipe.train.mixed_precision)
    acc.print("\n".join(record_lines(hardware)), flush=True)
    gamma, pad_id = drafter.config.block_size, target.tokenizer.pad_token_id
    data = setup_data(recipe, run, acc, target.tokenizer, gamma, record_lines(hardware))
    setup_draft_vocab(recipe, run, acc, target, drafter, data.train)
    tr = setup_training(recipe, run, acc, target, drafter, sharded_target, data)
    progress = restore(resume, acc, tr.engine, tr.named, tr.raw_opt, tr.scheduler) if resume else Progress()

    held = eval_batches(data.heldout, train_cfg.batch_size, rank, world,
                        recipe.data.eval_anchors_per_seq or recipe.data.anchors_per_seq, gamma, pad_id)
    order = training_order(recipe, data.train, world)
    budget = setup_budget(recipe, acc, tr, progress, lambda: [train_batch(
        data.train, order, progress.position + (i * world + rank) * train_cfg.batch_size, train_cfg.batch_size,
        recipe, gamma, pad_id) for i in range(3)], len(data.train))
    log = MetricsLog(recipe, run, acc)
    ev = evaluate(tr, held, train_cfg, acc, log, progress) if progress.step == 0 and held else {}
    bar = tqdm(total=tr.horizon.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (acc.is_main_process and recipe.logging.progress_bar))
    tr.engine.train()
    while not budget.done(progress.step, progress.seconds):
        rec = train_step(tr, recipe, data, order, progress, acc, gamma, pad_id)
        step = progress.step
        if budget.observe(step, progress.seconds, progress.position // len(data.train)):
            bar.total = tr.horizon.steps
            progress.schedule = tr.horizon.to_dict()
        log(rec, step)
        show_step(bar, acc, rec, step, train_cfg.log_every)
        done, due = budget.done(step, progress.seconds), budget.due_evals(progress.seconds)
        if held and (step % train_cfg.eval_every == 0 or due or done):
            at = due + (budget.remaining_evals(progress.seconds) if done else [])
            ev = evaluate(tr, held, train_cfg, acc, log, progress, tuple(at))
        if step % train_cfg.checkpoint_every == 0 or done:
            save_checkpoint(acc, run, progress, tr.named, tr.raw_opt, tr.scheduler, train_cfg.keep_checkpoints)
    bar.close()
    if held and not ev:  # a rerun of a finished run
        ev = evaluate(tr, held, train_cfg, acc, log, progress)
    save_final(acc, run, tr, progress, data, ev, hardware)
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
