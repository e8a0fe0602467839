"""Stage 1 of a PPO update: sample responses and describe them exactly (masks from positions, not pad ids).

Layout of a rollout: prompts are left-padded to a common width ``P`` so every response starts at column ``P``;
responses occupy columns ``P .. P+R-1``. A response is real up to and including its first EOS; everything
after is padding, even where the pad id equals the EOS id (as in SmolLM2).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from smolppo.data import left_pad
from smolppo.errors import UserError


@dataclass
class Rollout:
    """A batch of prompt+response sequences with their masks. Tensors are indexed by sequence first."""

    input_ids: torch.Tensor  # [B, P+R] prompt (left-padded) followed by the response
    attention_mask: torch.Tensor  # [B, P+R] 1 on real prompt and response tokens
    position_ids: torch.Tensor  # [B, P+R] positions counted over real tokens only
    response_mask: torch.Tensor  # [B, R] float, 1.0 on real response tokens (through the first EOS)
    response_lengths: torch.Tensor  # [B] number of real response tokens
    ended_with_eos: torch.Tensor  # [B] bool
    context_length: int  # P
    # [B, R] the sampling engine's own log-probs of the sampled tokens (vLLM), 0 on padding; None: the trained
    # model sampled (transformers' generate), so its rollout log-prob pass is the sampler's
    sampler_logprobs: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.context_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the rollout holds (`sampler_logprobs` only when there is one)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "context_length"}
        return {k: v for k, v in values.items() if v is not None}

    def to(self, device) -> Rollout:
        """The same rollout with every tensor on `device`."""
        return Rollout(context_length=self.context_length, **{k: v.to(device) for k, v in self.tensors().items()})

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The sub-batch at `index` (the shared context length is kept)."""
        return Rollout(context_length=self.context_length, **{k: v[index] for k, v in self.tensors().items()})


def trim_padding(rollout: Rollout, bounds: tuple[int, int] | None = None) -> Rollout:
    """The same sequences without the columns that are padding in every row.

    Drops leading prompt columns no sequence uses and response columns after the longest response. Real
    tokens keep their positions and see the same tokens, so outputs at real positions are unchanged; the
    response width shrinks to the longest response in this (sub-)batch. `bounds` (``(first used prompt column,
    longest response)``, from `TrimTable`) saves reading them from the device.
    """
    if bounds is None:
        used = rollout.attention_mask[:, : rollout.context_length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else rollout.context_length
        width = int(rollout.response_lengths.max()) if len(rollout) else 0
    else:
        first, width = bounds
    end = rollout.context_length + max(width, 1)
    sampler = rollout.sampler_logprobs
    return Rollout(
        input_ids=rollout.input_ids[:, first:end],
        attention_mask=rollout.attention_mask[:, first:end],
        position_ids=rollout.position_ids[:, first:end],
        response_mask=rollout.response_mask[:, : end - rollout.context_length],
        response_lengths=rollout.response_lengths,
        ended_with_eos=rollout.ended_with_eos,
        context_length=rollout.context_length - first,
        sampler_logprobs=None if sampler is None else sampler[:, : end - rollout.context_length],
    )


class TrimTable:
    """Each sequence's first real prompt column and response length, read from the device once, so that the
    `trim_padding` bounds of any sub-batch are computed on the host (no device read per micro-batch)."""

    def __init__(self, rollout: Rollout):
        prompt_mask = rollout.attention_mask[:, : rollout.context_length]
        first = torch.where(prompt_mask.any(1), prompt_mask.int().argmax(1), rollout.context_length)
        self.first, self.lengths = torch.stack([first.long(), rollout.response_lengths.long()]).tolist()
        self.context_length = rollout.context_length

    def bounds(self, rows: list[int]) -> tuple[int, int]:
        """``(first used prompt column, longest response)`` of the sub-batch made of `rows`."""
        if not rows:
            return self.context_length, 0
        return min(self.first[i] for i in rows), max(self.lengths[i] for i in rows)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the sequences of several (all on one device): prompts left-padded to the longest context,
    responses right-padded to the widest; real tokens keep their positions."""
    context = max(r.context_length for r in rollouts)
    width = max(r.responses.shape[1] for r in rollouts)
    ids, masks, response_masks = [], [], []
    for r in rollouts:
        pad = (context - r.context_length, width - r.responses.shape[1])
        ids.append(torch.nn.functional.pad(r.input_ids, pad, value=pad_id))
        masks.append(torch.nn.functional.pad(r.attention_mask, pad, value=0))
        response_masks.append(torch.nn.functional.pad(r.response_mask, (0, pad[1])))
    attention_mask = torch.cat(masks)
    sampled = [r.sampler_logprobs for r in rollouts]
    if any(t is None for t in sampled) and not all(t is None for t in sampled):
        raise ValueError("cannot join rollouts with and without the sampler's log-probs")
    return Rollout(
        input_ids=torch.cat(ids),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        response_mask=torch.cat(response_masks),
        response_lengths=torch.cat([r.response_lengths for r in rollouts]),
        ended_with_eos=torch.cat([r.ended_with_eos for r in rollouts]),
        context_length=context,
        sampler_logprobs=None if sampled[0] is None else torch.cat([pad_response_width(t, width) for t in sampled]),
    )


def pad_response_width(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad a ``[B, r]`` per-response-token tensor with zeros to ``[B, width]``."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from_eos(responses: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths, ended_with_eos)`` from the position of the first EOS in each response row.

    The EOS token itself counts as part of the response (it is an action the policy took).
    """
    width = responses.shape[1]
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, width, dtype=torch.long))
    lengths = torch.where(ended, first_eos + 1, first_eos)
    return lengths, ended


