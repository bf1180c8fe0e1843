"""The learning-rate schedule and the wall-clock training budget (`train.max_minutes`, `train.eval_at_minutes`).

The schedule is linear warmup, then cosine to zero over a *horizon* of optimizer steps. With `train.max_steps`
alone the horizon is max_steps and nothing else happens (the paper's schedule, as before).

With `train.max_minutes` training stops when the *training clock* reaches the budget. The clock counts the
seconds spent in training steps (every rank adds the same rank-averaged step time, so all ranks agree on when to
stop); evaluation, checkpointing and setup are not on it. The learning rate needs a horizon before the first
step, so the trainer runs a throughput probe: a few no-grad passes of the real loss (target forward, p_t,
drafter forward) on training batches, timed, with backward + optimizer counted as twice the drafter's forward
(the usual forward:backward cost ratio), which needs no optimizer state and works the same under DeepSpeed. The
probe's seconds count against the budget. It fixes the warmup W = ⌈warmup_ratio · H₀⌉ and the first horizon
H₀ = min(max_steps, ⌊remaining budget / step time⌋).

Step cost changes during a run (the probe is approximate; a feature cache makes epochs ≥ 2 cheaper; other jobs on
the machine start and stop), so the horizon is re-estimated from the measured step time of the recent window at
step 10, then every max(10, H/20) steps, and 5 steps into every new epoch, and changed when it moves by more
than 5 %. A change at step s_c keeps the learning rate continuous: the cosine's progress q runs linearly from
its value at s_c to 1 at the new horizon. The schedule is a pure function of W and the recorded changes
[(s_c, H_c)], which every checkpoint saves (`Progress.schedule`) and metrics.jsonl logs (`train/horizon`), so a
resumed run follows the same schedule and the numbers of a run can be replayed from its record.

A learning curve read off one time-budgeted run (`eval_at_minutes`) is the *anytime* quality of that run's
schedule: at 10 of 40 minutes the learning rate is still high, so a run budgeted at 10 minutes would do better
than the 10-minute point shows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

RECHECK_AFTER_EPOCH = 5  # steps into a new epoch before its step time is measured
MIN_WINDOW = 10  # fewest steps a re-estimate averages over (except right after an epoch boundary)
CHANGE = 0.05  # relative change of the horizon that is acted on


@dataclass
class Horizon:
    """Warmup length and the horizon's history [(from step, horizon)]: the whole schedule."""

    warmup: int
    changes: list = field(default_factory=list)

    @classmethod
    def fixed(cls, steps: int, warmup_ratio: float) -> "Horizon":
        return cls(math.ceil(warmup_ratio * steps), [[0, steps]])

    @classmethod
    def from_dict(cls, d: dict) -> "Horizon":
        return cls(int(d["warmup"]), [[int(s), int(h)] for s, h in d["changes"]])

    def to_dict(self) -> dict:
        return {"warmup": self.warmup, "changes": [list(c) for c in self.changes]}

    @property
    def steps(self) -> int:
        return self.changes[-1][1]

    def progress(self, step: int) -> float:
        """Cosine progress q ∈ [0, 1] at `step` ≥ warmup: linear from 0 at W to 1 at H₀, re-aimed continuously at
        each later horizon from the step it was set."""
        def lin(q0, a, h, s):
            return min(1.0, max(0.0, q0 + (1 - q0) * (s - a) / max(1, h - a)))

        q0, a, h = 0.0, self.warmup, self.changes[0][1]
        for s_c, h_c in self.changes[1:]:
            a_c = max(s_c, self.warmup)
            if step < a_c:
                break
            q0, a, h = lin(q0, a, h, a_c), a_c, h_c
        return lin(q0, a, h, step)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the base learning rate for optimizer step `step` (steps taken so far)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def retarget(self, step: int, steps: int) -> bool:
        """Aim the cosine at a new horizon from `step` on, if it moved by more than CHANGE; returns whether."""
        steps = max(steps, step + 1)
        if abs(steps - self.steps) <= CHANGE * self.steps:
            return False
        self.changes.append([step, steps])
        return True


