"""The field groups only `train_ppo.py` has: rewards, the advantage estimator, the KL, the loss, sampling, batches,
the run's length and learning rates, checkpoints and the hub (the shared ones are in `parts`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from smolppo.configs.parts import (
    DEFAULT_REWARD_MODEL,
    DataFields,
    FieldGroup,
    OptimizerFields,
    OutputFields,
    PolicyFields,
    _help,
    check_positive,
    check_probability,
)

KL_HORIZON_UPDATES = 1  # default horizon = this many updates' episodes: at most +-20% per update, any estimator
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")  # need several samples of each prompt
KL_CONTROLLERS = ("adaptive", "pi", "pid")  # smolppo.algorithm.ppo_math.kl_controller
NO_REWARD_MODEL = "none"
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")  # smolppo.algorithm.ppo_math.aggregate
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
GENERATION_BACKENDS = ("hf", "vllm")  # smolppo.algorithm.samplers
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")
# How the sampler/trainer log-prob mismatch is corrected (smolppo.algorithm.ppo_math.sampler_correction)
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def names_a_reward_model(reward_model: str) -> bool:
    """False for ``--reward-model none`` (functions only), in any case and spacing."""
    return reward_model.strip().lower() != NO_REWARD_MODEL


@dataclass(frozen=True)
class RewardFields(FieldGroup):
    _argument_group_name = "rewards"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {"reward_check_pairs", "min_reward_accuracy"}
    )  # may change on resume

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
        default=None,
        metadata=_help("Refuse to train when the reward model's pairwise accuracy is below this."),
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

    def check(self) -> None:
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


@dataclass(frozen=True)
class EstimatorFields(FieldGroup):
    """How rewards become advantages."""

    _argument_group_name = "advantage estimator"

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
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards before GAE."))

    @property
    def uses_value_model(self) -> bool:
        return self.advantage_estimator == "gae"

    def check(self) -> None:
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got "
                f"{self.advantage_estimator!r}"
            )
        check_positive(self, "samples_per_prompt")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator} compares responses to the same prompt: set "
                f"--samples-per-prompt to 2 or more (got {self.samples_per_prompt})"
            )
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")


@dataclass(frozen=True)
class KLFields(FieldGroup):
    """The KL to the reference: where it enters, its estimator, and how its coefficient is controlled."""

    _argument_group_name = "KL to the reference"

    kl_in_loss: bool = field(
        default=False,
        metadata=_help("Add the KL to the reference as a loss term (k3, as GRPO does) instead of a reward penalty."),
    )
    init_kl_coef: float = field(
        default=0.05,
        metadata=_help("Initial coefficient of the per-token KL penalty.", aliases=["--kl_coef", "--beta"]),
    )
    adaptive_kl: bool = field(
        default=True, metadata=_help("Steer the KL coefficient towards kl_target (--no-adaptive-kl keeps it fixed).")
    )
    kl_controller: str = field(
        default="pid",
        metadata=_help(
            "How the adaptive coefficient moves: pid (proportional-integral-derivative on a smoothed KL, bounded to "
            "10x the initial coefficient either way, no windup; acts on the KL's trend too), pi (the same without "
            "the trend) or adaptive (Ziegler et al., trl's: multiplied by up to 1 +/- 20%% per update). "
            "docs/ALGORITHM.md compares them."
        ),
    )
    kl_integral_gain: float = field(
        default=0.6,
        metadata=_help(
            "pid / pi: the integral gain. Each update adds this x log(KL / target) (clipped to +-1) to log(coef), so "
            "a KL held above the target keeps raising the coefficient (and one below lowers it); 0.6 needs about 7 "
            "updates at 1.3x the target to raise it e-fold (0.1, the default before: 40)."
        ),
    )
    kl_target: float = field(
        default=6.0,
        metadata=_help("Target KL (nats per response) for the adaptive controller.", aliases=["--target"]),
    )
    kl_horizon: Optional[int] = field(
        default=None,
        metadata=_help(
            "Adaptive KL horizon, in episodes (trl's unit). Default: one update's episodes, so the coefficient moves "
            "by at most 20%% per update whatever the estimator, batch or run length (trl's fixed 10000: ~2x per run).",
            aliases=["--horizon"],
        ),
    )
    kl_estimator: str = field(
        default="k1", metadata=_help("Per-token KL estimator: k1 (log-ratio, unbiased) or k3 (non-negative).")
    )

    def check(self) -> None:
        if self.kl_controller not in KL_CONTROLLERS:
            raise ValueError(f"kl_controller must be one of {', '.join(KL_CONTROLLERS)}, got {self.kl_controller!r}")
        if self.kl_horizon is not None:
            check_positive(self, "kl_horizon")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if not self.init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if not self.kl_target > 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl_target}")
        if not self.kl_integral_gain >= 0:
            raise ValueError(f"kl_integral_gain must be >= 0, got {self.kl_integral_gain}")


@dataclass(frozen=True)
class LossFields(FieldGroup):
    """The clipped objective, its aggregation over tokens, and the optimisation passes."""

    _argument_group_name = "loss: PPO and its family"

    ppo_epochs: int = field(
        default=4, metadata=_help("Optimisation passes over each rollout batch.", aliases=["--num_ppo_epochs"])
    )
    cliprange: float = field(
        default=0.2, metadata=_help("Clip range epsilon of the policy ratio (its lower side).", aliases=["--epsilon"])
    )
    epsilon_high: Optional[float] = field(
        default=None,
        metadata=_help("Upper clip range of the ratio (DAPO's clip-higher, e.g. 0.28); default: --cliprange."),
    )
    dual_clip: Optional[float] = field(
        default=None, metadata=_help("Dual-clip PPO: bound the loss of negative advantages at -c x A (c > 1); off.")
    )
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value prediction (gae)."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss in the total loss (gae)."))
    loss_type: str = field(
        default="dapo",
        metadata=_help(
            "How a mini-batch's loss is aggregated (exactly, whatever the micro-batch): dapo (one mean over all "
            "response tokens; classic PPO), grpo (token mean per sequence, then over sequences), dr_grpo (token sum "
            "over sequences x max_new_tokens), bnpo (= dapo here). docs/ALGORITHM.md has the table."
        ),
    )
    importance_sampling_level: str = field(
        default="token",
        metadata=_help("token (PPO) or sequence (GSPO: one ratio per response, the mean token log-ratio)."),
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata=_help(
            "grpo/rloo: leave out of the loss the groups whose rewards are all equal (no signal; DAPO), counted "
            "in dynamic_sampling/dropped_responses."
        ),
    )
    dynamic_sampling_refills: int = field(
        default=0,
        metadata=_help(
            "With --dynamic-sampling: up to this many draws of new prompts to replace the groups without signal, "
            "keeping the batch full (DAPO); 0: the batch only shrinks."
        ),
    )

    def check(self) -> None:
        check_positive(self, "ppo_epochs")
        if not (self.cliprange > 0 and self.cliprange_value > 0):
            raise ValueError("cliprange and cliprange_value must be > 0")
        if not self.vf_coef >= 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be token or sequence, got {self.importance_sampling_level!r}"
            )
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (the bound is -c x A), got {self.dual_clip}")
        if not (isinstance(self.dynamic_sampling_refills, int) and self.dynamic_sampling_refills >= 0):
            raise ValueError(f"dynamic_sampling_refills must be an integer >= 0, got {self.dynamic_sampling_refills}")
        if self.dynamic_sampling_refills and not self.dynamic_sampling:
            raise ValueError("dynamic_sampling_refills refills what dynamic sampling drops: add --dynamic-sampling")


@dataclass(frozen=True)
class PPOPolicyFields(PolicyFields):
    """The policy, and the value model's start."""

    value_model: Optional[str] = field(
        default=None,
        metadata=_help(
            "Value model to start from (gae only). Default: the reward model when it shares the policy's "
            "vocabulary, else the policy with a new 1-output head."
        ),
    )


