"""What an update is made of: the `Experience` of one rollout batch, the parts of a micro-batch's loss, and the
trained networks as one module."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from smolppo.algorithm import ppo_math
from smolppo.algorithm.rollout import Rollout, response_logits, trim_padding
from smolppo.algorithm.value import TokenScorer, value_positions
from smolppo.devices import check_on_device


@dataclass
class Experience:
    """What one rollout batch contributes to the update, grouped by role (tensors ``[B, ...]``)."""

    # what was sampled
    rollout: Rollout
    # reward: the weighted total after the missing-EOS rule [B], and each source's own reward [B]
    scores: torch.Tensor
    # policy and reference, per response token [B, R]
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    # credit assignment [B, R]: what the loss uses, before whitening, and the critic's targets (or reward-to-go)
    advantages: torch.Tensor
    unwhitened_advantages: torch.Tensor
    returns: torch.Tensor
    # critic (gae only) [B, R]
    old_values: torch.Tensor | None = None
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B] 1.0 for the responses in the loss, 0.0 for those left out (dynamic sampling); None: all of them
    trained: torch.Tensor | None = None
    # [B, R] the sampler correction's weight per token (`ppo_math.sampler_correction`); None: no correction
    sampler_weights: torch.Tensor | None = None

    def check_device(self, device: torch.device) -> None:
        """Every tensor of this experience on `device` (`DeviceMismatch` naming the first that is not)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rollout"}
        check_on_device(device, "experience", **self.rollout.tensors(), **values)

    def _map(self, tensor_fn, rollout: Rollout) -> Experience:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rollout", "reward_parts")}
        mapped = {k: None if v is None else tensor_fn(v) for k, v in values.items()}
        parts = {k: tensor_fn(v) for k, v in self.reward_parts.items()}
        return Experience(rollout=rollout, reward_parts=parts, **mapped)

    def trimmed(self, bounds: tuple[int, int] | None = None) -> Experience:
        """Drop columns that are padding in every sequence (see `trim_padding`; `bounds` from a `TrimTable`)."""
        rollout = trim_padding(self.rollout, bounds)
        width = rollout.responses.shape[1]
        return self._map(lambda v: v if v.dim() < 2 else v[:, :width], rollout)

    def select(self, index: torch.Tensor) -> Experience:
        return self._map(lambda v: v[index], self.rollout.select(index))


@dataclass
class MicroBatchLoss:
    """One micro-batch's share of its mini-batch's loss and statistics (`smolppo.algorithm.ppo_math.aggregate`)."""

    loss: torch.Tensor  # the total this micro-batch contributes
    policy_stats: ppo_math.PolicyLossStats  # the clipped surrogate's share and its statistics
    logits: torch.Tensor  # tempered
    value_loss: torch.Tensor | None = None  # gae only
    value_clip_fraction: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None  # the in-loss KL term (kl_in_loss only)
    entropy: torch.Tensor | None = None


class PolicyAndValue(nn.Module):
    """Policy and (optional) value model as one module, so one `prepare` covers both (DDP, DeepSpeed)."""

    def __init__(self, policy: nn.Module, value: TokenScorer | None):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Response logits (un-tempered) and per-position values (None without a critic) for one micro-batch."""
        logits = response_logits(self.policy, rollout)
        if self.value is None:
            return logits, None
        values = self.value(rollout.input_ids, rollout.attention_mask, rollout.position_ids, value_positions(rollout))
        return logits, values
