"""DAPO's dynamic sampling with refills: a group of responses to one prompt whose rewards are all equal has zero
advantages and teaches nothing; such groups are replaced by groups sampled for new prompts, up to the batch size.

The replacement prompts are drawn from the whole prompt set by a generator seeded from the run's seed and the
update's prompts, so a resumed run draws the same ones. A group still without signal after `rounds` draws keeps
its place and is left out of the loss (`Experience.trained`). Pure orchestration: sampling and scoring are the
callables the algorithm passes in.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from smolppo.algorithm.ppo_math import groups_with_signal
from smolppo.algorithm.rollout import Rollout, concat_rollouts

Sample = Callable[[list[int]], Rollout]
Score = Callable[[Rollout, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _groups_ok(scores: torch.Tensor, group_size: int) -> list[bool]:
    return groups_with_signal(scores, group_size).view(-1, group_size)[:, 0].tolist()


def refill(
    rollout: Rollout,
    indices: list[int],
    sample: Sample,
    score: Score,
    num_prompts: int,
    group_size: int,
    rounds: int,
    seed: int,
    pad_id: int,
):
    """``(rollout, indices, scores, parts)`` of the same size as the given batch, groups without reward spread
    replaced by new prompts' groups with spread where `rounds` draws found them."""
    scores, parts = score(rollout, indices)
    ok = _groups_ok(scores, group_size)
    good, bad = [g for g, o in enumerate(ok) if o], [g for g, o in enumerate(ok) if not o]
    missing, extras = len(bad), []
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_033 + zlib.crc32(str(indices).encode()))
    for _ in range(rounds):
        if not missing:
            break
        prompts = torch.randint(num_prompts, (missing,), generator=generator, device="cpu").tolist()
        new_indices = [i for i in prompts for _ in range(group_size)]
        extra = sample(new_indices)
        extra_scores, extra_parts = score(extra, new_indices)
        found = [g for g, o in enumerate(_groups_ok(extra_scores, group_size)) if o][:missing]
        extras.append((extra, new_indices, extra_scores, extra_parts, found))
        missing -= len(found)
    if not any(piece[4] for piece in extras):
        return rollout, indices, scores, parts
    kept = sorted(good + bad[:missing])  # groups not replaced keep their place, out of the loss
    return _joined([(rollout, indices, scores, parts, kept), *extras], group_size, pad_id)


def _joined(pieces, group_size: int, pad_id: int):
    rollouts, all_indices, all_scores, all_parts = [], [], [], []
    for rollout, indices, scores, parts, groups in pieces:
        rows = [g * group_size + j for g in groups for j in range(group_size)]
        index = torch.tensor(rows, dtype=torch.long, device=rollout.device)
        rollouts.append(rollout.select(index))
        all_indices += [indices[r] for r in rows]
        all_scores.append(scores[index])
        all_parts.append({name: value[index] for name, value in parts.items()})
    parts = {name: torch.cat([p[name] for p in all_parts]) for name in all_parts[0]}
    return concat_rollouts(rollouts, pad_id), all_indices, torch.cat(all_scores), parts
