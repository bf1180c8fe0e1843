"""The learning-rate schedule and the time budget: the fixed schedule is the paper's warmup-cosine, a re-aimed
horizon keeps the learning rate continuous and still ends at zero, the record replays the schedule, and the
budget's stop / evaluation / re-estimate decisions follow the training clock."""
import math

import pytest

from dspark_train.training.schedule import Budget, Horizon, probe_horizon


def _paper(step, max_steps, ratio):  # the formula the trainer used before horizons existed
    warmup = math.ceil(ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


def test_fixed_horizon_is_the_warmup_cosine_over_max_steps():
    h = Horizon.fixed(450, 0.04)
    assert h.warmup == 18 and h.steps == 450
    assert [h.lr_factor(s) for s in range(451)] == pytest.approx([_paper(s, 450, 0.04) for s in range(451)])
    assert h.lr_factor(450) == pytest.approx(0.0, abs=1e-12)


def test_a_retarget_keeps_the_rate_continuous_and_ends_at_the_new_horizon():
    h = Horizon.fixed(200, 0.05)
    before = h.lr_factor(80)
    assert h.retarget(80, 120)
    assert h.lr_factor(80) == pytest.approx(before)  # no jump at the change
    assert h.lr_factor(120) == pytest.approx(0.0, abs=1e-12) and h.lr_factor(119) > 0
    assert all(h.lr_factor(s) >= h.lr_factor(s + 1) for s in range(h.warmup, 120))  # still decreasing
    assert not h.retarget(90, 122)  # within 5 %: left alone
    assert h.retarget(100, 300) and h.lr_factor(100) == pytest.approx(Horizon.from_dict(
        {"warmup": 10, "changes": [[0, 200], [80, 120]]}).lr_factor(100))
    replay = Horizon.from_dict(h.to_dict())
    assert [replay.lr_factor(s) for s in range(300)] == [h.lr_factor(s) for s in range(300)]


def test_a_change_during_warmup_starts_the_cosine_at_the_end_of_warmup():
    h = Horizon.fixed(100, 0.1)
    h.retarget(3, 50)
    assert h.lr_factor(9) == pytest.approx(1.0) and h.lr_factor(10) == pytest.approx(1.0)
    assert h.lr_factor(30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_probe_horizon_fills_the_budget_and_respects_max_steps():
    assert probe_horizon(0.5, 600.0, 10_000, 0.04).steps == 1200
    assert probe_horizon(0.5, 600.0, 300, 0.04).steps == 300
    assert probe_horizon(0.5, 600.0, 10_000, 0.04).warmup == 48


def test_budget_stops_on_the_clock_or_the_horizon_and_tags_evaluations():
    b = Budget(Horizon.fixed(1000, 0.0), 10_000, max_minutes=1.0, eval_at_minutes=[0.25, 0.5, 1.0],
               step=0, seconds=0.0, epoch=0)
    assert not b.done(10, 14.0) and b.done(10, 60.0) and b.done(1000, 1.0)
    assert b.due_evals(14.0) == [] and b.due_evals(15.5) == [0.25] and b.due_evals(16.0) == []
    assert b.due_evals(45.0) == [0.5]
    assert b.remaining_evals(59.8) == [1.0] and b.pending == []  # the final evaluation stands for the last point
    resumed = Budget(Horizon.fixed(1000, 0.0), 10_000, 1.0, [0.25, 0.5, 1.0], step=300, seconds=20.0, epoch=0)
    assert resumed.pending == [0.5, 1.0]  # points already passed before the checkpoint are not redone
    steps_only = Budget(Horizon.fixed(100, 0.0), 100, None, [], 0, 0.0, 0)
    assert not steps_only.done(99, 1e9) and steps_only.done(100, 0.0) and steps_only.observe(50, 10.0, 0) is None


def test_budget_reestimates_the_horizon_from_the_measured_step_time():
    h = Horizon.fixed(600, 0.0)  # the probe guessed 0.1 s/step for a 60 s budget
    b = Budget(h, 10_000, 1.0, [], 0, 0.0, 0)
    assert b.observe(5, 1.0, 0) is None  # not yet due (first check at step 10)
    assert b.observe(10, 2.0, 0) == 10 + int(58.0 / 0.2)  # 0.2 s/step measured: 290 more steps fit
    assert h.changes[-1] == [10, 300]
    # a new epoch (cached features: faster steps) is measured afresh 5 steps in
    assert b.observe(12, 2.4, 1) is None
    assert b.observe(17, 2.9, 1) == 17 + int(57.1 / 0.1)
