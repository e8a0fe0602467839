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
from typing import Optional

from smolppo.configs.algorithm import AlgorithmSettings
from smolppo.configs.parts import (
    DEFAULT_REWARD_MODEL,
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
    check_probability,
)
from smolppo.configs.schedule import Schedule

KL_HORIZON_UPDATES = 1  # default horizon = this many updates' episodes: at most +-20% per update, any estimator
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")  # need several samples of each prompt
NO_REWARD_MODEL = "none"


def names_a_reward_model(reward_model: str) -> bool:
    """False for ``--reward-model none`` (functions only), in any case and spacing."""
    return reward_model.strip().lower() != NO_REWARD_MODEL


@dataclass
class RewardFields:
    SECTION = "rewards"

    reward_model: str = field(
        default=DEFAULT_REWARD_MODEL,
        metadata=_help(
            "Reward model (1-output sequence classifier): hub id, local directory or checkpoint-N; 'none' to "
            "train on --reward-funcs alone.",
            aliases=["--reward_model_path"],
        ),
    )
    reward_template: Optional[str] = field(
        default=None,
        metadata=_help(
            "How the reward model reads a response: 'chat' (its tokenizer's chat template, as RewardTrainer "
            "trains), 'plain' (prompt + response + EOS), or a Jinja template string/file. Default: chat, or what "
            "train_reward_model.py recorded."
        ),
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Reward functions 'file.py:name' or 'module:name' (trl's signature: prompts, completions, dataset "
            "columns as keyword arguments -> list of floats or None); added to the reward model's score."
        ),
    )
    reward_weights: list[float] = field(
        default_factory=list,
        metadata=_help("Weight of each reward source: the reward model first (if used), then each function (1)."),
    )
    reward_check_pairs: int = field(
        default=64,
        metadata=_help("Held-out chosen/rejected pairs the reward model is checked on before training (0: skip)."),
    )
    min_reward_accuracy: Optional[float] = field(
        default=None, metadata=_help("Refuse to train when the reward model's pairwise accuracy is below this.")
    )
    missing_eos_score: Optional[float] = field(
        default=None, metadata=_help("If set, responses that never emit EOS get this score instead of the reward.")
    )
    missing_eos_penalty: Optional[float] = field(
        default=None,
        metadata=_help("If set, subtracted from the reward of responses that never emit EOS (trl's meaning)."),
    )

    @property
    def uses_reward_model(self) -> bool:
        return names_a_reward_model(self.reward_model)

    def _check_rewards(self) -> None:
        if not self.uses_reward_model and not self.reward_funcs:
            raise ValueError("reward_model is 'none' but no --reward-funcs were given; give at least one reward")
        sources = int(self.uses_reward_model) + len(self.reward_funcs)
        if self.reward_weights and len(self.reward_weights) != sources:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {sources} reward sources (the reward "
                "model first, if used, then each --reward-funcs entry)"
            )
        for spec in self.reward_funcs:
            if ":" not in spec.replace(":\\", "").replace(":/", ""):
                raise ValueError(f"reward_funcs entry {spec!r} must be 'file.py:function' or 'module:function'")
        if not (isinstance(self.reward_check_pairs, int) and self.reward_check_pairs >= 0):
            raise ValueError(f"reward_check_pairs must be an integer >= 0, got {self.reward_check_pairs!r}")
        if self.min_reward_accuracy is not None:
            check_probability(self, "min_reward_accuracy")
            if not self.reward_check_pairs or not self.uses_reward_model:
                why = "reward_check_pairs is 0" if self.uses_reward_model else "there is no reward model"
                raise ValueError(
                    f"min_reward_accuracy {self.min_reward_accuracy} cannot be checked: {why}; drop it or let the "
                    "reward model be checked (--reward-check-pairs N)"
                )
        if self.missing_eos_score is not None and self.missing_eos_penalty is not None:
            raise ValueError(
                "set missing_eos_score (replaces the reward) or missing_eos_penalty (subtracted), not both"
            )


