"""Device discipline: where each tensor lives, stated and checked.

The rule: every tensor the package creates names its device, and what one stage of an update hands to the next
(`Rollout`, rewards and each source's reward, log-probs, values, advantages, `Experience`) lives on the rollout's
device. On a CPU there is one device and any mix works; on a GPU a CPU tensor meeting a CUDA tensor stops the run
("indices should be either on cpu or on the same device"), so each stage boundary checks, and names the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DeviceMismatch(RuntimeError):
    """A stage handed over a tensor on another device than the rollout's (a bug in the package, not the user's)."""


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when `a` and `b` are the same device (``cuda`` and ``cuda:0`` are, where the index is left open)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _named_tensors(name: str, value) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _named_tensors(f"{name}[{key!r}]", item)


def check_on_device(device: torch.device, stage: str, **tensors) -> None:
    """Raise `DeviceMismatch` naming the first of `tensors` (tensors, dicts of tensors or None) not on `device`."""
    for name, value in tensors.items():
        for label, tensor in _named_tensors(name, value):
            if not same_device(tensor.device, device):
                raise DeviceMismatch(
                    f"{stage}: {label} is on {tensor.device}, the rollout on {device}; every tensor a stage hands "
                    "on must live on the rollout's device (smolppo.devices)"
                )
