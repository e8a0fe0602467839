"""The mathematics of PPO for language models, as pure tensor functions (no models, no I/O).

Shapes: ``B`` sequences by ``R`` response positions. ``mask`` is 1.0 at real response tokens (up to and
including the first EOS) and 0.0 after; everything computed at masked positions is zeroed or ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smolppo.configs.algorithm import LOSS_TYPES


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


# ---------------------------------------------------------------------------------------------- the loss family
@dataclass(frozen=True)
class LossNorm:
    """What one mini-batch's loss is divided by, counted over the whole mini-batch (every micro-batch, every
    process) before any micro-batch runs: its response `tokens`, its `sequences`, and the response budget
    `max_length` (``dr_grpo``). Each micro-batch then contributes its exact share, whatever the micro-batch size."""

    tokens: float
    sequences: float
    max_length: int


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss of `per_token` ``[B, R]`` (or ``[B, 1]``, broadcast):

    * ``dapo`` (and ``bnpo``): one mean over every response token of the mini-batch (classic PPO's choice);
    * ``grpo``: each sequence's token mean, then the mean over the mini-batch's sequences;
    * ``dr_grpo``: the token sum over ``sequences x max_length`` (Dr. GRPO: no length normalisation).

    Summed over the micro-batches (and processes) of a mini-batch, the shares are the mini-batch loss exactly.
    """
    masked = per_token * mask
    if loss_type in ("dapo", "bnpo"):
        return masked.sum() / max(norm.tokens, 1.0)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(norm.sequences, 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / max(norm.sequences * norm.max_length, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def whole_batch_norm(mask: torch.Tensor, max_length: int | None = None) -> LossNorm:
    """The `LossNorm` of a batch taken in one piece (read from its mask; rows without a token do not count)."""
    return LossNorm(float(mask.sum()), float((mask.sum(-1) > 0).sum()), max_length or mask.shape[-1])


@dataclass
class PolicyTerms:
    """The clipped surrogate per token (before aggregation) and what is logged about it."""

    loss: torch.Tensor  # [B, R], or [B, 1] at sequence level broadcast over the tokens by the advantages
    clipped: torch.Tensor  # 1.0 where the clipped branch was taken
    log_ratio: torch.Tensor  # [B, R] or [B, 1]: log new / rollout policy (the sequence mean with GSPO)


def policy_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
) -> PolicyTerms:
    """PPO's clipped surrogate per token, ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.

    ``r = exp(logp_new - logp_old)`` against the rollout policy (not the reference). `epsilon_high` above
    `epsilon_low` is DAPO's clip-higher. `dual_clip` ``c > 1`` bounds the loss of negative advantages at ``-c A``
    (dual-clip PPO). ``level="sequence"`` is GSPO: one ratio per sequence, ``exp`` of the mean token log-ratio.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    elif level != "token":
        raise ValueError(f"unknown importance_sampling_level {level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return PolicyTerms(loss, (clipped > unclipped).float(), log_ratio)


def sampler_correction(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> torch.Tensor:
    """Per-token weights ``[B, R]`` that correct for the sampling engine's distribution differing from the trained
    model's (vLLM's kernels vs. ours): ``rho = pi_train(y) / pi_sampler(y)`` of the sampled tokens, from the
    rollout log-prob pass and the engine's own log-probs, multiplied into each token's policy loss.

    ``token_truncate``: ``min(rho, cap)`` per token (truncated importance sampling); ``token_mask``: tokens whose
    ``rho`` exceeds `cap` get weight 0; ``sequence_truncate`` / ``sequence_mask``: one ``rho`` per response, the
    product over its tokens, truncated or masked the same way, on every token. 0 on padding.
    """
    log_rho = (old_logprobs - sampler_logprobs) * mask
    if mode.startswith("sequence"):
        log_rho = log_rho.sum(-1, keepdim=True)
    elif not mode.startswith("token"):
        raise ValueError(f"unknown sampler correction {mode!r}")
    rho = torch.exp(log_rho.clamp(max=math.log(cap) + 1.0))  # anything above the cap is cut or masked alike
    if mode.endswith("truncate"):
        weights = rho.clamp(max=cap)
    elif mode.endswith("mask"):
        weights = torch.where(rho > cap, torch.zeros_like(rho), rho)
    else:
        raise ValueError(f"unknown sampler correction {mode!r}")
    return weights.expand_as(mask) * mask


def sampler_mismatch(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor):
    """``(mean, max)`` of ``|log pi_train(y) - log pi_sampler(y)|`` over the real response tokens (0-d tensors)."""
    gap = (old_logprobs - sampler_logprobs).abs() * mask
    return gap.sum() / mask.sum().clamp(min=1), gap.max() if gap.numel() else gap.sum()


def value_terms(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`` per token, and where it clipped."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_sq = (values - returns).pow(2)
    clipped_sq = (clipped_values - returns).pow(2)
    return 0.5 * torch.maximum(unclipped_sq, clipped_sq), (clipped_sq > unclipped_sq).float()


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` True for each response whose group (`group_size` consecutive responses to one prompt) has rewards
    that differ; False where they are all equal, so every advantage is 0 (DAPO's dynamic sampling drops these)."""
    grouped = scores.view(-1, group_size)
    spread = grouped.max(1).values > grouped.min(1).values
    return spread.repeat_interleave(group_size)


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    max_ratio_deviation: torch.Tensor  # max |ratio - 1| over valid tokens


