"""`evaluate_generations.py`'s configuration. Unset fields are taken from the training run when found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from smolppo.configs.parts import DebugFields, FieldGroup, ScriptConfig, _help, check_positive, check_probability


@dataclass(frozen=True)
class EvaluationFields(FieldGroup):
    _argument_group_name = "evaluation"

    model_path: list[str] = field(
        default_factory=lambda: ["./ppo_training_output"],
        metadata=_help(
            "Model(s) to evaluate: full model dir, LoRA adapter dir, checkpoint-N or hub id. Several "
            "are compared on the same prompts."
        ),
    )
    baseline_model: Optional[str] = field(
        default=None, metadata=_help("Model every --model-path is compared against (e.g. the SFT model).")
    )
    reward_model: Optional[str] = field(
        default=None,
        metadata=_help(
            "Reward model ('none': --reward-funcs alone); default: the one the training run used, else the "
            "training default."
        ),
    )
    reward_template: Optional[str] = field(
        default=None,
        metadata=_help("How the reward model reads a response (chat, plain or Jinja); default: the training run's."),
    )
    reward_funcs: Optional[list[str]] = field(
        default=None,
        metadata=_help(
            "Reward functions 'file.py:name' or 'module:name'; default: the training run's (none when "
            "--reward-model is given)."
        ),
    )
    reward_weights: Optional[list[float]] = field(
        default=None, metadata=_help("Weight of each reward source; default: the training run's.")
    )
    dataset: Optional[str] = field(
        default=None, metadata=_help("Prompt source; default: the training run's dataset, after its training rows.")
    )
    dataset_split: str = field(default="train", metadata=_help("Dataset split to read (hub datasets only)."))
    skip_rows: Optional[int] = field(
        default=None,
        metadata=_help(
            "Rows at the start of the dataset not to draw from; default: the training run's num_samples "
            "when evaluating its dataset, else 0."
        ),
    )
    num_prompts: int = field(default=20, metadata=_help("Random prompts to evaluate."))
    num_completions: int = field(default=4, metadata=_help("Completions generated per prompt (at least 2)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature."))
    top_p: float = field(default=0.9, metadata=_help("Nucleus sampling threshold."))
    max_new_tokens: int = field(default=128, metadata=_help("Maximum tokens generated per completion."))
    max_prompt_length: int = field(default=512, metadata=_help("Prompts longer than this many tokens are skipped."))
    batch_size: int = field(default=32, metadata=_help("Sequences generated and scored at a time."))
    bootstrap_samples: int = field(default=2000, metadata=_help("Bootstrap resamples for confidence intervals."))
    seed: int = field(default=42, metadata=_help("Seed for prompt choice and sampling (same seed, same prompts)."))
    output: Optional[str] = field(
        default=None, metadata=_help("JSON output path; default: evaluation.json in the first model's directory.")
    )
    report: Optional[str] = field(
        default=None,
        metadata=_help(
            "Directory for the comparison report: report.md, report.json (every number) and PNG figures; adds "
            "reference-answer perplexity and KL to the first model. The JSON goes there unless --output is given."
        ),
    )
    report_examples: int = field(
        default=3, metadata=_help("Prompts shown with every model's completions in report.md.")
    )
    reference_max_tokens: int = field(
        default=256, metadata=_help("Reference (`chosen`) answers are scored on at most this many tokens.")
    )
    device: Optional[str] = field(default=None, metadata=_help("cpu or cuda; default: cuda when available."))
    bf16: bool = field(
        default=False,
        metadata=_help("bf16 autocast for generation and scoring (fast on recent GPUs and on CPUs with AVX512-BF16)."),
    )

    def check(self) -> None:
        check_positive(
            self,
            "num_prompts",
            "max_new_tokens",
            "max_prompt_length",
            "batch_size",
            "bootstrap_samples",
            "reference_max_tokens",
        )
        if self.report_examples < 0:
            raise ValueError(f"report_examples must be >= 0, got {self.report_examples}")
        if self.num_completions < 2:
            raise ValueError(f"num_completions must be at least 2 to rank BEST/WORST, got {self.num_completions}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_probability(self, "top_p", low_open=True)
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.skip_rows is not None and self.skip_rows < 0:
            raise ValueError(f"skip_rows must be >= 0, got {self.skip_rows}")
        if not self.model_path:
            raise ValueError("model_path needs at least one model")


@dataclass(frozen=True)
class EvalConfig(EvaluationFields, DebugFields, ScriptConfig):
    """Everything `evaluate_generations.py` needs."""

    GROUPS: ClassVar[tuple[type, ...]] = (EvaluationFields, DebugFields)
