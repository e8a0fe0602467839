"""Field groups, one frozen dataclass per concern, and how a script's config is made of them.

Each group declares its fields once (with their help, their other names, and which may change on resume) and
checks only them (`FieldGroup.check`). A script's config is the flat union of the groups it lists in ``GROUPS``
(nothing else: `train_reward_model.py` has no ``--reward-model``); its ``--help`` shows one section per group, the
parser fills each group on its own (`smolppo.cli.parse_config`), and constructing the config validates each group
once, then what spans groups (`ScriptConfig.check_across_groups`). A part of the program receives the groups it
reads (`ScriptConfig.group`), never a copy of their fields; derived values are properties, never written back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, TypeVar

DEFAULT_POLICY_MODEL = "HuggingFaceTB/smollm2-135M-SFT-Only"
DEFAULT_REWARD_MODEL = "../reward_model_on_orca_dataset/reward_model_orca_output/checkpoint-2160"
DEFAULT_DATASET = "Intel/orca_dpo_pairs"
DEFAULT_NUM_SAMPLES = 10_000
G = TypeVar("G")


def _help(text: str, **extra) -> dict:
    """A field's metadata for the argument parser: its help, and optionally ``aliases`` (other flags)."""
    return {"help": text, **extra}


def resume_rules(config_cls) -> tuple[frozenset[str], frozenset[str]]:
    """``(free, fixed)``: the settings that may change when a run resumes (bookkeeping, run length) and those that
    never may (the saved weights' shapes depend on them), as each field group declares them (``RESUME_FREE``,
    ``RESUME_FIXED``); any other setting changes the run's numbers and needs ``--allow-config-change``."""
    groups = config_cls.__mro__
    free = frozenset().union(*(vars(group).get("RESUME_FREE", frozenset()) for group in groups))
    fixed = frozenset().union(*(vars(group).get("RESUME_FIXED", frozenset()) for group in groups))
    return free, fixed


def check_finite(cfg) -> None:
    """Every float setting must be a real number: inf and nan pass `> 0` checks but wreck training."""
    for name in cfg.__dataclass_fields__:
        value = getattr(cfg, name)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{name} must hold finite numbers, got {value}")


def check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_probability(cfg, name: str, low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(cfg, name)
    ok = (0.0 < value if low_open else 0.0 <= value) and (value < 1.0 if high_open else value <= 1.0)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")


TRACKERS = ("tensorboard", "wandb", "trackio", "none")
ATTENTION_CHOICES = ("auto", "eager", "sdpa")


def check_trackers(report_to: list[str]) -> None:
    """Known tracker names, and the optional packages installed (before anything is loaded or written)."""
    import importlib.util

    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to must name some of {', '.join(TRACKERS)}, got {unknown}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"report_to 'none' cannot be combined with other trackers, got {report_to}")
    for name in ("wandb", "trackio"):
        if name in report_to and importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to {name} needs the {name} package: pip install {name} (or drop it)")


class FieldGroup:
    """A group of settings: its float settings finite, then its own rules (`check`), when it is constructed."""

    def __post_init__(self) -> None:
        check_finite(self)
        self.check()

    def check(self) -> None:
        """The rules this group's fields obey among themselves (raise `ValueError`); none by default."""


class ScriptConfig(FieldGroup):
    """A script's config: the flat union of its field groups (``GROUPS``, in the order ``--help`` shows them)."""

    GROUPS: ClassVar[tuple[type, ...]] = ()

    def __post_init__(self) -> None:
        for group in self.GROUPS:
            self.group(group)  # each group validates its own fields
        self.check_across_groups()

    def check_across_groups(self) -> None:
        """Rules that span groups (raise `ValueError`); none by default."""

    def group(self, group: type[G]) -> G:
        """This config's settings of `group`, as that group (frozen): what a part of the program receives."""
        return group(**{f.name: getattr(self, f.name) for f in fields(group)})

    @classmethod
    def from_groups(cls, groups) -> ScriptConfig:
        """The config holding the settings of the filled `groups` (one instance of each of ``GROUPS``)."""
        return cls(**{f.name: getattr(group, f.name) for group in groups for f in fields(group)})


@dataclass(frozen=True)
class DebugFields(FieldGroup):
    _argument_group_name = "run"
    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"debug"})  # may change on resume

    debug: bool = field(default=False, metadata=_help("Show full tracebacks instead of one-line errors."))


