"""Configuration for every script in this project: one dataclass per script, one field per knob.

The command line (``--kebab-case`` flags), the optional YAML file (``--config FILE``) and the presets
(``--preset smoke``) are all generated from these dataclasses, so a field added here is immediately
settable everywhere. Precedence, lowest first: dataclass default < preset < YAML file < command line.

Batch vocabulary used by the PPO loop (all counts are per process):

* ``rollout_batch_size`` prompts are generated for in one PPO update;
* the rollout is cut into mini-batches of ``mini_batch_size`` sequences, one optimizer step each;
* a mini-batch is processed ``per_device_train_batch_size`` sequences at a time, so
  ``gradient_accumulation_steps = mini_batch_size / per_device_train_batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_POLICY_MODEL = "HuggingFaceTB/smollm2-135M-SFT-Only"
DEFAULT_REWARD_MODEL = "../reward_model_on_orca_dataset/reward_model_orca_output/checkpoint-2160"
DEFAULT_DATASET = "Intel/orca_dpo_pairs"
PRESETS = ("smoke",)
KL_HORIZON_FRACTION = 40  # default horizon = the episodes of num_train_epochs / this


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class CommonConfig:
    """Knobs shared by every training script: models, data, precision, LoRA, optimisation, output."""

    # Presets and models
    preset: Optional[str] = field(
        default=None, metadata=_help("Named preset applied before YAML/CLI values. 'smoke': tiny offline CPU run.")
    )
    policy_model: str = field(
        default=DEFAULT_POLICY_MODEL, metadata=_help("Policy (SFT) model: hub id or local directory.")
    )
    reward_model: str = field(
        default=DEFAULT_REWARD_MODEL,
        metadata=_help("Reward model (1-output sequence classifier): hub id, local directory or checkpoint-N."),
    )
    reward_template: Optional[str] = field(
        default=None,
        metadata=_help(
            "How the reward model reads a response: 'chat' (its tokenizer's chat template, as RewardTrainer "
            "trains), 'plain' (prompt + response + EOS), or a Jinja template string/file. Default: chat, or what "
            "train_reward_model.py recorded."
        ),
    )
    # Data
    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata=_help("Prompt dataset: hub id or local .json/.jsonl/.parquet/.csv with system/question columns."),
    )
    dataset_split: str = field(default="train", metadata=_help("Dataset split to read (hub datasets only)."))
    num_samples: int = field(
        default=10_000, metadata=_help("Use the first N rows of the dataset for training; the rest stay unseen.")
    )
    max_prompt_length: int = field(
        default=512, metadata=_help("Prompts longer than this many tokens are dropped (and counted), never cut.")
    )
    # Precision and memory
    bf16: bool = field(default=False, metadata=_help("bfloat16 autocast for forward passes (fp32 master weights)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward to save memory (--no-gradient-checkpointing).")
    )
    # LoRA
    use_lora: bool = field(default=False, metadata=_help("Train LoRA adapters on the policy instead of all weights."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank r."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha."))
    lora_dropout: float = field(
        default=0.0, metadata=_help("LoRA dropout. PPO switches all dropout off so its ratio is exact.")
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_help("Names of the modules that get LoRA adapters."),
    )
    # Optimisation
    learning_rate: float = field(default=5e-6, metadata=_help("Peak learning rate of AdamW."))
    lr_scheduler_type: str = field(
        default="cosine", metadata=_help("Learning-rate schedule (any transformers scheduler name).")
    )
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of all optimisation steps spent warming up."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this value."))
    num_train_epochs: int = field(default=3, metadata=_help("Passes over the training prompts."))
    seed: int = field(default=42, metadata=_help("Random seed for data order, sampling and initialisation."))
    # Output
    output_dir: str = field(
        default="./ppo_training_output", metadata=_help("Where the model, logs and checkpoints go.")
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Replace a finished or interrupted run in output_dir (its files are removed).")
    )
    logging_steps: int = field(default=1, metadata=_help("Write TensorBoard scalars every N updates."))
    save_steps: int = field(default=50, metadata=_help("Write a checkpoint every N updates."))
    save_total_limit: int = field(default=1, metadata=_help("Keep at most this many checkpoint-* directories."))
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata=_help("Continue a run from a checkpoint-N directory, or 'latest' in output_dir.")
    )
    debug: bool = field(default=False, metadata=_help("Show full tracebacks instead of one-line errors."))

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        _finite(self)
        _positive(self, "num_samples", "max_prompt_length", "lora_r", "lora_alpha", "num_train_epochs")
        _positive(self, "logging_steps", "save_steps", "save_total_limit")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module, e.g. q_proj v_proj")


@dataclass
class PPOConfig(CommonConfig):
    """Everything `train_ppo.py` needs. Defaults follow the project specification."""

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
    value_model: Optional[str] = field(
        default=None,
        metadata=_help(
            "Value model to start from. Default: the reward model when it shares the policy's vocabulary, else "
            "the policy with a new 1-output head."
        ),
    )
    reward_check_pairs: int = field(
        default=64,
        metadata=_help("Held-out chosen/rejected pairs the reward model is checked on before training (0: skip)."),
    )
    min_reward_accuracy: Optional[float] = field(
        default=None, metadata=_help("Refuse to train when the reward model's pairwise accuracy is below this.")
    )
    allow_config_change: bool = field(
        default=False,
        metadata=_help("On resume, apply settings that differ from the checkpoint's (recorded in run_summary.json)."),
    )
    discard_newer_checkpoints: bool = field(
        default=False, metadata=_help("Resume from an older checkpoint and delete the checkpoints after it.")
    )
    # Batches (per process)
    rollout_batch_size: int = field(default=64, metadata=_help("Prompts generated for in one PPO update."))
    mini_batch_size: int = field(default=16, metadata=_help("Sequences per optimizer step within an update."))
    per_device_train_batch_size: int = field(
        default=4, metadata=_help("Sequences per forward/backward pass (micro-batch).")
    )
    gradient_accumulation_steps: Optional[int] = field(
        default=None,
        metadata=_help("Micro-batches per optimizer step; derived as mini_batch_size / per_device_train_batch_size."),
    )
    max_updates: Optional[int] = field(
        default=None, metadata=_help("Stop after this many PPO updates (default: num_train_epochs of prompts).")
    )
    # PPO
    ppo_epochs: int = field(default=4, metadata=_help("Optimisation passes over each rollout batch."))
    init_kl_coef: float = field(default=0.05, metadata=_help("Initial coefficient of the per-token KL penalty."))
    adaptive_kl: bool = field(
        default=True, metadata=_help("Steer the KL coefficient towards `target` (--no-adaptive-kl keeps it fixed).")
    )
    target: float = field(default=6.0, metadata=_help("Target KL (nats per response) for the adaptive controller."))
    horizon: Optional[int] = field(
        default=None,
        metadata=_help(
            "Adaptive KL horizon, in episodes. Default: the episodes of num_train_epochs / 40, so the coefficient "
            "can move up to e^8 over a run, 0.2 x 40 / updates per update (a fixed 10000: only ~2x per run)."
        ),
    )
    kl_estimator: str = field(
        default="k1", metadata=_help("Per-token KL estimator: k1 (log-ratio, unbiased) or k3 (non-negative).")
    )
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    cliprange: float = field(default=0.2, metadata=_help("Clip range epsilon of the policy ratio."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value prediction."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss in the total loss."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards before GAE."))
    missing_eos_score: Optional[float] = field(
        default=None, metadata=_help("If set, responses that never emit EOS get this score instead of the reward.")
    )
    # Generation
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature (rollouts and evaluation)."))
    top_p: float = field(default=0.9, metadata=_help("Nucleus sampling for evaluation generations."))
    rollout_top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling during training rollouts; must stay 1.0 (see README).")
    )
    max_new_tokens: int = field(default=128, metadata=_help("Maximum tokens generated per response."))
    # Logging
    num_logged_samples: int = field(default=4, metadata=_help("Prompt/response/reward triples logged as text."))
    sample_logging_steps: int = field(default=10, metadata=_help("Log sample triples every N updates."))

    def __post_init__(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = self.lora_learning_rate if self.use_lora else self.full_learning_rate
        super().__post_init__()
        _positive(self, "rollout_batch_size", "mini_batch_size", "per_device_train_batch_size", "ppo_epochs")
        _positive(self, "max_new_tokens", "sample_logging_steps")
        if self.horizon is not None:
            _positive(self, "horizon")
        if self.max_updates is not None and self.max_updates <= 0:
            raise ValueError(f"max_updates must be a positive integer, got {self.max_updates}")
        if not (isinstance(self.reward_check_pairs, int) and self.reward_check_pairs >= 0):
            raise ValueError(f"reward_check_pairs must be an integer >= 0, got {self.reward_check_pairs!r}")
        if self.min_reward_accuracy is not None and not 0.0 <= self.min_reward_accuracy <= 1.0:
            raise ValueError(f"min_reward_accuracy must be in [0, 1], got {self.min_reward_accuracy}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size "
                f"({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.per_device_train_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size})"
            )
        derived = self.mini_batch_size // self.per_device_train_batch_size
        if self.gradient_accumulation_steps is None:
            self.gradient_accumulation_steps = derived
        elif self.gradient_accumulation_steps != derived:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must equal mini_batch_size / "
                f"per_device_train_batch_size = {derived}; set mini_batch_size, or leave gradient_accumulation_steps "
                "out"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if not self.init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if not self.target > 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if not (self.cliprange > 0 and self.cliprange_value > 0):
            raise ValueError("cliprange and cliprange_value must be > 0")
        if not self.vf_coef >= 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.rollout_top_p != 1.0:
            raise ValueError(
                f"rollout_top_p={self.rollout_top_p} is refused: PPO's ratio needs the log-probs of the distribution "
                "actually sampled, and nucleus truncation changes it per step. Keep rollout_top_p=1.0 (use "
                "temperature to sharpen sampling); top_p applies to evaluation"
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
        total = updates_per_epoch * self.num_train_epochs
        if self.max_updates is not None:
            total = min(total, self.max_updates)
        minibatches = self.rollout_batch_size // self.mini_batch_size
        planned = updates_per_epoch * self.num_train_epochs * global_batch  # not max_updates: same on resume
        horizon = self.horizon or max(1, round(planned / KL_HORIZON_FRACTION))
        return Schedule(
            kl_horizon=horizon,
            global_rollout_batch=global_batch,
            updates_per_epoch=updates_per_epoch,
            total_updates=total,
            optimizer_steps_per_update=self.ppo_epochs * minibatches,
            warmup_updates=math.ceil(self.warmup_ratio * total),
        )


@dataclass(frozen=True)
class Schedule:
    """Step counts derived from the config and the data; computed only by `PPOConfig.schedule`."""

    kl_horizon: int
    global_rollout_batch: int
    updates_per_epoch: int
    total_updates: int
    optimizer_steps_per_update: int
    warmup_updates: int


def _finite(cfg) -> None:
    """Every float setting must be a real number: inf and nan pass `> 0` checks but wreck training."""
    for name in cfg.__dataclass_fields__:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class RewardModelConfig(CommonConfig):
    """Everything `train_reward_model.py` needs: a 1-output classifier trained on chosen/rejected pairs."""

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

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        _positive(self, "max_length", "eval_steps")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps}")


# Values a preset sets; YAML and command-line values still override them. Paths starting with
# "smoke:" are materialised locally by smolppo.smoke (tiny random models, committed tokenizer).
PRESET_VALUES: dict[str, dict] = {
    "smoke": {
        "policy_model": "smoke:policy",
        "reward_model": "smoke:reward",
        "dataset": "smoke:orca",
        "num_samples": 96,
        "max_prompt_length": 128,
        "rollout_batch_size": 16,
        "mini_batch_size": 8,
        "per_device_train_batch_size": 4,
        "ppo_epochs": 2,
        "num_train_epochs": 8,
        "max_new_tokens": 12,
        "full_learning_rate": 3e-3,
        "lora_learning_rate": 3e-3,  # the output head carries an adapter here, so no 10x (see README)
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "temperature": 1.0,
        "init_kl_coef": 0.1,
        "gradient_checkpointing": False,
        "save_steps": 10,
        "sample_logging_steps": 5,
        "output_dir": "./ppo_smoke_output",
    },
}


@dataclass
class EvalConfig:
    """Everything `evaluate_generations.py` needs. Unset fields are taken from the training run when found."""

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
        metadata=_help("Reward model; default: the one the training run used, else the training default."),
    )
    reward_template: Optional[str] = field(
        default=None,
        metadata=_help("How the reward model reads a response (chat, plain or Jinja); default: the training run's."),
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
    device: Optional[str] = field(default=None, metadata=_help("cpu or cuda; default: cuda when available."))
    debug: bool = field(default=False, metadata=_help("Show full tracebacks instead of one-line errors."))

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "num_prompts", "max_new_tokens", "max_prompt_length", "batch_size", "bootstrap_samples")
        if self.num_completions < 2:
            raise ValueError(f"num_completions must be at least 2 to rank BEST/WORST, got {self.num_completions}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.skip_rows is not None and self.skip_rows < 0:
            raise ValueError(f"skip_rows must be >= 0, got {self.skip_rows}")
        if not self.model_path:
            raise ValueError("model_path needs at least one model")


@dataclass
class PlotConfig:
    """Everything `plot_training_progress.py` needs."""

    log_dir: list[str] = field(
        default_factory=lambda: ["./ppo_training_output/logs"],
        metadata=_help("TensorBoard log dir(s) or a directory of runs; several are overlaid."),
    )
    output: Optional[str] = field(
        default=None, metadata=_help("PNG path; default: training_progress.png beside the first log dir.")
    )
    csv: Optional[str] = field(
        default=None, metadata=_help("CSV path for every scalar; default: training_scalars.csv beside the PNG.")
    )
    smooth: float = field(default=0.0, metadata=_help("Exponential smoothing weight in [0, 1); 0 plots raw values."))
    title: str = field(default="PPO training progress", metadata=_help("Figure title."))
    debug: bool = field(default=False, metadata=_help("Show full tracebacks instead of one-line errors."))

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")
        if not self.log_dir:
            raise ValueError("log_dir needs at least one directory")


REWARD_PRESET_VALUES: dict[str, dict] = {
    "smoke": {
        "policy_model": "smoke:policy",
        "dataset": "smoke:orca",
        "num_samples": 128,
        "test_size": 0.2,
        "max_length": 320,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "logging_steps": 5,
        "eval_steps": 20,
        "save_steps": 20,
        "gradient_checkpointing": False,
        "output_dir": "./reward_smoke_output",
    },
}