@dataclass
class AlgorithmFields:
    SECTION = "algorithm: estimator, KL, PPO"

    advantage_estimator: str = field(
        default="gae",
        metadata=_help(
            "gae (PPO with a value model), grpo (group-normalised rewards), rloo (leave-one-out baseline) or "
            "reinforce_pp (REINFORCE++: whitened discounted returns); only gae loads a value model."
        ),
    )
    samples_per_prompt: int = field(
        default=1,
        metadata=_help(
            "Responses sampled per prompt in an update (grpo and rloo need at least 2).", aliases=["--num_generations"]
        ),
    )
    scale_rewards: bool = field(
        default=True, metadata=_help("grpo: divide by the group's reward std (--no-scale-rewards: centre only).")
    )
    kl_in_loss: bool = field(
        default=False,
        metadata=_help("Add the KL to the reference as a loss term (k3, as GRPO does) instead of a reward penalty."),
    )
    ppo_epochs: int = field(
        default=4, metadata=_help("Optimisation passes over each rollout batch.", aliases=["--num_ppo_epochs"])
    )
    init_kl_coef: float = field(
        default=0.05,
        metadata=_help("Initial coefficient of the per-token KL penalty.", aliases=["--kl_coef", "--beta"]),
    )
    adaptive_kl: bool = field(
        default=True, metadata=_help("Steer the KL coefficient towards `target` (--no-adaptive-kl keeps it fixed).")
    )
    target: float = field(default=6.0, metadata=_help("Target KL (nats per response) for the adaptive controller."))
    horizon: Optional[int] = field(
        default=None,
        metadata=_help(
            "Adaptive KL horizon, in episodes (trl's unit). Default: one update's episodes, so the coefficient moves "
            "by at most 20%% per update whatever the estimator, batch or run length (trl's fixed 10000: ~2x per run)."
        ),
    )
    kl_estimator: str = field(
        default="k1", metadata=_help("Per-token KL estimator: k1 (log-ratio, unbiased) or k3 (non-negative).")
    )
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    cliprange: float = field(default=0.2, metadata=_help("Clip range epsilon of the policy ratio."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value prediction (gae)."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss in the total loss (gae)."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards before GAE."))

    @property
    def uses_value_model(self) -> bool:
        return self.advantage_estimator == "gae"

    def _check_algorithm(self) -> None:
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got "
                f"{self.advantage_estimator!r}"
            )
        check_positive(self, "samples_per_prompt", "ppo_epochs")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator} compares responses to the same prompt: set "
                f"--samples-per-prompt to 2 or more (got {self.samples_per_prompt})"
            )
        if self.horizon is not None:
            check_positive(self, "horizon")
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


@dataclass
class HubFields:
    SECTION = "hub"

    push_to_hub: bool = field(
        default=False, metadata=_help("After a finished run, upload the final model, tokenizer and card to the hub.")
    )
    hub_model_id: Optional[str] = field(
        default=None, metadata=_help("Hub repository for --push-to-hub (default: the output directory's name).")
    )
    hub_private_repo: bool = field(default=False, metadata=_help("Create the hub repository as private."))


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
        metadata=_help("On resume, apply settings that differ from the checkpoint's (recorded in run_summary.json)."),
    )
    save_optimizer_state: str = field(
        default="latest",
        metadata=_help(
            "Which kept checkpoints hold the AdamW state (2/3 of a full fine-tune's checkpoint): 'latest' (the one "
            "resume picks; older kept ones keep weights only and resume with fresh moments) or 'all'."
        ),
    )
    discard_newer_checkpoints: bool = field(
        default=False, metadata=_help("Resume from an older checkpoint and delete the checkpoints after it.")
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
        default=None, metadata=_help("Stop after this many updates (default: num_train_epochs of prompts).")
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
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: mini_batch_size / per_device_train_batch_size."""
        return self.mini_batch_size // self.per_device_train_batch_size

    def algorithm_settings(self) -> AlgorithmSettings:
        """The fields the algorithm reads, resolved; the algorithm gets this, not the whole config."""
        values = {f.name: getattr(self, f.name) for f in fields(AlgorithmSettings)}
        return AlgorithmSettings(**{**values, "learning_rate": self.peak_learning_rate})

    def recorded(self) -> dict:
        """The config as a run records it (summary, checkpoints, the resume check, trackers): every field, with the
        learning rate and gradient accumulation as they apply."""
        return {
            **asdict(self),
            "learning_rate": self.peak_learning_rate,
            "gradient_accumulation_steps": self.accumulation_steps,
        }

    def __post_init__(self) -> None:
        if self.num_mini_batches is not None:
            sequences = self.rollout_batch_size * self.samples_per_prompt
            if not (isinstance(self.num_mini_batches, int) and self.num_mini_batches > 0):
                raise ValueError(f"num_mini_batches must be a positive integer, got {self.num_mini_batches!r}")
            if sequences % self.num_mini_batches:
                raise ValueError(
                    f"num_mini_batches ({self.num_mini_batches}) must divide rollout_batch_size x samples_per_prompt "
                    f"({sequences})"
                )
            self.mini_batch_size = sequences // self.num_mini_batches
        super().__post_init__()

    def _check_ppo(self) -> None:
        if not self.peak_learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.peak_learning_rate}")
        check_positive(self, "max_prompt_length", "rollout_batch_size", "mini_batch_size")
        check_positive(self, "per_device_train_batch_size", "max_new_tokens", "sample_logging_steps")
        for name in ("max_updates", "total_episodes"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if sequences % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size x samples_per_prompt ({sequences}) must be a multiple of mini_batch_size "
                f"({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.per_device_train_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of per_device_train_batch_size "
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
        minibatches = self.rollout_batch_size * self.samples_per_prompt // self.mini_batch_size
        steps_per_update = self.ppo_epochs * minibatches
        return Schedule(
            kl_horizon=self.horizon or KL_HORIZON_UPDATES * episodes_per_update,
            global_rollout_batch=global_batch,
            episodes_per_update=episodes_per_update,
            updates_per_epoch=updates_per_epoch,
            total_updates=total,
            planned_updates=planned,
            optimizer_steps_per_update=steps_per_update,
            warmup_steps=math.ceil(self.warmup_ratio * planned * steps_per_update),
        )
