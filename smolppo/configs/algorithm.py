"""The part of a training config the algorithm reads, and nothing else (`PPOConfig.algorithm_settings` builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")  # smolppo.algorithm.ppo_math.aggregate
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class AlgorithmSettings:
    """Everything `smolppo.algorithm.ppo.Algorithm` needs: the estimator, PPO and KL settings, the optimizer, the
    batch sizes it iterates with, sampling and precision. Values are resolved (the learning rate that applies)."""

    # estimator and rewards
    advantage_estimator: str
    samples_per_prompt: int
    scale_rewards: bool
    whiten_rewards: bool
    missing_eos_score: Optional[float]
    missing_eos_penalty: Optional[float]
    # PPO
    ppo_epochs: int
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    # the loss family
    loss_type: str
    epsilon_high: Optional[float]
    dual_clip: Optional[float]
    importance_sampling_level: str
    dynamic_sampling: bool
    dynamic_sampling_refills: int
    # KL
    kl_estimator: str
    kl_in_loss: bool
    adaptive_kl: bool
    kl_controller: str
    init_kl_coef: float
    kl_target: float
    kl_horizon: Optional[int]
    # optimizer and schedule
    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    max_grad_norm: float
    seed: int
    # batches, sampling, precision
    mini_batch_size: int
    per_device_train_batch_size: int
    max_new_tokens: int
    temperature: float
    gradient_checkpointing: bool
    bf16: bool
    attn_implementation: str

    @property
    def uses_value_model(self) -> bool:
        return self.advantage_estimator == "gae"
