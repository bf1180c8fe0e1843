"""`dspark plan`: what a recipe will do, offline: target architecture, feature layers, drafter size, memory, and
what `auto` precision resolves to on this machine (hardware.py) and why."""
from __future__ import annotations

import contextlib
import io

import torch

from .config import DRAFTER_HEADS, Recipe, recipe_to_yaml
from .hardware import detect, resolve_dtype, resolve_mixed_precision
from .target import DTYPES, default_feature_layers, load_target_config

GiB = 1024 ** 3


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2)):
        if n >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n / 1024:8.2f} KiB"


def count_target_parameters(tcfg) -> int:
    """Exact parameter count from the architecture config, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_config(tcfg)
    return sum(p.numel() for p in model.parameters())


def experts(tcfg) -> str:
    for key in ("num_local_experts", "n_routed_experts", "num_experts"):
        n = getattr(tcfg, key, None)
        if n:
            return f"{n} routed, {getattr(tcfg, 'num_experts_per_tok', '?')} per token" + (
                f", {tcfg.n_shared_experts} shared" if getattr(tcfg, "n_shared_experts", None) else "")
    return "dense"


def memory_estimate(recipe: Recipe, target_params: int, drafter_trainable: int, target_dtype: str,
                    mixed_precision: str) -> dict:
    """Per-device bytes, activations excluded, for the resolved `target_dtype` and `mixed_precision`. Target:
    frozen weights, sharded under ZeRO-3 inference. Drafter: weights in the compute dtype, fp32 grads + master +
    two AdamW moments (16 B/param) sharded by stage."""
    dist = recipe.distributed
    n = dist.num_processes * 1  # num_processes counts all ranks over all machines in accelerate configs
    tbytes = DTYPES[target_dtype].itemsize
    target = target_params * tbytes / (n if dist.target_zero_stage == 3 and dist.accelerate_config else 1)
    w = drafter_trainable * 2 if mixed_precision == "bf16" else drafter_trainable * 4
    states = drafter_trainable * 16
    sharded = dist.accelerate_config is not None
    if sharded and dist.zero_stage >= 3:
        drafter = (w + states) / n
    elif sharded and dist.zero_stage >= 1:
        drafter = w + states / n
    else:
        drafter = w + states
    return {"target_bytes": target, "drafter_bytes": drafter, "processes": n}


def plan(recipe: Recipe) -> str:
    from .drafters import count_parameters

    tcfg = load_target_config(recipe.target, recipe.resolve_path)
    layers = recipe.target.feature_layers or default_feature_layers(tcfg.num_hidden_layers,
                                                                    recipe.target.num_feature_layers)
    tparams = count_target_parameters(tcfg)
    dparams = count_parameters(recipe.drafter, tcfg, len(layers))
    caps = detect()
    dtype, mixed = resolve_dtype(recipe.target.dtype, caps), resolve_mixed_precision(recipe.train.mixed_precision, caps)
    calib = resolve_dtype(recipe.calibrate.dtype, caps)
    mem = memory_estimate(recipe, tparams, dparams, dtype.value, mixed.value)
    dist = recipe.distributed
    lines = [
        "# resolved recipe", recipe_to_yaml(recipe).rstrip(), "",
        "# target",
        f"model:           {recipe.target.model or 'inline config (random init)'}",
        f"architecture:    {(getattr(tcfg, 'architectures', None) or [tcfg.model_type])[0]}",
        f"layers:          {tcfg.num_hidden_layers}",
        f"hidden size:     {tcfg.hidden_size}",
        f"vocab size:      {tcfg.vocab_size}",
        f"experts:         {experts(tcfg)}",
        f"parameters:      {tparams / 1e9:.3f} B",
        f"feature layers:  {layers}",
        "",
        "# drafter",
        f"kind/head:       {recipe.drafter.kind}/{recipe.drafter.head}, {recipe.drafter.num_layers} layer(s), "
        f"block size {recipe.drafter.block_size}",
        f"trainable:       {dparams / 1e6:.2f} M parameters",
        "size table (trainable M parameters for this target and recipe):",
    ]
    for n_layers in (1, 2, 5):
        row = []
        for head in DRAFTER_HEADS:
            sec = type(recipe.drafter)(**{**recipe.drafter.__dict__, "kind": "dspark", "head": head,
                                          "num_layers": n_layers})
            row.append(f"{head} {count_parameters(sec, tcfg, len(layers)) / 1e6:8.2f}")
        lines.append(f"  {n_layers} layer(s):   " + "   ".join(row))
    lines += [
        "",
        "# precision on this machine (auto: bf16 only where the hardware computes it)",
        f"machine:         {caps.describe()}",
        f"target.dtype:    {dtype}",
        f"train.mixed_precision: {mixed}",
        f"calibrate.dtype: {calib}",
        "",
        "# memory per device (weights + optimizer states, activations excluded)",
        "launch:          " + (f"{dist.accelerate_config}; {mem['processes']} process(es) on "
                                f"{dist.num_machines} machine(s); drafter ZeRO-{dist.zero_stage}, "
                                f"target ZeRO-{dist.target_zero_stage}"
                                if dist.accelerate_config else "single process, no DeepSpeed"),
        f"target:          {human_bytes(mem['target_bytes'])} ({dtype.value})",
        f"drafter:         {human_bytes(mem['drafter_bytes'])}",
        f"total:           {human_bytes(mem['target_bytes'] + mem['drafter_bytes'])}",
    ]
    return "\n".join(lines)
