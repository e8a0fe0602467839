"""`train_reward_model.py`'s configuration: a 1-output classifier trained on chosen/rejected pairs; the flat union
of its field groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from smolppo.configs.parts import (
    DataFields,
    DebugFields,
    FieldGroup,
    LoRAFields,
    OptimizerFields,
    OutputFields,
    PolicyFields,
    PrecisionFields,
    PresetFields,
    ScriptConfig,
    _help,
    check_positive,
)


@dataclass(frozen=True)
class PairFields(FieldGroup):
    """How chosen/rejected pairs are read, held out and scored."""

    _argument_group_name = "reward-model training"

    reward_template: Optional[str] = field(
        default=None,
        metadata=_help(
            "How pairs are rendered for the classifier: 'chat' (the tokenizer's chat template, as RewardTrainer), "
            "'plain' or a Jinja template string/file; recorded so train_ppo.py reads the model the same way."
        ),
    )
    test_size: float = field(default=0.05, metadata=_help("Fraction of the pairs held out for evaluation."))
    max_length: int = field(
        default=1024, metadata=_help("Pairs whose prompt+answer exceeds this many tokens are dropped (and counted).")
    )
    center_rewards_coefficient: Optional[float] = field(
        default=None, metadata=_help("Weight of a penalty keeping rewards centred on 0 (off when unset).")
    )

    def check(self) -> None:
        check_positive(self, "max_length")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")


@dataclass(frozen=True)
class RewardOptimizerFields(OptimizerFields):
    """The optimizer and schedule of reward-model training."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"num_train_epochs", "max_steps"})

    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate of AdamW."))
    num_train_epochs: int = field(default=1, metadata=_help("Passes over the training pairs."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Pairs per device per step."))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("Pairs per device when evaluating."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Steps accumulated per optimizer step."))
    max_steps: Optional[int] = field(default=None, metadata=_help("Stop after this many optimizer steps."))

    def check(self) -> None:
        super().check()
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_positive(
            self, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"
        )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps}")


@dataclass(frozen=True)
class RewardOutputFields(OutputFields):
    """Where the reward model goes, and how often it is evaluated, logged and saved."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"eval_steps"})

    output_dir: str = field(default="./reward_model_output", metadata=_help("Where the reward model goes."))
    eval_steps: int = field(default=200, metadata=_help("Evaluate on the held-out pairs every N steps."))
    logging_steps: int = field(default=10, metadata=_help("Write TensorBoard scalars every N steps."))
    save_steps: int = field(default=500, metadata=_help("Write a checkpoint every N steps."))

    def check(self) -> None:
        super().check()
        check_positive(self, "eval_steps")


@dataclass(frozen=True)
class RewardModelConfig(
    RewardOutputFields,
    PrecisionFields,
    LoRAFields,
    RewardOptimizerFields,
    PairFields,
    DataFields,
    PolicyFields,
    PresetFields,
    DebugFields,
    ScriptConfig,
):
    """Everything `train_reward_model.py` needs; `policy_model` is the model the classifier starts from."""

    GROUPS: ClassVar[tuple[type, ...]] = (
        PresetFields,
        PolicyFields,
        DataFields,
        PairFields,
        RewardOptimizerFields,
        LoRAFields,
        PrecisionFields,
        RewardOutputFields,
        DebugFields,
    )
