"""`train_reward_model.py`'s configuration: a 1-output classifier trained on chosen/rejected pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

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


@dataclass
class RewardModelConfig(
    OutputFields, OptimizerFields, LoRAFields, PrecisionFields, DataFields, PolicyFields, PresetFields, ConfigBase
):
    """Everything `train_reward_model.py` needs; `policy_model` is the model the classifier starts from."""

    SECTION = "reward-model training"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {"output_dir", "num_train_epochs", "max_steps", "eval_steps", "logging_steps", "save_steps"}
    )  # may change on resume

    reward_template: Optional[str] = field(
        default=None,
        metadata=_help(
            "How pairs are rendered for the classifier: 'chat' (the tokenizer's chat template, as RewardTrainer), "
            "'plain' or a Jinja template string/file; recorded so train_ppo.py reads the model the same way."
        ),
    )
    output_dir: str = field(default="./reward_model_output", metadata=_help("Where the reward model goes."))
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate of AdamW."))
    num_train_epochs: int = field(default=1, metadata=_help("Passes over the training pairs."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Pairs per device per step."))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("Pairs per device when evaluating."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Steps accumulated per optimizer step."))
    max_steps: Optional[int] = field(default=None, metadata=_help("Stop after this many optimizer steps."))
    test_size: float = field(default=0.05, metadata=_help("Fraction of the pairs held out for evaluation."))
    max_length: int = field(
        default=1024, metadata=_help("Pairs whose prompt+answer exceeds this many tokens are dropped (and counted).")
    )
    eval_steps: int = field(default=200, metadata=_help("Evaluate on the held-out pairs every N steps."))
    logging_steps: int = field(default=10, metadata=_help("Write TensorBoard scalars every N steps."))
    save_steps: int = field(default=500, metadata=_help("Write a checkpoint every N steps."))
    center_rewards_coefficient: Optional[float] = field(
        default=None, metadata=_help("Weight of a penalty keeping rewards centred on 0 (off when unset).")
    )

    def _check_reward_training(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_positive(self, "per_device_train_batch_size", "per_device_eval_batch_size")
        check_positive(self, "gradient_accumulation_steps")
        check_positive(self, "max_length", "eval_steps")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps}")
