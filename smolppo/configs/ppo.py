"""`train_ppo.py`'s configuration: the flat union of its field groups (`parts` and `ppo_fields`).

Batch vocabulary (all counts are per process):

* ``rollout_batch_size`` prompts are drawn per update, each sampled ``samples_per_prompt`` times;
* those sequences are cut into mini-batches of ``mini_batch_size``, one optimizer step each;
* a mini-batch is processed ``per_device_train_batch_size`` sequences at a time, so
  ``gradient_accumulation_steps = mini_batch_size / per_device_train_batch_size``;
* no-grad passes (log-probs, values, the reward model) read ``inference_batch_size`` sequences at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from smolppo.configs.algorithm import AlgorithmSettings
from smolppo.configs.parts import (
    DebugFields,
    LoRAFields,
    PrecisionFields,
    PresetFields,
    ScriptConfig,
)
from smolppo.configs.ppo_fields import (
    GROUP_ESTIMATORS,
    KL_HORIZON_UPDATES,
    BatchFields,
    EstimatorFields,
    GenerationFields,
    HubFields,
    KLFields,
    LossFields,
    PPOOutputFields,
    PPOPolicyFields,
    PromptFields,
    RewardFields,
    RunFields,
    SamplingFields,
)
from smolppo.configs.schedule import Schedule


@dataclass(frozen=True)
class PPOConfig(
    HubFields,
    PPOOutputFields,
    PrecisionFields,
    LoRAFields,
    RunFields,
    BatchFields,
    SamplingFields,
    GenerationFields,
    LossFields,
    KLFields,
    EstimatorFields,
    RewardFields,
    PromptFields,
    PPOPolicyFields,
    PresetFields,
    DebugFields,
    ScriptConfig,
):
    """Everything `train_ppo.py` needs. Defaults follow the project specification."""

    GROUPS: ClassVar[tuple[type, ...]] = (
        PresetFields,
        PPOPolicyFields,
        PromptFields,
        RewardFields,
        EstimatorFields,
        KLFields,
        LossFields,
        SamplingFields,
        GenerationFields,
        BatchFields,
        RunFields,
        LoRAFields,
        PrecisionFields,
        PPOOutputFields,
        HubFields,
        DebugFields,
    )

    @property
    def peak_learning_rate(self) -> float:
        """`learning_rate` when given, else `full_learning_rate` (`lora_learning_rate` with LoRA)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return self.lora_learning_rate if self.use_lora else self.full_learning_rate

    @property
    def effective_mini_batch_size(self) -> int:
        """Sequences per optimizer step: `mini_batch_size`, or trl's `num_mini_batches` way of saying it."""
        if self.num_mini_batches is None:
            return self.mini_batch_size
        return self.rollout_batch_size * self.samples_per_prompt // self.num_mini_batches

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: the mini-batch / per_device_train_batch_size."""
        return self.effective_mini_batch_size // self.per_device_train_batch_size

    @property
    def effective_inference_batch_size(self) -> int:
        """Sequences per no-grad forward: `inference_batch_size`, else the mini-batch's size."""
        return self.inference_batch_size or self.effective_mini_batch_size

    def algorithm_settings(self) -> AlgorithmSettings:
        """The groups the algorithm reads, and the batch sizes and learning rate as they apply."""
        return AlgorithmSettings(
            estimator=self.group(EstimatorFields),
            kl=self.group(KLFields),
            loss=self.group(LossFields),
            sampling=self.group(SamplingFields),
            generation=self.group(GenerationFields),
            optimizer=self.group(RunFields),
            precision=self.group(PrecisionFields),
            rewards=self.group(RewardFields),
            learning_rate=self.peak_learning_rate,
            mini_batch_size=self.effective_mini_batch_size,
            micro_batch_size=self.per_device_train_batch_size,
            inference_batch_size=self.effective_inference_batch_size,
        )

    def recorded(self) -> dict:
        """The config as a run records it (summary, checkpoints, the resume check, trackers): every field, with the
        learning rate and gradient accumulation as they apply."""
        return {
            **asdict(self),
            "learning_rate": self.peak_learning_rate,
            "mini_batch_size": self.effective_mini_batch_size,
            "gradient_accumulation_steps": self.accumulation_steps,
        }

    def check_across_groups(self) -> None:
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if self.num_mini_batches is not None and sequences % self.num_mini_batches:
            raise ValueError(
                f"num_mini_batches ({self.num_mini_batches}) must divide rollout_batch_size x samples_per_prompt "
                f"({sequences})"
            )
        mini_batch = self.effective_mini_batch_size
        if sequences % mini_batch:
            raise ValueError(
                f"rollout_batch_size x samples_per_prompt ({sequences}) must be a multiple of mini_batch_size "
                f"({mini_batch})"
            )
        if mini_batch % self.per_device_train_batch_size:
            raise ValueError(
                f"mini_batch_size ({mini_batch}) must be a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size})"
            )
        derived = self.accumulation_steps
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps != derived:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must equal mini_batch_size / "
                f"per_device_train_batch_size = {derived}; set mini_batch_size, or leave gradient_accumulation_steps "
                "out"
            )
        if not self.peak_learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.peak_learning_rate}")
        if self.value_model and not self.uses_value_model:
            raise ValueError(
                f"value_model is set but advantage_estimator {self.advantage_estimator} has no value model; drop "
                "--value-model or use --advantage-estimator gae"
            )
        if self.dynamic_sampling and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ValueError(
                f"dynamic_sampling drops groups of responses to one prompt: it needs advantage_estimator grpo or "
                f"rloo, not {self.advantage_estimator}"
            )

    def schedule(self, num_prompts: int, num_processes: int = 1) -> Schedule:
        """Derived step counts for `num_prompts` training prompts spread over `num_processes` processes."""
        global_batch = self.rollout_batch_size * num_processes
        updates_per_epoch = num_prompts // global_batch
        if updates_per_epoch == 0:
            raise ValueError(
                f"only {num_prompts} usable prompts, fewer than one rollout batch of {global_batch} "
                f"(rollout_batch_size x processes); lower rollout_batch_size or use more data"
            )
        episodes_per_update = global_batch * self.samples_per_prompt
        planned = updates_per_epoch * self.num_train_epochs
        if self.total_episodes is not None:  # trl's length: the prompt order simply continues into more epochs
            planned = math.ceil(self.total_episodes / episodes_per_update)
        total = planned if self.max_updates is None else min(planned, self.max_updates)
        minibatches = self.rollout_batch_size * self.samples_per_prompt // self.effective_mini_batch_size
        steps_per_update = self.ppo_epochs * minibatches
        return Schedule(
            kl_horizon=self.kl_horizon or KL_HORIZON_UPDATES * episodes_per_update,
            global_rollout_batch=global_batch,
            episodes_per_update=episodes_per_update,
            updates_per_epoch=updates_per_epoch,
            total_updates=total,
            planned_updates=planned,
            optimizer_steps_per_update=steps_per_update,
            warmup_steps=math.ceil(self.warmup_ratio * planned * steps_per_update),
        )
