"""How a training run is launched: the process command and the DeepSpeed plugins.

`dspark train` runs `build_launch_command`'s command: plain python for one process, else `accelerate launch`
with a bundled or user accelerate config, tied to itself (runlock.run_tied; each rank ties itself to accelerate's
agent at its start, runlock.tie_to_launcher): no trainer or rank outlives the `dspark train` that started it.
Inside the launched trainer, `deepspeed_plugins` builds accelerate's two DeepSpeed plugins from the launch
environment: "drafter" (the launch's ZeRO-2/3 config, with the recipe's batch, accumulation and clipping written
in) and "target" (ZeRO-3 inference, the frozen target sharded). Mixed precision and the target dtype resolve
through hardware.py (`auto`: bf16 only where the hardware computes it).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .. import shipped
from ..config import Recipe, RecipeError
from ..hardware import resolve_dtype
from ..layout import read_json


def build_launch_command(recipe: Recipe, recipe_path, overrides=()) -> list[str]:
    """The command `dspark train` runs: plain python for one process, else `accelerate launch` with the
    recipe's accelerate config (default: the shipped zero2/zero3.yaml by `distributed.zero_stage`, multi_node.yaml
    across machines)."""
    dist = recipe.distributed
    tail = ["-m", "dspark_train.train", str(recipe_path)] + [a for o in overrides for a in ("--set", o)]
    if dist.accelerate_config is None and dist.num_processes == 1 and dist.num_machines == 1:
        return [sys.executable] + tail
    if dist.accelerate_config:
        config = recipe.resolve_path(dist.accelerate_config)
        ds = []
    else:
        if dist.zero_stage not in (2, 3):
            raise RecipeError(f"{recipe.source}: distributed.zero_stage: {dist.zero_stage} has no bundled "
                              "accelerate config (use 2 or 3, or set distributed.accelerate_config)")
        multi, bundled = dist.num_machines > 1, shipped.accelerate_dir()
        config = bundled / ("multi_node.yaml" if multi else f"zero{dist.zero_stage}.yaml")
        ds = ["--deepspeed_config_file", str(bundled / f"ds_zero{dist.zero_stage}.json")] if multi else []
    # --quiet: the trainer has printed its error; accelerate's launcher adds no traceback of its own after it
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(config), *ds,
           "--num_processes", str(dist.num_processes), "--num_machines", str(dist.num_machines)]
    if dist.num_machines > 1:
        if not dist.main_process_ip:
            raise RecipeError(f"{recipe.source}: distributed.main_process_ip: required with num_machines > 1")
        cmd += ["--machine_rank", str(dist.machine_rank), "--main_process_ip", dist.main_process_ip,
                "--main_process_port", str(dist.main_process_port)]
    return cmd + tail


def deepspeed_plugins(recipe: Recipe) -> Optional[dict]:
    """{"drafter": launch config with the recipe's batch/accumulation/clipping, "target": ZeRO-3 inference};
    None when the launch did not ask for DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    train_cfg, world = recipe.train, int(os.environ.get("WORLD_SIZE", "1"))
    src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if src != "none":
        ds_config = read_json(shipped.deepspeed_file(src))
    else:  # inline deepspeed_config in the accelerate YAML
        ds_config = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE",
                                                                         recipe.distributed.zero_stage))}}
    ds_config.update(train_micro_batch_size_per_gpu=train_cfg.batch_size,
                     gradient_accumulation_steps=train_cfg.grad_accum,
                     train_batch_size=train_cfg.batch_size * train_cfg.grad_accum * world,
                     gradient_clipping=train_cfg.grad_clip)
    plugins = {"drafter": DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False)}
    if recipe.distributed.target_zero_stage == 3:
        target_dtype = resolve_dtype(recipe.target.dtype).value
        plugins["target"] = DeepSpeedPlugin(hf_ds_config={  # the frozen model's batch size must be explicit
            "zero_optimization": {"stage": 3, "overlap_comm": False},
            "train_micro_batch_size_per_gpu": train_cfg.batch_size, "train_batch_size": train_cfg.batch_size * world,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": target_dtype == "bfloat16"}, "fp16": {"enabled": target_dtype == "float16"}},
            zero3_init_flag=False)
    return plugins