def build_rollout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    eos_ids: list[int],
    pad_id: int,
    sampler_logprobs: torch.Tensor | None = None,
) -> Rollout:
    """Assemble a `Rollout` from left-padded prompts and the raw generated continuations (and the sampling engine's
    log-probs of them, when it gives its own)."""
    lengths, ended = response_mask_from_eos(responses, eos_ids)
    width = responses.shape[1]
    response_mask = (torch.arange(width, device=responses.device)[None, :] < lengths[:, None]).float()
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_id))
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        response_mask=response_mask,
        response_lengths=lengths,
        ended_with_eos=ended,
        context_length=prompt_ids.shape[1],
        sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs * response_mask,
    )


def sampling_config(
    tokenizer, eos_ids: list[int], max_new_tokens: int, temperature: float, top_p: float = 1.0, do_sample: bool = True
):
    """A generation config built from scratch; `generate_rollout` keeps the model's own defaults out of it."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=top_p if do_sample else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


@contextmanager
def model_generation_defaults_off(model):
    """`generate` fills every field our config leaves unset from ``model.generation_config`` (a checkpoint's
    repetition_penalty, min_p, no_repeat_ngram_size, ...). Swap in a blank one so only our settings apply."""
    from transformers import GenerationConfig

    owners = [m for m in (model, getattr(model, "get_base_model", lambda: None)()) if m is not None]
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in zip(owners, saved):
            m.generation_config = config


def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation_config):
    """`model.generate` with `generation_config` alone: nothing from the model's own generation config."""
    with model_generation_defaults_off(model):
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)


@torch.no_grad()
def generate_rollout(model, prompts: list[list[int]], tokenizer, eos_ids: list[int], generation_config) -> Rollout:
    """Sample one response per prompt with `model` (an unwrapped causal LM in eval mode)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_token_id))
    output = sample(model, prompt_ids, prompt_mask, generation_config)
    responses = output[:, prompt_ids.shape[1] :]
    return build_rollout(prompt_ids, prompt_mask, responses, eos_ids, tokenizer.pad_token_id)


def response_tokens(rollout: Rollout) -> list[list[int]]:
    """Each response's real tokens, without its EOS."""
    lengths = (rollout.response_lengths - rollout.ended_with_eos.long()).tolist()
    return [row[:length] for row, length in zip(rollout.responses.tolist(), lengths)]  # one copy, not one a row


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Each response as text, without its EOS and special tokens: what a reward model reads."""
    lengths = rollout.response_lengths.tolist()
    rows = rollout.responses.tolist()  # one copy to the host, not one a row
    return tokenizer.batch_decode([row[:length] for row, length in zip(rows, lengths)], skip_special_tokens=True)


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[tokens]`` without materialising a second full-vocabulary tensor.

    Works row by row in fp32, so peak extra memory is one sequence's logits.
    """
    out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        out[i] = row.gather(-1, tokens[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """fp32 logits at the positions that predict each response token: columns ``P-1 .. P+R-2``.

    The transformer body runs in whatever precision autocast chooses; the LM head always runs in fp32 (autocast
    off), so log-probs and the PPO ratio do not carry bf16 rounding of the largest matmul.
    """
    width = rollout.responses.shape[1]
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = body(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
    ).last_hidden_state[:, -(width + 1) : -1]
    logits = fp32_head(causal_lm.get_output_embeddings(), hidden)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def fp32_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32, autocast off. Whole weights stored in another precision (DeepSpeed's bf16 mode casts
    the model it trains) are multiplied as fp32 copies; weights ZeRO-3 partitions (``ds_id``: only the head's own
    call gathers them) or a head with an adapter run in their own dtype, with fp32 output."""
    weight = head.weight
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if weight.dtype == torch.float32:
            return head(hidden.float())
        if type(head) is nn.Linear and not hasattr(weight, "ds_id"):
            bias = head.bias.float() if head.bias is not None else None
            return nn.functional.linear(hidden.float(), weight.float(), bias)
        return head(hidden.to(weight.dtype)).float()


def check_logits_reproduced(model) -> None:
    """`response_logits` splits body and head: make sure that equals the model's own logits for this architecture."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 7, device=device)[None] % model.get_input_embeddings().num_embeddings
    mask = torch.ones_like(ids)
    rollout = build_rollout(ids[:, :3], mask[:, :3], ids[:, 3:], eos_ids=[-1], pad_id=0)
    with torch.no_grad():
        ours = response_logits(model, rollout)
        theirs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 2:5].float()
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise UserError(
            f"{type(model).__name__} post-processes its logits in a way smolppo does not reproduce; "
            "please report the architecture"
        )


def response_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Per-token log-probs of the sampled responses under `model`, at the sampling temperature."""
    logits = response_logits(model, rollout) / temperature
    return selective_log_softmax(logits, rollout.responses) * rollout.response_mask