def ratio_deviation(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |ratio - 1| over valid tokens (0 for an empty batch)."""
    if not mask.numel():
        return log_ratio.new_zeros(())
    return ((torch.exp(log_ratio) - 1.0).abs() * mask).max()


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


def kl_controller(config, horizon: int):
    """The run's KL controller: fixed without ``adaptive_kl``, else the ``kl_controller`` named in `config`."""
    if not config.adaptive_kl:
        return FixedKLController(config.init_kl_coef)
    if config.kl_controller == "adaptive":
        return AdaptiveKLController(config.init_kl_coef, config.kl_target, horizon)
    return PIDKLController(
        config.init_kl_coef,
        config.kl_target,
        horizon,
        ki=config.kl_integral_gain,
        kd=1.0 if config.kl_controller == "pid" else 0.0,
    )


class PIDKLController:
    """Proportional-integral(-derivative) control of the KL coefficient on a smoothed KL, in log space, bounded.

    ``kl_s = smoothing * kl_s + (1 - smoothing) * KL``; ``e = clip(log(kl_s / target), -1, 1)`` (a ratio error:
    twice the target and half of it weigh the same); ``I += ki * e * n_steps / horizon``;
    ``coef = init * exp(kp * e + I + kd * (e - e_previous))``, kept within ``[init / bound, init * bound]``.

    Against the multiplicative rule (`AdaptiveKLController`): the proportional term answers an overshoot at once,
    in proportion, and lets go as soon as the KL is back under the target, where the multiplicative rule keeps
    compounding until the KL falls below it; the bound and back-calculation (the integral is reset so that the
    output sits at the bound) stop windup, so a long overshoot cannot leave a penalty that drowns the reward for the
    rest of the run. With ``kd`` the controller also acts on the KL's trend: a fast rise raises the coefficient
    before the level overshoots. Held at `init_kl_coef` until the KL first reaches the target, as the adaptive rule.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: int,
        kp: float = 0.5,
        ki: float = 0.1,
        kd: float = 0.0,
        smoothing: float = 0.5,
        bound: float = 10.0,
    ):
        self.init, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)
        self.kp, self.ki, self.kd, self.smoothing, self.bound = kp, ki, kd, smoothing, bound
        self.value = self.init
        self.engaged = False
        self.integral = 0.0
        self.smoothed_kl: float | None = None
        self.previous_error = 0.0

    def update(self, observed_kl: float, n_steps: int) -> None:
        kl = float(observed_kl)
        self.smoothed_kl = (
            kl if self.smoothed_kl is None else self.smoothing * self.smoothed_kl + (1 - self.smoothing) * kl
        )
        error = min(max(math.log(max(self.smoothed_kl, 1e-8) / self.target), -1.0), 1.0)
        trend, self.previous_error = error - self.previous_error, error
        self.engaged = self.engaged or kl >= self.target
        if not self.engaged or self.init == 0.0:
            return
        self.integral += self.ki * error * n_steps / self.horizon
        output = self.kp * error + self.integral + self.kd * trend
        limit = math.log(self.bound)
        bounded = min(max(output, -limit), limit)
        self.integral += bounded - output  # back-calculation: no windup beyond the bound
        self.value = self.init * math.exp(bounded)

    def state_dict(self) -> dict:
        return {
            "kl_coef": self.value,
            "kl_horizon": self.horizon,
            "kl_engaged": self.engaged,
            "kl_integral": self.integral,
            "kl_smoothed": self.smoothed_kl,
            "kl_previous_error": self.previous_error,
        }

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["kl_coef"])
        self.horizon = int(state.get("kl_horizon") or self.horizon)
        self.engaged = bool(state.get("kl_engaged") or False)
        if "kl_integral" in state:
            self.integral = float(state["kl_integral"] or 0.0)
        elif self.value > 0 and self.init > 0:  # another controller's state: go on from its coefficient
            self.integral = min(max(math.log(self.value / self.init), -math.log(self.bound)), math.log(self.bound))
        self.smoothed_kl = state.get("kl_smoothed")
        self.previous_error = float(state.get("kl_previous_error") or 0.0)
