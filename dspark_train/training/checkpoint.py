"""Resumable checkpoints that do not depend on the world size or on DeepSpeed.

A checkpoint (`RunDir.checkpoint(step)`, files named by `layout.CheckpointFiles`) holds the full fp32 master
weights and optimizer state by parameter name (AdamW moments, or Muon's momentum: `optim.moment_keys`), the
scheduler and its horizon (`Progress.schedule`, schedule.py), each rank's RNG and the *global* data position
(samples consumed), so a run resumes at any number of processes, with or without DeepSpeed ZeRO-2/3. It is
written into a staging directory and renamed into place, then `checkpoints/latest` is replaced atomically: a
kill at any moment leaves the previous checkpoint intact. `restore` puts everything back in one call.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import RecipeError
from ..layout import (TRAINER_STATE_VERSION, ArtifactError, CheckpointFiles, RunDir, check_version, read_json,
                      replace_dir, staging_dir, write_atomic)
from .optim import ADAM_KEYS, moment_keys, set_moments


@dataclass
class Progress:
    """Where training stands: optimizer steps taken, global samples consumed, totals for the summary (`seconds` is
    the training clock: rank-averaged step time, evaluation excluded) and the schedule's horizon record."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    seconds: float = 0.0
    schedule: dict = field(default_factory=dict)  # schedule.Horizon.to_dict()

    def advance(self, samples: int, tokens: int, seconds: float) -> int:
        """Count one optimizer step that consumed `samples` global positions; returns the new step."""
        self.step += 1
        self.position += samples
        self.tokens += tokens
        self.seconds += seconds
        return self.step


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType
    return acc.distributed_type == DistributedType.DEEPSPEED


def _is_zero3(param) -> bool:
    return hasattr(param, "ds_id")  # how DeepSpeed marks a ZeRO-3 partitioned parameter


# =========================================================================== gathering (save side)
def gather_full_state(acc, named: list, raw_opt, with_moments: bool = True) -> tuple[dict, dict]:
    """Full fp32 master weights (and optimizer moments) by name; collective under DeepSpeed: every rank calls."""
    deepspeed = _is_deepspeed(acc)
    if deepspeed:
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
        for k in (ADAM_KEYS if deepspeed else moment_keys(raw_opt, p)) if with_moments else ():
            moments[f"{name}.{k}"] = get_moment(p, k).float().cpu()
    return weights, moments


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(acc, run: RunDir, progress: Progress, named: list, raw_opt, scheduler, keep: int) -> Path:
    """Write `run.checkpoint(step)` through its staging dir, point `latest` at it, prune all but `keep`.
    Collective: every rank calls (each saves its RNG; DeepSpeed gathers the partitions)."""
    from safetensors.torch import save_file

    final = run.checkpoint(progress.step)
    staging = CheckpointFiles(staging_dir(final))
    if acc.is_main_process:
        for stale in run.staged_checkpoints():  # left by a kill during an earlier save
            shutil.rmtree(stale)
        staging.root.mkdir(parents=True)
    acc.wait_for_everyone()
    save_file(_rng_state(), str(staging.rng(acc.process_index)))
    weights, moments = gather_full_state(acc, named, raw_opt)
    if acc.is_main_process:
        save_file(weights, str(staging.weights))
        save_file(moments, str(staging.optimizer))
        staging.trainer_state.write_text(json.dumps(
            {"format_version": TRAINER_STATE_VERSION, **asdict(progress), "scheduler": scheduler.state_dict(),
             "world_size": acc.num_processes}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(staging.root, final)
        write_atomic(run.latest_pointer, final.name)
        for old in run.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


# =========================================================================== restoring
def restore(path: Path, acc, engine, named: list, raw_opt, scheduler) -> Progress:
    """Everything a resume needs, after `acc.prepare`: the model's weights, the fp32 masters and AdamW moments
    (ZeRO-partitioned or not), the scheduler and learning rate, this rank's RNG; returns the data position."""
    ckpt = CheckpointFiles(path)
    state = read_json(ckpt.trainer_state)
    check_version(state, ckpt.trainer_state, TRAINER_STATE_VERSION,
                  "resume with the dspark-train that wrote it, or train into a new train.output_dir")
    weights, moments = _load_tensors(ckpt.weights), _load_tensors(ckpt.optimizer)
    mismatch = {n for n, _ in named} ^ set(weights)
    if mismatch:
        raise RecipeError(f"{path}: checkpoint does not match the recipe's drafter ({sorted(mismatch)[:4]}…)")
    _restore_weights(acc, named, weights)
    restore_optimizer(acc, engine, named, raw_opt, weights, moments, state["step"])
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(raw_opt.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rng = ckpt.rng(acc.process_index)
    if rng.is_file():  # absent when this rank did not exist in the saving run
        saved_rng = _load_tensors(rng)
        torch.set_rng_state(saved_rng["cpu"])
        if "cuda" in saved_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved_rng["cuda"])
    return Progress(state["step"], state["position"], state.get("tokens", 0), state.get("seconds", 0.0),
                    state.get("schedule", {}))


def _load_tensors(path: Path) -> dict:
    """A checkpoint file's tensors, or one line naming the file (a corrupted or truncated one: move its
    checkpoint directory aside and the run resumes from the one before)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); move "
                            f"{path.parent.name}/ aside (and fix checkpoints/latest) to resume from an earlier one") \
            from None


@torch.no_grad()
def _restore_weights(acc, named: list, weights: dict) -> None:
    """The weights the forward pass reads. ZeRO-1/2 and plain runs hold every parameter whole on each rank;
    ZeRO-3 holds a shard, so the parameters are gathered, set on rank 0 and re-partitioned on exit."""
    params = [p for _, p in named]
    if not (_is_deepspeed(acc) and any(_is_zero3(p) for p in params)):
        for n, p in named:
            p.copy_(weights[n])
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if acc.is_main_process:
            for n, p in named:
                p.copy_(weights[n])


@torch.no_grad()
def restore_optimizer(acc, engine, named: list, raw_opt, weights: dict, moments: dict, step: int) -> None:
    """Put saved masters and moments into the (possibly ZeRO-partitioned) optimizer after `prepare`."""
    if not _is_deepspeed(acc):
        try:
            set_moments(raw_opt, named, moments, step, "checkpoint")
        except ValueError as e:
            raise RecipeError(str(e)) from None
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