class Budget:
    """The training clock's side of the loop: when to stop, which wall-clock evaluations are due, and the
    horizon re-estimates. Pure bookkeeping over (step, clock seconds, epoch): no timing of its own."""

    def __init__(self, horizon: Horizon, max_steps: int, max_minutes: Optional[float], eval_at_minutes: list[float],
                 step: int, seconds: float, epoch: int):
        self.horizon, self.max_steps = horizon, max_steps
        self.budget_s = None if max_minutes is None else 60.0 * max_minutes
        self.pending = sorted(m for m in eval_at_minutes if 60.0 * m > seconds)
        self._window = (step, seconds)
        self._epoch = epoch
        self._next_check = step + MIN_WINDOW

    @property
    def timed(self) -> bool:
        return self.budget_s is not None

    def done(self, step: int, seconds: float) -> bool:
        if step >= min(self.horizon.steps, self.max_steps):
            return True
        return self.timed and seconds >= self.budget_s

    def due_evals(self, seconds: float) -> list[float]:
        """Wall-clock evaluation points (minutes) the clock has passed since the last call."""
        due = [m for m in self.pending if seconds >= 60.0 * m]
        self.pending = [m for m in self.pending if m not in due]
        return due

    def remaining_evals(self, seconds: float) -> list[float]:
        """At a time-budget stop: the points up to the budget that the last few steps fell short of (their
        evaluation is the final one)."""
        if not self.timed:
            return []
        left = [m for m in self.pending if 60.0 * m <= self.budget_s]
        self.pending = [m for m in self.pending if m not in left]
        return left

    def observe(self, step: int, seconds: float, epoch: int) -> Optional[int]:
        """After each step: re-estimate the horizon when a check is due; returns the new horizon if it changed."""
        if not self.timed:
            return None
        if epoch != self._epoch:  # step cost may change with the epoch (cache): measure the new one afresh
            self._epoch, self._window, self._next_check = epoch, (step, seconds), step + RECHECK_AFTER_EPOCH
            return None
        if step < self._next_check:
            return None
        s0, t0 = self._window
        per_step = (seconds - t0) / max(1, step - s0)
        self._window = (step, seconds)
        self._next_check = step + max(MIN_WINDOW, self.horizon.steps // 20)
        target = min(self.max_steps, step + int(max(0.0, self.budget_s - seconds) / max(per_step, 1e-9)))
        return self.horizon.steps if self.horizon.retarget(step, target) else None


def probe_horizon(step_seconds: float, budget_s: float, max_steps: int, warmup_ratio: float) -> Horizon:
    """The first horizon from the probe's estimated seconds per step."""
    steps = max(1, min(max_steps, int(budget_s / max(step_seconds, 1e-9))))
    return Horizon.fixed(steps, warmup_ratio)


def probe_step_seconds(loss_pass: Callable[[object], float], batches: list) -> float:
    """Estimated seconds per micro-batch step from no-grad passes of the loss, `loss_pass(batch)` returning its
    target seconds (the first pass warms up and is not counted): target time + 3 × the rest (backward ≈ 2
    forwards; the optimizer is small next to them)."""
    estimates = []
    for b in batches:
        start = time.perf_counter()
        target_s = loss_pass(b)
        estimates.append(target_s + 3 * (time.perf_counter() - start - target_s))
    return sum(estimates[1:]) / max(1, len(estimates) - 1)


def blend_alpha(train_cfg, step: int, horizon: Horizon) -> Optional[float]:
    """`train.loss: kl_to_l1` with `blend: progress`: α = min(1, (step / horizon) / blend_end), the L1 share of the
    loss (losses.py); None (the default `blend: acceptance`) lets each slot use its own acceptance estimate."""
    if train_cfg.loss != "kl_to_l1" or train_cfg.blend != "progress":
        return None
    return min(1.0, step / max(1, horizon.steps) / train_cfg.blend_end)