@dataclass(frozen=True)
class PromptFields(DataFields):
    """The prompts: which rows, and how long they may be."""

    max_prompt_length: int = field(
        default=512, metadata=_help("Prompts longer than this many tokens are dropped (and counted), never cut.")
    )

    def check(self) -> None:
        super().check()
        check_positive(self, "max_prompt_length")


@dataclass(frozen=True)
class SamplingFields(FieldGroup):
    """How responses are sampled during training."""

    _argument_group_name = "sampling the rollouts"

    temperature: float = field(default=0.7, metadata=_help("Sampling temperature of the rollouts."))
    rollout_top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling during training rollouts; must stay 1.0 (see README).")
    )
    max_new_tokens: int = field(
        default=128, metadata=_help("Maximum tokens generated per response.", aliases=["--response_length"])
    )

    def check(self) -> None:
        check_positive(self, "max_new_tokens")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.rollout_top_p != 1.0:
            raise ValueError(
                f"rollout_top_p={self.rollout_top_p} is refused: PPO's ratio needs the log-probs of the distribution "
                "actually sampled, and nucleus truncation changes it per step. Keep rollout_top_p=1.0 (use "
                "temperature to sharpen sampling); evaluate_generations.py has its own top_p"
            )


@dataclass(frozen=True)
class GenerationFields(FieldGroup):
    """Which engine samples the rollouts, and how its log-probs' mismatch with the trained model is corrected."""

    _argument_group_name = "generation backend"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {"vllm_gpu_memory_utilization", "vllm_kv_cache_gb", "vllm_max_num_batched_tokens", "vllm_enforce_eager"}
    )  # where the engine's memory goes, not what it samples

    generation_backend: str = field(
        default="hf",
        metadata=_help(
            "Who samples the rollouts: hf (transformers' generate, runs everywhere) or vllm (a vLLM engine in this "
            "process, fed the policy's weights before each rollout; Linux, pip install -r requirements-vllm.txt)."
        ),
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata=_help(
            "CUDA: the share of the GPU's memory vLLM may take (weights + KV cache); training has the rest."
        ),
    )
    vllm_kv_cache_gb: Optional[float] = field(
        default=None,
        metadata=_help("vLLM's KV cache in GiB (default: 1 on CPU; on CUDA the share above decides)."),
    )
    vllm_dtype: str = field(
        default="auto",
        metadata=_help(
            "The engine's precision: auto (the run's: bf16 with --bf16, else fp32), bfloat16, float16 or float32."
        ),
    )
    vllm_max_num_batched_tokens: int = field(
        default=8192,
        metadata=_help("Tokens vLLM schedules in one step (below 8192, per-request seeds can stop a CPU engine)."),
    )
    vllm_enforce_eager: Optional[bool] = field(
        default=None,
        metadata=_help("No CUDA graphs / compilation (default: eager on CPU, where compiling costs a minute+)."),
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata=_help(
            "Weight each token's policy loss by the trained model's / vLLM's probability of it (truncated "
            "importance sampling): corrects for the two engines computing slightly different distributions."
        ),
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata=_help(
            "token_truncate (min(ratio, cap) per token), token_mask (tokens above cap left out), sequence_truncate "
            "or sequence_mask (one ratio per response: trl's default)."
        ),
    )
    vllm_importance_sampling_cap: float = field(
        default=3.0,
        metadata=_help(
            "Upper bound of the sampler correction's ratio (trl's vllm_importance_sampling_clip_max).",
            aliases=["--vllm_importance_sampling_clip_max"],
        ),
    )

    def check(self) -> None:
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ValueError(
                f"generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, got {self.generation_backend!r}"
            )
        if self.vllm_importance_sampling_mode not in SAMPLER_CORRECTIONS:
            raise ValueError(
                f"vllm_importance_sampling_mode must be one of {', '.join(SAMPLER_CORRECTIONS)}, "
                f"got {self.vllm_importance_sampling_mode!r}"
            )
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gb is not None and not self.vllm_kv_cache_gb > 0:
            raise ValueError(f"vllm_kv_cache_gb must be > 0, got {self.vllm_kv_cache_gb}")
        check_positive(self, "vllm_max_num_batched_tokens")
        if self.vllm_dtype not in VLLM_DTYPES:
            raise ValueError(f"vllm_dtype must be one of {', '.join(VLLM_DTYPES)}, got {self.vllm_dtype!r}")
        if not self.vllm_importance_sampling_cap >= 1:
            raise ValueError(f"vllm_importance_sampling_cap must be >= 1, got {self.vllm_importance_sampling_cap}")


