"""The trainer: online target features, the DSpark loss, accelerate (+ DeepSpeed ZeRO) and resumable checkpoints.

    python -m dspark_train.train RECIPE [--set k=v ...]                     one process
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m dspark_train.train RECIPE

Under DeepSpeed two plugins run side by side (accelerate's multi-plugin support): "drafter" from the launch's
DeepSpeed config (ZeRO-2/3, trained) and "target" (ZeRO-3 inference, the frozen target sharded across ranks).

Checkpoints are consolidated and world-size free: full fp32 master weights and AdamW moments by parameter
name, the scheduler, per-rank RNG and the *global* data position (samples consumed). So a run resumes at any
number of processes, with or without DeepSpeed. Each is written to a temp dir and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from .config import REPO_ROOT, Recipe, RecipeError, exit_code, load_recipe, recipe_to_yaml
from .data import GlobalOrder, conversations_path, eval_batches, load_conversations, split_heldout, tokenize, train_batch
from .losses import block_positions, dspark_loss, position_weights, summarise, target_distribution
from .vocab import count_draft_tokens, select_draft_vocab

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
ACCELERATE_DIR = REPO_ROOT / "recipes" / "accelerate"


# =========================================================================== launch
def build_launch_command(recipe: Recipe, recipe_path, overrides=()) -> list[str]:
    """The command `dspark train` runs: plain python for one process, else `accelerate launch` with the
    recipe's accelerate config (default zero2/zero3.yaml by `distributed.zero_stage`, multi_node.yaml
    across machines)."""
    d = recipe.distributed
    tail = ["-m", "dspark_train.train", str(recipe_path)] + [a for o in overrides for a in ("--set", o)]
    if d.accelerate_config is None and d.num_processes == 1 and d.num_machines == 1:
        return [sys.executable] + tail
    if d.accelerate_config:
        config = recipe.resolve_path(d.accelerate_config)
        ds = []
    else:
        if d.zero_stage not in (2, 3):
            raise RecipeError(f"{recipe.source}: distributed.zero_stage: {d.zero_stage} has no bundled accelerate "
                              "config (use 2 or 3, or set distributed.accelerate_config)")
        multi = d.num_machines > 1
        config = ACCELERATE_DIR / ("multi_node.yaml" if multi else f"zero{d.zero_stage}.yaml")
        ds = ["--deepspeed_config_file", str(ACCELERATE_DIR / f"ds_zero{d.zero_stage}.json")] if multi else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *ds,
           "--num_processes", str(d.num_processes), "--num_machines", str(d.num_machines)]
    if d.num_machines > 1:
        if not d.main_process_ip:
            raise RecipeError(f"{recipe.source}: distributed.main_process_ip: required with num_machines > 1")
        cmd += ["--machine_rank", str(d.machine_rank), "--main_process_ip", d.main_process_ip,
                "--main_process_port", str(d.main_process_port)]
    return cmd + tail


# =========================================================================== setup helpers
def resolve_mixed_precision(setting: str) -> str:
    """"auto" = bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def _deepspeed_plugins(recipe: Recipe) -> Optional[dict]:
    """{"drafter": launch config with the recipe's batch/accumulation/clipping, "target": ZeRO-3 inference}."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    t, world = recipe.train, int(os.environ.get("WORLD_SIZE", "1"))
    src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if src != "none":
        path = Path(src) if Path(src).is_file() else REPO_ROOT / src  # bundled configs name repo-relative paths
        cfg = json.loads(path.read_text())
    else:  # inline deepspeed_config in the accelerate YAML
        cfg = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE",
                                                                   recipe.distributed.zero_stage))}}
    cfg.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
               train_batch_size=t.batch_size * t.grad_accum * world, gradient_clipping=t.grad_clip)
    plugins = {"drafter": DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)}
    if recipe.distributed.target_zero_stage == 3:
        dt = recipe.target.dtype
        plugins["target"] = DeepSpeedPlugin(hf_ds_config={  # the frozen model's batch size must be explicit
            "zero_optimization": {"stage": 3, "overlap_comm": False},
            "train_micro_batch_size_per_gpu": t.batch_size, "train_batch_size": t.batch_size * world,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": dt == "bfloat16"}, "fp16": {"enabled": dt == "float16"}}, zero3_init_flag=False)
    return plugins


def _flat_config(recipe: Recipe) -> dict:
    """Scalar-only recipe for tracker hparams (tensorboard rejects lists and None)."""
    out = {}
    for section, values in recipe.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def lr_lambda(max_steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * max_steps)

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))
    return f


# =========================================================================== checkpoints
def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType
    return acc.distributed_type == DistributedType.DEEPSPEED


def gather_full_state(acc, named: list, raw_opt, with_moments: bool = True) -> tuple[dict, dict]:
    """Full fp32 master weights (and AdamW moments) by name; collective under DeepSpeed: every rank calls."""
    if _is_deepspeed(acc):
        from deepspeed.utils import safe_get_full_fp32_param as get_weight
        from deepspeed.utils import safe_get_full_optimizer_state as get_moment
    else:
        def get_weight(p):
            return p.detach()

        def get_moment(p, k):  # a parameter that never had a gradient has no state yet
            return raw_opt.state.get(p, {}).get(k, torch.zeros_like(p))
    weights, moments = {}, {}
    for name, p in named:
        weights[name] = get_weight(p).float().cpu()
        for k in ADAM_KEYS if with_moments else ():
            moments[f"{name}.{k}"] = get_moment(p, k).float().cpu()
    return weights, moments


@torch.no_grad()
def restore_optimizer(acc, engine, named: list, raw_opt, weights: dict, moments: dict, step: int) -> None:
    """Put saved masters and moments into the (possibly ZeRO-partitioned) optimizer after `prepare`."""
    if not _is_deepspeed(acc):
        raw_opt.load_state_dict({"state": {i: {"step": torch.tensor(float(step)),
                                               **{k: moments[f"{n}.{k}"].to(p) for k in ADAM_KEYS}}
                                           for i, (n, p) in enumerate(named)},
                                 "param_groups": raw_opt.state_dict()["param_groups"]})
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zo = engine.optimizer  # AdamW state is created lazily at the first step: create it, then fill it
    zero3 = hasattr(zo, "fp32_partitioned_groups_flat")
    for flat in zo.fp32_partitioned_groups_flat if zero3 else zo.single_partition_of_fp32_groups:
        zo.optimizer.state[flat] = {"step": torch.tensor(float(step)),
                                    **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
    if not zero3:  # ZeRO-1/2: link each parameter's views into the new state
        zo._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        for k in (None, *ADAM_KEYS):
            value = (weights[name] if k is None else moments[f"{name}.{k}"]).to(acc.device)
            if zero3:
                _zero3_set_partition(zo, p, value, k)
            elif k is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, k)


def _zero3_set_partition(zo, p, value: torch.Tensor, key: Optional[str]) -> None:
    """This rank's slice of a full fp32 tensor into ZeRO-3's partition. (DeepSpeed's safe_set_full_* skips
    the padding of parameters whose size is not a multiple of the world size, and fails on them.)"""
    part, _ = zo._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, r = part.numel(), zo._get_param_partition_rank(p)
    padded = torch.zeros(n * zo._get_param_partition_world_size(p), dtype=part.dtype, device=part.device)
    padded[:value.numel()] = value.flatten()
    part.copy_(padded[r * n:(r + 1) * n])


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(acc, run: Path, step: int, state: dict, engine, named, raw_opt, scheduler, keep: int) -> Path:
    """checkpoints/step-N written to a temp dir then renamed; `latest` replaced atomically; old ones pruned."""
    from safetensors.torch import save_file

    ckpts = run / "checkpoints"
    final, tmp = ckpts / f"step-{step:06d}", ckpts / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        for stale in ckpts.glob(".tmp-step-*"):  # left by a kill during an earlier save
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_file(_rng_state(), str(tmp / f"rng-{acc.process_index}.safetensors"))
    weights, moments = gather_full_state(acc, named, raw_opt)
    if acc.is_main_process:
        save_file(weights, str(tmp / "drafter.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {**state, "scheduler": scheduler.state_dict(), "world_size": acc.num_processes}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = ckpts / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, ckpts / "latest")
        for old in sorted(ckpts.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def latest_checkpoint(run: Path) -> Optional[Path]:
    pointer = run / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


# =========================================================================== evaluation
@torch.no_grad()
def evaluate(batches, step_fn, acc) -> dict:
    sums = None
    for b in batches:
        out, _ = step_fn(b.to(acc.device))
        sums = out.sums if sums is None else sums + out.sums
    return summarise(acc.reduce(sums, "sum"))


# =========================================================================== training
def train(recipe: Recipe) -> Path:
    """Train the recipe's drafter; returns the run directory (final drafter in <run>/final)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers.integrations import unset_hf_deepspeed_config

    from .drafters import build_drafter
    from .target import load_target

    t, d = recipe.train, recipe.data
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run = recipe.resolve_path(t.output_dir)
    plugins = _deepspeed_plugins(recipe)
    handlers = []
    if plugins or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # without gloo on CPU every rank runs alone
        backend = recipe.distributed.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=60)))
    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(t.mixed_precision), gradient_accumulation_steps=t.grad_accum,
        deepspeed_plugins=plugins, log_with=recipe.logging.trackers or None, project_dir=str(run),
        kwargs_handlers=handlers)
    world, rank = acc.num_processes, acc.process_index
    # accelerate registers the active DeepSpeed config with transformers, which would then build models inside
    # zero.Init (already sharded): the target must load whole, so the drafter can copy its embedding/LM head
    unset_hf_deepspeed_config()
    set_seed(t.seed)
    resume = latest_checkpoint(run)
    state = json.loads((resume / "trainer_state.json").read_text()) if resume else {"step": 0, "position": 0}
    acc.print(f"resuming from {resume}" if resume else f"starting {run}", flush=True)

    # ---- target, data, drafter (the drafter copies the target's embedding/LM head before any sharding)
    target = load_target(recipe.target)
    sharded_target = plugins is not None and "target" in plugins
    if not sharded_target:  # a sharded target stays where it loaded; DeepSpeed places its shards
        target.model.to(acc.device)
    tok = target.tokenizer
    drafter = build_drafter(recipe.drafter, target)
    gamma = drafter.config.block_size
    conv_path = conversations_path(recipe)
    convs = load_conversations(conv_path, d.max_prompts)
    train_convs, held_convs = split_heldout(convs, d.heldout, d.seed)
    train_ex, dropped = tokenize(train_convs, tok, d.max_seq_len, gamma)
    held_ex, held_dropped = tokenize(held_convs, tok, d.max_seq_len, gamma)
    acc.print(f"data: {conv_path.name}: {len(train_ex)} train / {len(held_ex)} held-out sequences, "
              f"{dropped + held_dropped} dropped as shorter than one block (γ+1 = {gamma + 1} supervised tokens)")
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (run / "heldout_ids.json").write_text(json.dumps(
            {"conversations": str(conv_path), "seed": d.seed, "ids": [str(c["id"]) for c in held_convs]}, indent=1))

    vocab_file = run / "draft_vocab.json"
    if recipe.drafter.draft_vocab_size and drafter.draft_vocab is None:
        if vocab_file.is_file():
            vocab = torch.tensor(json.loads(vocab_file.read_text()))
        else:
            counts = count_draft_tokens(target, train_ex, acc, t.batch_size, d.vocab_sample_seqs)
            vocab = select_draft_vocab(counts.cpu(), recipe.drafter.draft_vocab_size, tok)
            covered = float(counts[vocab.to(counts.device)].sum() / counts.sum().clamp_min(1))
            acc.print(f"draft vocabulary: {len(vocab)} of {target.vocab_size} tokens, {covered:.1%} of counted "
                      f"labels + target argmaxes")
            if acc.is_main_process:
                vocab_file.write_text(json.dumps(vocab.tolist()))
        drafter.set_draft_vocab(vocab)
    lm_w = target.lm_head.weight.detach().to(acc.device)  # p_t reference, taken before the target is sharded

    named = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    if resume:
        saved_w = load_file(str(resume / "drafter.safetensors"))
        saved_m = load_file(str(resume / "optimizer.safetensors"))
        missing = {n for n, _ in named} ^ set(saved_w)
        if missing:
            raise RecipeError(f"{resume}: checkpoint does not match the recipe's drafter ({sorted(missing)[:4]}…)")
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved_w[n])
    raw_opt = torch.optim.AdamW([p for _, p in named], lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_opt, lr_lambda(t.max_steps, t.warmup_ratio))
    if resume:
        scheduler.load_state_dict(state["scheduler"])
        for g, lr in zip(raw_opt.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr

    # ---- prepare: the trained model first, then the frozen target under its own plugin
    engine, opt = acc.prepare(drafter, raw_opt)
    unwrapped = acc.unwrap_model(engine)
    unwrapped.attach_target(target)  # DeepSpeed casts parameters, not buffers: re-copy in the training dtype
    if sharded_target:
        acc.state.select_deepspeed_plugin("target")
        acc.prepare(target.model)
        acc.state.select_deepspeed_plugin("drafter")
    unset_hf_deepspeed_config()  # again (selecting re-registers): the final drafter is built plainly on rank 0
    draft_vocab = unwrapped.draft_vocab
    if resume:
        restore_optimizer(acc, engine, named, raw_opt, saved_w, saved_m, state["step"])
        rng = resume / f"rng-{rank}.safetensors"
        if rng.is_file():  # absent when this rank did not exist in the saving run
            saved_rng = load_file(str(rng))
            torch.set_rng_state(saved_rng["cpu"])
            if "cuda" in saved_rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(saved_rng["cuda"])
        del saved_w, saved_m
    ddtype = next(unwrapped.parameters()).dtype
    weights = position_weights(gamma, t.decay_lambda).to(acc.device)

    def step_fn(batch):
        """Target features → p_t at block positions → drafter → loss. Returns (LossOutput, target seconds)."""
        t0 = time.perf_counter()
        feats = target.forward_features(batch.input_ids, batch.attention_mask)
        pos, rows = block_positions(batch.anchor_pos, batch.valid, batch.input_ids.shape[1])
        p_t = target_distribution(feats.last_hidden, lm_w, pos, draft_vocab, greedy=t.conf_label == "greedy")
        t_target = time.perf_counter() - t0
        out = engine(feats.features.to(ddtype), feats.last_hidden.to(ddtype), batch.input_ids, batch.anchor_pos)
        loss = dspark_loss(out.logits, out.conf_logits, p_t, rows, unwrapped.to_draft_ids(batch.labels),
                           batch.valid, weights, t.ce_weight, t.l1_weight, t.conf_weight,
                           t.conf_label)
        return loss, t_target

    held = eval_batches(held_ex, t.batch_size, rank, world, d.anchors_per_seq, gamma, tok.pad_token_id)
    order = GlobalOrder(len(train_ex), d.seed)
    if recipe.logging.trackers:
        acc.init_trackers(recipe.logging.project, config=_flat_config(recipe),
                          init_kwargs={"wandb": {"name": recipe.logging.run_name or run.name, "dir": str(run)}})
    metrics = open(run / "metrics.jsonl", "a") if acc.is_main_process else None
    if metrics and metrics.tell() and (run / "metrics.jsonl").read_bytes()[-1:] != b"\n":
        metrics.write("\n")  # a line torn by a kill: keep the next record on its own line

    def log(record: dict, step: int):
        if metrics:
            metrics.write(json.dumps({"step": step, **record}) + "\n")
            metrics.flush()
        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def run_eval(step: int) -> dict:
        engine.eval()
        ev = evaluate(held, step_fn, acc)
        engine.train()
        acc.print(f"eval step {step}: L1 {ev['l1']:.4f}  CE {ev['ce']:.3f}  τ_sim {ev['tau']:.3f}  acc/pos "
                  + " ".join(f"{a:.2f}" for a in ev["acc"]), flush=True)
        log({"eval/l1": ev["l1"], "eval/ce": ev["ce"], "eval/conf_bce": ev["conf_bce"], "eval/tau": ev["tau"],
             **{f"eval/acc_{k + 1}": a for k, a in enumerate(ev["acc"])}}, step)
        return ev

    step, position = state["step"], state["position"]
    ev = run_eval(step) if step == 0 and held else {}
    global_batch = t.batch_size * world * t.grad_accum
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (acc.is_main_process and recipe.logging.progress_bar))
    totals = {"tokens": state.get("tokens", 0), "seconds": state.get("seconds", 0.0)}
    engine.train()
    while step < t.max_steps:
        t0, t_target, tokens = time.perf_counter(), 0.0, 0
        loss_sum, sums = 0.0, None
        for m in range(t.grad_accum):
            start = position + (m * world + rank) * t.batch_size
            batch = train_batch(train_ex, order, start, t.batch_size, recipe, gamma, tok.pad_token_id).to(acc.device)
            with acc.accumulate(engine):
                out, tt = step_fn(batch)
                acc.backward(out.loss)
                grad_norm = acc.clip_grad_norm_(engine.parameters(), t.grad_clip) if acc.sync_gradients else None
                opt.step()
                opt.zero_grad()
            t_target += tt
            tokens += batch.num_tokens
            loss_sum += float(out.loss.detach()) / t.grad_accum
            sums = out.sums if sums is None else sums + out.sums
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        position += global_batch
        dt = time.perf_counter() - t0
        stats = acc.reduce(torch.tensor([loss_sum / world, t_target, dt - t_target], device=acc.device), "sum")
        rank_tokens = acc.gather(torch.tensor([tokens], device=acc.device)).tolist()
        s = summarise(acc.reduce(sums, "sum"))
        totals["tokens"] += sum(rank_tokens)
        totals["seconds"] += dt
        target_s, drafter_s = float(stats[1]) / world, float(stats[2]) / world
        rec = {"train/loss": float(stats[0]), "train/ce": s["ce"], "train/l1": s["l1"],
               "train/conf_bce": s["conf_bce"], "train/tau": s["tau"], "train/lr": lr,
               "train/grad_norm": float(grad_norm) if grad_norm is not None else None, "train/tokens": sum(rank_tokens),
               "train/rank_tokens": rank_tokens, "train/tokens_per_s": sum(rank_tokens) / dt,
               "time/target_s": target_s, "time/drafter_s": drafter_s,
               "time/drafter_target_ratio": drafter_s / max(target_s, 1e-9)}
        log(rec, step)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['train/loss']:.4f}", l1=f"{s['l1']:.3f}", tok_s=f"{rec['train/tokens_per_s']:.0f}")
        if step % t.log_every == 0:
            line = (f"step {step}: loss {rec['train/loss']:.4f}  L1 {s['l1']:.4f}  lr {lr:.2e}  "
                    f"{rec['train/tokens_per_s']:.0f} tok/s  drafter/target time {rec['time/drafter_target_ratio']:.2f}")
            bar.write(line) if not bar.disable else acc.print(line, flush=True)
        if held and (step % t.eval_every == 0 or step == t.max_steps):
            ev = run_eval(step)
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save_checkpoint(acc, run, step, {"step": step, "position": position, **totals}, engine, named,
                            raw_opt, scheduler, t.keep_checkpoints)
    bar.close()
    if held and not ev:  # a rerun of a finished run
        ev = run_eval(step)

    # ---- final drafter: a plain copy with the consolidated fp32 weights, saved with save_pretrained
    weights_full, _ = gather_full_state(acc, named, raw_opt, with_moments=False)
    if acc.is_main_process:
        final = type(unwrapped)(unwrapped.config)  # same config: pruned shapes and d2t/t2d buffers included
        keys = final.state_dict().keys()
        final.load_state_dict({**weights_full, **{n: b.cpu() for n, b in unwrapped.named_buffers() if n in keys}})
        tmp = run / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp)
        shutil.rmtree(run / "final", ignore_errors=True)
        os.rename(tmp, run / "final")
        (run / "train_summary.json").write_text(json.dumps({
            "steps": step, "tokens": totals["tokens"], "tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
            "world_size": world, "train_sequences": len(train_ex), "heldout_sequences": len(held_ex),
            "final": {k: v for k, v in ev.items() if k != "acc"} | {"acc_by_position": ev.get("acc")}}, indent=1))
        metrics.close()
        print(f"final drafter saved to {run / 'final'}", flush=True)
    acc.end_training()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_train.train", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return exit_code(lambda: train(load_recipe(args.recipe, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
