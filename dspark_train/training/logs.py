"""What a training run logs: every record as a line of metrics.jsonl and to the trackers (wandb, tensorboard), the
per-step record reduced over ranks, and the progress bar with its periodic summary line."""
from __future__ import annotations

import json

import torch

from ..config import Recipe
from ..layout import RunDir
from .losses import summarise


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


def step_record(acc, loss: float, sums: torch.Tensor, target_s: float, seconds: float, tokens: int, lr: float,
                grad_norm) -> dict:
    """One optimizer step's record, reduced over ranks: loss and its parts, lr, gradient norm, tokens (total and
    per rank), throughput, the step time (rank mean: every rank's training clock adds the same number) and its
    split between the target's forward (or the feature cache) and the drafter's step."""
    world = acc.num_processes
    stats = acc.reduce(torch.tensor([loss / world, target_s, seconds - target_s, seconds], device=acc.device), "sum")
    rank_tokens = acc.gather(torch.tensor([tokens], device=acc.device)).tolist()
    parts = summarise(acc.reduce(sums, "sum"))
    target_s, drafter_s, step_s = (float(x) / world for x in stats[1:])
    return {"train/loss": float(stats[0]), "train/ce": parts["ce"], "train/l1": parts["l1"],
            "train/div": parts["div"], "train/conf_bce": parts["conf_bce"], "train/tau": parts["tau"], "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "train/tokens": sum(rank_tokens), "train/rank_tokens": rank_tokens,
            "train/tokens_per_s": sum(rank_tokens) / step_s,
            "time/step_s": step_s, "time/target_s": target_s, "time/drafter_s": drafter_s,
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