@dataclass(frozen=True)
class BatchFields(FieldGroup):
    """How an update's sequences are cut: rollout batch, mini-batches (optimizer steps), micro-batches."""

    _argument_group_name = "batches (per process)"

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
    inference_batch_size: Optional[int] = field(
        default=None,
        metadata=_help(
            "Sequences per no-grad forward pass (log-probs, values, the reward model); default: mini_batch_size."
        ),
    )

    def check(self) -> None:
        check_positive(self, "rollout_batch_size", "mini_batch_size", "per_device_train_batch_size")
        if self.inference_batch_size is not None:
            check_positive(self, "inference_batch_size")
        if self.num_mini_batches is not None and not (
            isinstance(self.num_mini_batches, int) and self.num_mini_batches > 0
        ):
            raise ValueError(f"num_mini_batches must be a positive integer, got {self.num_mini_batches!r}")


@dataclass(frozen=True)
class RunFields(OptimizerFields):
    """The optimizer and schedule, with PPO's learning rates and run length."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"max_updates", "total_episodes"})  # the run's length

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
    min_lr_ratio: float = field(
        default=0.3,
        metadata=_help(
            "Floor of the decaying schedule: after the warm-up the rate falls to this fraction of the peak, not to 0 "
            "(cosine with a floor is transformers' cosine_with_min_lr; 0: the schedule as transformers defines it, "
            "the default before)."
        ),
    )
    max_updates: Optional[int] = field(
        default=None,
        metadata=_help("Stop after this many updates (default: num_train_epochs of prompts)."),
    )
    total_episodes: Optional[int] = field(
        default=None,
        metadata=_help("trl's run length: train for this many responses (rounded up to whole updates), not epochs."),
    )

    def check(self) -> None:
        super().check()
        for name in ("max_updates", "total_episodes"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_probability(self, "min_lr_ratio", high_open=True)
        if self.lr_scheduler_type not in RULE_SCHEDULES:
            floor = " (a floor under the decay: --min-lr-ratio)" if "min_lr" in self.lr_scheduler_type else ""
            raise ValueError(
                f"lr_scheduler_type {self.lr_scheduler_type!r} cannot drive a training run's schedule{floor}; "
                f"use one of {', '.join(RULE_SCHEDULES)}"
            )


# transformers' schedules that step on their own from the steps taken (the others need a metric, or settings beyond
# the warm-up and the length: reduce_lr_on_plateau, greedy, cosine_with_min_lr, warmup_stable_decay)
RULE_SCHEDULES = "linear cosine cosine_with_restarts polynomial constant constant_with_warmup inverse_sqrt".split()


@dataclass(frozen=True)
class PPOOutputFields(OutputFields):
    """Outputs, logging and resuming, with PPO's checkpoint and sample-logging settings."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {
            "allow_config_change",
            "save_optimizer_state",
            "discard_newer_checkpoints",
            "num_logged_samples",
            "sample_logging_steps",
        }
    )  # bookkeeping

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
    num_logged_samples: int = field(default=4, metadata=_help("Prompt/response/reward triples logged as text."))
    sample_logging_steps: int = field(default=10, metadata=_help("Log sample triples every N updates."))

    def check(self) -> None:
        super().check()
        check_positive(self, "sample_logging_steps")
        if self.save_optimizer_state not in ("latest", "all"):
            raise ValueError(f"save_optimizer_state must be 'latest' or 'all', got {self.save_optimizer_state!r}")


@dataclass(frozen=True)
class HubFields(FieldGroup):
    _argument_group_name = "hub"

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset(
        {"push_to_hub", "hub_model_id", "hub_private_repo"}
    )  # may change on resume

    push_to_hub: bool = field(
        default=False,
        metadata=_help("After a finished run, upload the final model, tokenizer and card to the hub."),
    )
    hub_model_id: Optional[str] = field(
        default=None,
        metadata=_help("Hub repository for --push-to-hub (default: the output directory's name)."),
    )
    hub_private_repo: bool = field(default=False, metadata=_help("Create the hub repository as private."))
