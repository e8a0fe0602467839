"""Value predictions on the policy's prompt+response sequences.

The value model is a 1-output sequence classifier run as body + head: the head is applied to the hidden state
before each response token, giving one value per response position. (Rewards are read differently, by the
reward model's own forward on text: see `smolppo.rewards.reader`.)
"""

from __future__ import annotations

import torch
from torch import nn

from smolppo.algorithm.rollout import Rollout
from smolppo.models import backbone, score_head


class TokenScorer(nn.Module):
    """Wraps a 1-output sequence classifier so that `forward` returns one score per position, ``[B, T]``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, position_ids, positions: torch.Tensor | None = None):
        hidden = backbone(self.classifier)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if positions is not None:
            hidden = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return score_head(self.classifier)(hidden).squeeze(-1).float()


def value_positions(rollout: Rollout) -> torch.Tensor:
    """Columns whose hidden state is the state before each response token: ``P-1 .. P+R-2``."""
    width = rollout.responses.shape[1]
    cols = torch.arange(
        rollout.context_length - 1, rollout.context_length - 1 + width, device=rollout.input_ids.device
    )
    return cols.expand(len(rollout), -1)


def token_values(value_scorer: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Value predictions ``[B, R]`` for each response position (zero past the response)."""
    values = value_scorer(rollout.input_ids, rollout.attention_mask, rollout.position_ids, value_positions(rollout))
    return values * rollout.response_mask
