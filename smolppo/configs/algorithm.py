"""What the algorithm reads: its field groups and the batch sizes and learning rate that apply
(`PPOConfig.algorithm_settings` builds it)."""

from __future__ import annotations

from dataclasses import dataclass

from smolppo.configs.parts import OptimizerFields, PrecisionFields
from smolppo.configs.ppo_fields import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    EstimatorFields,
    GenerationFields,
    KLFields,
    LossFields,
    RewardFields,
    SamplingFields,
)

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "AlgorithmSettings"]


@dataclass(frozen=True)
class AlgorithmSettings:
    """Everything `smolppo.algorithm.ppo.Algorithm` needs, one group per concern, and what the config derives."""

    estimator: EstimatorFields
    kl: KLFields
    loss: LossFields
    sampling: SamplingFields
    generation: GenerationFields  # who samples (hf / vllm) and the sampler correction
    optimizer: OptimizerFields  # schedule type, weight decay, gradient clipping, seed
    precision: PrecisionFields
    rewards: RewardFields  # the missing-EOS rules
    learning_rate: float  # the peak rate that applies (--learning-rate, or the full / LoRA default)
    mini_batch_size: int  # sequences per optimizer step (trl's num_mini_batches resolved)
    micro_batch_size: int  # sequences per forward/backward (per_device_train_batch_size)
    inference_batch_size: int  # sequences per no-grad forward (log-probs, values)
