"""The step counts a run derives from its config and data, in one frozen place (`PPOConfig.schedule` builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Step counts derived from the config and the data; computed only by `PPOConfig.schedule`."""

    kl_horizon: int
    global_rollout_batch: int  # prompts per update, all processes
    episodes_per_update: int  # sequences per update, all processes
    updates_per_epoch: int
    total_updates: int  # where this run stops (max_updates applies)
    planned_updates: int  # the planned run (epochs or total_episodes): the LR schedule's length, same on resume
    optimizer_steps_per_update: int
    warmup_steps: int  # optimizer steps of learning-rate warm-up

    @property
    def planned_optimizer_steps(self) -> int:
        return self.planned_updates * self.optimizer_steps_per_update
