"""The mathematics of PPO for language models, as pure tensor functions (no models, no I/O).

Shapes: ``B`` sequences by ``R`` response positions. ``mask`` is 1.0 at real response tokens (up to and
including the first EOS) and 0.0 after; everything computed at masked positions is zeroed or ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce=None, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over its valid positions.

    `all_reduce`, when given, sums a tensor across processes so the statistics cover the global batch.
    Uses the unbiased variance; masked positions come back as 0.
    """
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, total_sq, count = stats.unbind()
    mean = total / count
    var = (total_sq / count - mean * mean) * count / (count - 1).clamp(min=1)
    mean, var = mean.to(x.dtype), var.clamp(min=0).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with r = q / p
    (non-negative, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * KL_t`` at each real token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(1) > 0
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores * has_tokens
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, backwards in time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with the value
    after the last real token taken as 0. Returns ``(advantages, returns)`` with ``returns = A + V``.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over each response's real tokens (0 after them)."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, scale: bool = True) -> torch.Tensor:
    """Sequence-level advantages ``[B]`` from the scores of ``B / group_size`` groups of consecutive responses
    to the same prompt.

    ``grpo``: ``(r - mean_group) / (std_group + 1e-4)`` (unbiased std; centring only when not `scale`);
    ``rloo``: ``r - mean of the other responses of the group`` = ``k / (k - 1) * (r - mean_group)``.
    """
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores cannot form groups of {group_size} (need >= 2 per group)")
    grouped = scores.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if estimator == "grpo":
        advantages = centred / (grouped.std(1, keepdim=True) + 1e-4) if scale else centred
    elif estimator == "rloo":
        advantages = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; expected 'grpo' or 'rloo'")
    return advantages.reshape(-1)


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    max_ratio_deviation: torch.Tensor  # max |ratio - 1| over valid tokens


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLossStats:
    """PPO's clipped surrogate: mean over valid tokens of ``max(-A r, -A clip(r, 1-eps, 1+eps))``.

    ``r = exp(logp_new - logp_old)`` where logp_old comes from the rollout policy (not the reference).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.pow(2), mask)
        max_ratio_deviation = ((ratio - 1.0).abs() * mask).max() if mask.numel() else ratio.new_zeros(())
    return PolicyLossStats(loss, clip_fraction, approx_kl, max_ratio_deviation)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * mean max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``; returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_sq = (values - returns).pow(2)
    clipped_sq = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_sq > unclipped_sq).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by `logits` along the last dimension."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, observed_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["kl_coef"])


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL approaches `target`.

    ``error = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * n_steps / horizon``.

    Anti-windup: the coefficient is held at its initial value until the observed KL first reaches the target.
    A fresh policy starts at KL 0, and the plain rule would spend those first updates lowering the coefficient,
    which the rest of the run must then undo while the KL overshoots; afterwards the rule acts both ways.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.engaged = False

    def update(self, observed_kl: float, n_steps: int) -> None:
        self.engaged = self.engaged or observed_kl >= self.target
        if not self.engaged:
            return
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.value, "kl_horizon": self.horizon, "kl_engaged": self.engaged}

    def load_state_dict(self, state: dict) -> None:
        """The saved coefficient, horizon and anti-windup state (a state without the last two keeps this one's)."""
        self.value = float(state["kl_coef"])
        self.horizon = int(state.get("kl_horizon") or self.horizon)
        if state.get("kl_engaged") is not None:
            self.engaged = bool(state["kl_engaged"])