@dataclass(frozen=True)
class PresetFields(FieldGroup):
    _argument_group_name = "presets"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"preset"})  # may change on resume

    preset: Optional[str] = field(
        default=None,
        metadata=_help(
            "Recipe applied before YAML/CLI values: a name in recipes/<script>/ (smoke, full, lora, ...).",
        ),
    )


@dataclass(frozen=True)
class PolicyFields(FieldGroup):
    _argument_group_name = "model"

    policy_model: str = field(
        default=DEFAULT_POLICY_MODEL,
        metadata=_help(
            "Policy (SFT) model: hub id or local directory.", aliases=["--model_name_or_path", "--sft_model_path"]
        ),
    )


@dataclass(frozen=True)
class DataFields(FieldGroup):
    _argument_group_name = "data"

    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata=_help(
            "Prompt dataset: hub id or local .json/.jsonl/.parquet/.csv with system/question columns.",
            aliases=["--dataset_name"],
        ),
    )
    dataset_split: str = field(
        default="train",
        metadata=_help("Dataset split to read (hub datasets only).", aliases=["--dataset_train_split"]),
    )
    num_samples: int = field(
        default=DEFAULT_NUM_SAMPLES,
        metadata=_help("Use the first N rows of the dataset for training; the rest stay unseen."),
    )

    def check(self) -> None:
        check_positive(self, "num_samples")


@dataclass(frozen=True)
class PrecisionFields(FieldGroup):
    _argument_group_name = "precision and memory"

    bf16: bool = field(default=False, metadata=_help("bfloat16 autocast for forward passes (fp32 master weights)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward to save memory (--no-gradient-checkpointing).")
    )
    attn_implementation: str = field(
        default="auto",
        metadata=_help(
            "Attention kernel: auto (the model's own, SDPA for Llama), eager (about 20 %% faster on CPU, more memory) "
            "or sdpa."
        ),
    )

    def check(self) -> None:
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise ValueError(
                f"attn_implementation must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attn_implementation!r}"
            )


@dataclass(frozen=True)
class LoRAFields(FieldGroup):
    _argument_group_name = "LoRA"

    RESUME_FIXED: ClassVar[frozenset[str]] = frozenset(
        {"use_lora", "lora_r", "lora_target_modules"}
    )  # the weights' shapes

    use_lora: bool = field(
        default=False,
        metadata=_help("Train LoRA adapters on the policy instead of all weights.", aliases=["--use_peft"]),
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank r."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha."))
    lora_dropout: float = field(
        default=0.0, metadata=_help("LoRA dropout. PPO switches all dropout off so its ratio is exact.")
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_help("Names of the modules that get LoRA adapters."),
    )

    def check(self) -> None:
        check_positive(self, "lora_r", "lora_alpha")
        check_probability(self, "lora_dropout", high_open=True)
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module, e.g. q_proj v_proj")


@dataclass(frozen=True)
class OptimizerFields(FieldGroup):
    _argument_group_name = "optimizer and schedule"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"num_train_epochs"})  # may change on resume

    lr_scheduler_type: str = field(
        default="cosine", metadata=_help("Learning-rate schedule (any transformers scheduler name).")
    )
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of all optimisation steps spent warming up."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this value."))
    num_train_epochs: int = field(default=3, metadata=_help("Passes over the training prompts."))
    seed: int = field(default=42, metadata=_help("Random seed for data order, sampling and initialisation."))

    def check(self) -> None:
        check_positive(self, "num_train_epochs")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        check_probability(self, "warmup_ratio", high_open=True)
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class OutputFields(FieldGroup):
    _argument_group_name = "output, logging and resuming"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {
            "output_dir",
            "overwrite_output_dir",
            "logging_steps",
            "save_steps",
            "save_total_limit",
            "resume_from_checkpoint",
            "report_to",
        }
    )  # may change on resume

    output_dir: str = field(
        default="./ppo_training_output", metadata=_help("Where the model, logs and checkpoints go.")
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help("Replace a finished or interrupted run in output_dir (its files are removed)."),
    )
    logging_steps: int = field(default=1, metadata=_help("Write TensorBoard scalars every N updates."))
    save_steps: int = field(default=50, metadata=_help("Write a checkpoint every N updates."))
    save_total_limit: int = field(default=1, metadata=_help("Keep at most this many checkpoint-* directories."))
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata=_help("Continue a run from a checkpoint-N directory, or 'latest' in output_dir."),
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata=_help(
            "Where scalars go: any of tensorboard, wandb, trackio, or none (wandb/trackio: pip install).",
        ),
    )

    def check(self) -> None:
        check_positive(self, "logging_steps", "save_steps", "save_total_limit")
        check_trackers(self.report_to)
