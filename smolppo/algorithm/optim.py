"""The optimizer's schedule: a warm-started learning-rate schedule, and this run's peak rate applied on resume."""

from __future__ import annotations

import warnings

from smolppo.errors import UserError


def warm_started_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """transformers' `name` schedule over `total_steps` optimizer steps, stepped once before training when it warms
    up: a warm-up then starts at ``1 / warmup_steps`` of the peak instead of 0, so the first step trains. With
    `min_lr_ratio` the decay after the warm-up ends at that fraction of the peak (`floored_decay`)."""
    from transformers import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps + 1)
    if min_lr_ratio:
        if not hasattr(scheduler, "lr_lambdas"):
            raise UserError(f"--min-lr-ratio needs a schedule given by a rule (cosine, linear, ...), not {name!r}")
        scheduler.lr_lambdas = [floored_decay(rule, warmup_steps, min_lr_ratio) for rule in scheduler.lr_lambdas]
        rates_at_schedule_position(scheduler, optimizer)
    if warmup_steps:
        with warnings.catch_warnings():  # stepping before the first optimizer.step() is the point here
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            scheduler.step()
    return scheduler


def floored_decay(rule, warmup_steps: int, floor: float):
    """A schedule's factor `rule(step)` (of the peak rate) unchanged during the warm-up, then lifted so that its decay
    from 1 to 0 runs from 1 to `floor`: ``floor + (1 - floor) * rule(step)``. A plain function, so that the
    scheduler's state_dict stays free of objects."""

    def factor(step: int) -> float:
        value = rule(step)
        return value if step < warmup_steps else floor + (1.0 - floor) * value

    return factor


def apply_configured_learning_rate(scheduler, optimizer, learning_rate: float) -> None:
    """A scheduler's saved state brings back the old peak learning rate; use this run's (a no-op when equal),
    so that a resume with --allow-config-change --learning-rate X really trains at X. The optimizer's groups take
    the rate at the schedule's position now; the scheduler's next ``step()`` computes from the new peak. (The rate
    an optimizer step used is read from the optimizer's groups, `current_learning_rate`, never from the scheduler's
    memory of its last step.)"""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    if hasattr(scheduler, "lr_lambdas"):
        rates_at_schedule_position(scheduler, optimizer)


def rates_at_schedule_position(scheduler, optimizer) -> None:
    """Give the optimizer's groups the rates a rule-based (`LambdaLR`) schedule prescribes where it stands now."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer's next step uses (its first parameter group's)."""
    return optimizer.param_groups[0]["lr"]
