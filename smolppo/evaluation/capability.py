"""What a trained model kept of its capability: likelihood of reference answers and KL to a baseline model.

Both are measured on held-out prompts only. The maths (`token_kl`, `perplexity`) is pure and tested on hand-built
tensors; the two model passes reuse the trainer's `response_logits` (fp32 LM head), so a log-prob here is the one
training would compute.
"""

from __future__ import annotations

import math

import torch

from smolppo.algorithm.rollout import (
    Rollout,
    position_ids_from_mask,
    response_logits,
    selective_log_softmax,
    trim_padding,
)
from smolppo.data import left_pad, right_pad, row_prompt


# ---------------------------------------------------------------------- pure maths
def token_kl(logits: torch.Tensor, baseline_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over masked positions of the exact KL(softmax(logits) || softmax(baseline_logits)).

    ``logits``/``baseline_logits``: ``[B, R, V]``; ``mask``: ``[B, R]``. The whole vocabulary is summed at every
    position, so only the contexts are sampled: no estimator variance and never negative.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(baseline_logits.float(), dim=-1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)
    return (per_position * mask).sum(-1)


def perplexity(total_logprob: float, num_tokens: int) -> float:
    """``exp(-mean log-prob per token)``; nan without tokens."""
    return math.exp(-total_logprob / num_tokens) if num_tokens else float("nan")


# ---------------------------------------------------------------------- reference answers
def reference_sequences(tokenizer, rows: list[dict], eos_id: int | None, max_tokens: int) -> list[tuple[list, list]]:
    """``(prompt ids, answer ids)`` of each row with a non-empty ``chosen`` answer (else ``None`` in its place).

    The answer is the row's ``chosen`` text as the assistant's turn, cut at `max_tokens`; an answer that fits
    ends with EOS, so a model is also scored on ending where the reference ends."""
    out = []
    for row in rows:
        answer = str(row.get("chosen") or "").strip()
        if not answer:
            out.append(None)
            continue
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) < max_tokens and eos_id is not None:
            ids = ids + [eos_id]
        out.append((row_prompt(tokenizer, row)[1], ids[:max_tokens]))
    return out


def _teacher_forced(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Rollout:
    """Prompts left-padded, answers right-padded after them: a rollout whose responses are the answers."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    answer_ids, answer_mask = right_pad(answers, pad_id)
    attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)
    return Rollout(
        input_ids=torch.cat([prompt_ids, answer_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        response_mask=answer_mask.float(),
        response_lengths=answer_mask.sum(1),
        ended_with_eos=torch.zeros(len(answers), dtype=torch.bool, device=prompt_ids.device),
        context_length=prompt_ids.shape[1],
    )


@torch.no_grad()
def reference_logprobs(model, references, pad_id: int, batch_size: int, progress: bool = True) -> list[float | None]:
    """Summed log-prob (temperature 1) of each reference answer given its prompt; ``None`` where there is none."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    present = [i for i, ref in enumerate(references) if ref is not None]
    out: list[float | None] = [None] * len(references)
    for start in tqdm(range(0, len(present), batch_size), desc="reference answers", disable=not progress):
        group = present[start : start + batch_size]
        rollout = _teacher_forced([references[i][0] for i in group], [references[i][1] for i in group], pad_id)
        rollout = trim_padding(rollout).to(device)
        logprobs = selective_log_softmax(response_logits(model, rollout), rollout.responses) * rollout.response_mask
        for i, value in zip(group, logprobs.sum(-1).tolist()):
            out[i] = value
    return out


def likelihood_summary(logprobs: list[float | None], references) -> dict:
    """Token-weighted log-likelihood per token and perplexity over the references that exist."""
    total = sum(lp for lp in logprobs if lp is not None)
    tokens = sum(len(ref[1]) for ref in references if ref is not None)
    return {
        "reference_logprob_per_token": total / tokens if tokens else float("nan"),
        "reference_perplexity": perplexity(total, tokens),
        "num_references": sum(ref is not None for ref in references),
        "num_reference_tokens": tokens,
    }


# ---------------------------------------------------------------------- KL to the baseline
@torch.no_grad()
def kl_to_baseline(model, baseline, rollouts: list[Rollout], temperature: float, chunk: int = 4) -> list[float]:
    """Per-completion KL of `model` from `baseline` over its own sampled completions, both at `temperature`
    (the temperature they were sampled at, as training's KL penalty uses)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for rollout in rollouts:
        for start in range(0, len(rollout), chunk):
            part = trim_padding(rollout.select(slice(start, start + chunk))).to(device)
            ours = response_logits(model, part) / temperature
            theirs = response_logits(baseline, part) / temperature
            out.extend(token_kl(ours, theirs, part.response_mask).tolist())
    return out


def same_vocabulary(model, baseline) -> bool:
    return model.get_output_embeddings().weight.shape == baseline.get_output_embeddings().weight.shape
