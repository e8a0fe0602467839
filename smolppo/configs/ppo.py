"""`train_ppo.py`'s configuration: one field per knob, composed from the shared groups in `parts`.

Batch vocabulary (all counts are per process):

* ``rollout_batch_size`` prompts are drawn per update, each sampled ``samples_per_prompt`` times;
* those sequences are cut into mini-batches of ``mini_batch_size``, one optimizer step each;
* a mini-batch is processed ``per_device_train_batch_size`` sequences at a time, so
  ``gradient_accumulation_steps = mini_batch_size / per_device_train_batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Optional

from smolppo.configs.algorithm import AlgorithmSettings
from smolppo.configs.parts import (
    ConfigBase,
    DataFields,
    LoRAFields,
    OptimizerFields,
    OutputFields,
    PolicyFields,
    PrecisionFields,
    PresetFields,
    _help,
    check_positive,
)
from smolppo.configs.ppo_fields import (
    KL_HORIZON_UPDATES,
    AlgorithmFields,
    HubFields,
    RewardFields,
)
from smolppo.configs.schedule import Schedule


@dataclass
class PPOConfig(
    HubFields,
    AlgorithmFields,
    OutputFields,
    OptimizerFields,
    LoRAFields,
    PrecisionFields,
    DataFields,
    RewardFields,
    PolicyFields,
    PresetFields,
    ConfigBase,
):
    """Everything `train_ppo.py` needs. Defaults follow the project specification."""

    SECTION = "training run: learning rate, batches, generation, sample logging"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {
            "allow_config_change",
            "save_optimizer_state",
            "discard_newer_checkpoints",
            "max_updates",
            "total_episodes",
            "num_logged_samples",
            "sample_logging_steps",
        }
    )  # may change on resume

    value_model: Optional[str] = field(
        default=None,
        metadata=_help(
            "Value model to start from (gae only). Default: the reward model when it shares the policy's "
            "vocabulary, else the policy with a new 1-output head."
        ),
    )
    max_prompt_length: int = field(
        default=512, metadata=_help("Prompts longer than this many tokens are dropped (and counted), never cut.")
    )
    learning_rate: Optional[float] = field(
        default=None,
        metadata=_help(
            "Peak learning rate of AdamW for policy and value model. Default: full_learning_rate, or "
            "lora_learning_rate with --use-lora."
        ),
    )
    full_learning_rate: float = field(
        default=5e-6, metadata=_help("Peak learning rate of a full fine-tune when --learning-rate is not given.")
    )
    lora_learning_rate: float = field(
        default=5e-5,
        metadata=_help(
            "Peak learning rate with --use-lora when --learning-rate is not given (10x the full fine-tune's: "
            "adapters start at zero and change few parameters, see README)."
        ),
    )
    allow_config_change: bool = field(
        default=False,
        metadata=_help(
            "On resume, apply settings that differ from the checkpoint's (recorded in run_summary.json).",
        ),
    )
    save_optimizer_state: str = field(
        default="latest",
        metadata=_help(
            "Which kept checkpoints hold the AdamW state (2/3 of a full fine-tune's checkpoint): 'latest' (the one "
            "resume picks; older kept ones keep weights only and resume with fresh moments) or 'all'.",
        ),
    )
    discard_newer_checkpoints: bool = field(
        default=False,
        metadata=_help("Resume from an older checkpoint and delete the checkpoints after it."),
    )
    # Batches (per process)
    rollout_batch_size: int = field(default=64, metadata=_help("Prompts drawn for one update."))
    mini_batch_size: int = field(default=16, metadata=_help("Sequences per optimizer step within an update."))
    num_mini_batches: Optional[int] = field(
        default=None,
        metadata=_help(
            "trl's way to set mini_batch_size: the update's sequences split into this many optimizer steps."
        ),
    )
    per_device_train_batch_size: int = field(
        default=4, metadata=_help("Sequences per forward/backward pass (micro-batch).")
    )
    gradient_accumulation_steps: Optional[int] = field(
        default=None,
        metadata=_help("Micro-batches per optimizer step; derived as mini_batch_size / per_device_train_batch_size."),
    )
    max_updates: Optional[int] = field(
        default=None,
        metadata=_help("Stop after this many updates (default: num_train_epochs of prompts)."),
    )
    total_episodes: Optional[int] = field(
        default=None,
        metadata=_help("trl's run length: train for this many responses (rounded up to whole updates), not epochs."),
    )
    # Generation
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature of the rollouts."))
    rollout_top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling during training rollouts; must stay 1.0 (see README).")
    )
    max_new_tokens: int = field(
        default=128, metadata=_help("Maximum tokens generated per response.", aliases=["--response_length"])
    )
    # Logging
    num_logged_samples: int = field(default=4, metadata=_help("Prompt/response/reward triples logged as text."))
    sample_logging_steps: int = field(default=10, metadata=_help("Log sample triples every N updates."))

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

    def algorithm_settings(self) -> AlgorithmSettings:
        """The fields the algorithm reads, resolved; the algorithm gets this, not the whole config."""
        values = {f.name: getattr(self, f.name) for f in fields(AlgorithmSettings)}
        resolved = {"learning_rate": self.peak_learning_rate, "mini_batch_size": self.effective_mini_batch_size}
        return AlgorithmSettings(**{**values, **resolved})

    def recorded(self) -> dict:
        """The config as a run records it (summary, checkpoints, the resume check, trackers): every field, with the
        learning rate and gradient accumulation as they apply."""
        return {
            **asdict(self),
            "learning_rate": self.peak_learning_rate,
            "mini_batch_size": self.effective_mini_batch_size,
            "gradient_accumulation_steps": self.accumulation_steps,
        }

    def __post_init__(self) -> None:
        if self.num_mini_batches is not None:  # checked first: the other batch checks use the size it gives
            sequences = self.rollout_batch_size * self.samples_per_prompt
            if not (isinstance(self.num_mini_batches, int) and self.num_mini_batches > 0):
                raise ValueError(f"num_mini_batches must be a positive integer, got {self.num_mini_batches!r}")
            if sequences % self.num_mini_batches:
                raise ValueError(
                    f"num_mini_batches ({self.num_mini_batches}) must divide rollout_batch_size x samples_per_prompt "
                    f"({sequences})"
                )
        super().__post_init__()

    def _check_ppo(self) -> None:
        if not self.peak_learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.peak_learning_rate}")
        check_positive(self, "max_prompt_length", "rollout_batch_size", "mini_batch_size")
        mini_batch = self.effective_mini_batch_size
        check_positive(self, "per_device_train_batch_size", "max_new_tokens", "sample_logging_steps")
        for name in ("max_updates", "total_episodes"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        sequences = self.rollout_batch_size * self.samples_per_prompt
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
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.rollout_top_p != 1.0:
            raise ValueError(
                f"rollout_top_p={self.rollout_top_p} is refused: PPO's ratio needs the log-probs of the distribution "
                "actually sampled, and nucleus truncation changes it per step. Keep rollout_top_p=1.0 (use "
                "temperature to sharpen sampling); evaluate_generations.py has its own top_p"
            )
        if self.save_optimizer_state not in ("latest", "all"):
            raise ValueError(f"save_optimizer_state must be 'latest' or 'all', got {self.save_optimizer_state!r}")
        if self.value_model and not self.uses_value_model:
            raise ValueError(
                f"value_model is set but advantage_estimator {self.advantage_estimator} has no value model; drop "
                "--value-model or use --advantage-estimator gae"
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
