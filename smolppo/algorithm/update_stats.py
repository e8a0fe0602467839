"""An update's statistics: gathered on the device per micro-batch, read to the host once, summarised per update.

A micro-batch's loss statistics are its *shares* of the mini-batch's (`smolppo.algorithm.ppo_math.aggregate`):
summed over a mini-batch's micro-batches they give the mini-batch's value exactly, whatever the micro-batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from smolppo.algorithm import ppo_math
from smolppo.algorithm.behaviour import behaviour_metrics
from smolppo.algorithm.experience import Experience, MicroBatchLoss
from smolppo.algorithm.rollout import response_tokens

SHARES = (
    "loss",
    "policy_loss",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "value_loss",
    "value_clip_fraction",
    "kl_loss",
)
NO_SPREAD = 1e-3  # a learning signal with less spread than this has none: the penalty-to-score ratio is undefined


def shares(parts: MicroBatchLoss) -> dict[str, torch.Tensor]:
    """The logged statistics of a micro-batch that are shares of its mini-batch's (detached), named by `SHARES`."""
    values = (
        parts.loss,
        parts.policy_stats.loss,
        parts.policy_stats.clip_fraction,
        parts.policy_stats.approx_kl,
        parts.entropy,
        parts.value_loss,
        parts.value_clip_fraction,
        parts.kl_loss,
    )
    return {key: value.detach() for key, value in zip(SHARES, values) if value is not None}


def to_host(steps: list[dict]) -> dict[str, list[float]]:
    """``{name: [value of each step that has it]}`` from per-step statistics, device tensors read in one copy."""
    tensors = [value for step in steps for value in step.values() if isinstance(value, torch.Tensor)]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
    totals: dict[str, list[float]] = {}
    for step in steps:
        for key, value in step.items():
            totals.setdefault(key, []).append(next(read) if isinstance(value, torch.Tensor) else float(value))
    return totals


def summarise(totals: dict[str, list[float]], accumulation: int) -> dict[str, float]:
    """The update's statistics from its micro-batches' (`to_host`): shares summed within each mini-batch (of
    `accumulation` micro-batches), then the mean over mini-batches; other statistics averaged; and the first
    micro-batch's ratio deviation (1 in fp32 before any step)."""
    result = {}
    for key, values in totals.items():
        if key in SHARES:
            values = np.asarray(values).reshape(-1, accumulation).sum(1)
        result[key] = float(np.mean(values))
    result["first_ratio_deviation"] = totals["max_ratio_deviation"][0]
    return result


def update_metrics(
    exp: Experience, train_stats: dict[str, float], kl_coef: float, signal: torch.Tensor | None = None
) -> dict[str, float]:
    """One update's scalars from its experience and its optimisation's statistics (before averaging across
    processes); `kl_coef` is the coefficient this update's rewards were shaped with; `signal` ``[B]`` what the
    penalty competes with, where it is not the score itself (grpo/rloo: the group-relative score)."""
    mask = exp.rollout.response_mask
    signal = exp.scores if signal is None else signal
    sequence_kl = exp.kl.sum(1)
    non_score = (-kl_coef * exp.kl).sum(1)
    spread = signal.std().item() if len(exp.scores) > 1 else 0.0
    metrics = {
        "rewards/mean": exp.scores.mean().item(),
        "rewards/std": exp.scores.std().item() if len(exp.scores) > 1 else 0.0,
        "kl_divergence": sequence_kl.mean().item(),
        "advantage": ppo_math.masked_mean(exp.unwhitened_advantages, mask).item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (exp.scores + non_score).mean().item(),
        # the KL penalty per response against the spread of the learning signal: above 1 it drowns the reward;
        # undefined (nan) when the signal has no spread (every response of a group alike under grpo)
        "objective/kl_penalty_to_score": -non_score.mean().item() / spread if spread > NO_SPREAD else float("nan"),
        "returns/mean": ppo_math.masked_mean(exp.returns, mask).item(),
        "response/length_mean": exp.rollout.response_lengths.float().mean().item(),
        "response/eos_rate": exp.rollout.ended_with_eos.float().mean().item(),
        "loss": train_stats["loss"],
        "learning_rate": train_stats["learning_rate"],  # mean over this update's optimizer steps
        "objective/kl_coef": kl_coef,
        "loss/policy": train_stats["policy_loss"],
        "policy/clip_fraction": train_stats["clip_fraction"],
        "policy/approx_kl": train_stats["approx_kl"],
        "policy/first_ratio_deviation": train_stats["first_ratio_deviation"],
        "policy/entropy": train_stats["entropy"],
        "grad_norm": train_stats.get("grad_norm", float("nan")),
    }
    if exp.old_values is not None:
        metrics["value/mean"] = ppo_math.masked_mean(exp.old_values, mask).item()
        metrics["loss/value"] = train_stats["value_loss"]
        metrics["value/clip_fraction"] = train_stats["value_clip_fraction"]
    if "kl_loss" in train_stats:
        metrics["loss/kl"] = train_stats["kl_loss"]
    if exp.trained is not None:  # dynamic sampling: the groups left out of the loss
        left_out = float((exp.trained == 0).sum().item())
        metrics["dynamic_sampling/dropped_responses"] = left_out
        metrics["dynamic_sampling/dropped_fraction"] = left_out / max(len(exp.trained), 1)
    if exp.rollout.sampler_logprobs is not None:  # vLLM sampled: how far its log-probs are from the trained model's
        gap_mean, gap_max = ppo_math.sampler_mismatch(exp.old_logprobs, exp.rollout.sampler_logprobs, mask)
        metrics["sampler/logprob_diff_mean"], metrics["sampler/logprob_diff_max"] = gap_mean.item(), gap_max.item()
    if exp.sampler_weights is not None:
        real = mask.bool()
        weights = exp.sampler_weights[real]
        metrics["sampler/is_weight_mean"] = weights.mean().item() if weights.numel() else 1.0
        metrics["sampler/is_weight_min"] = weights.min().item() if weights.numel() else 1.0
    metrics.update(behaviour_metrics(response_tokens(exp.rollout), (~exp.rollout.ended_with_eos).tolist()))
    for name, values in exp.reward_parts.items():  # each source's mean over the responses it applies to
        applies = ~values.isnan()
        metrics[f"rewards/{name}"] = values[applies].mean().item() if bool(applies.any()) else 0.0
    return metrics
