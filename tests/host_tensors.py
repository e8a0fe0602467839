"""The CPU standing in for an accelerator, so that the CPU suite catches what would stop a run on a GPU.

On a machine with one device every tensor is on it, and a tensor left on the host (the CPU) while the rest of an
update runs on a GPU goes unnoticed until a user's first update stops with "indices should be either on cpu or on
the same device as the indexed tensor". `CpuAsAccelerator` is a `TorchFunctionMode` that keeps two labels on the
one CPU device:

* **host** tensors: made by a factory (``torch.tensor``, ``zeros``, ``randperm``, ...) without a device or with
  the string ``"cpu"``, by ``.cpu()`` or ``.to("cpu")``, and whatever is computed from host tensors alone;
* **accelerator** tensors: everything else, model parameters and tensors made with a ``torch.device`` (the code's
  way of saying "the accelerator's", e.g. ``device=rollout.device``) included.

An operation that mixes a host tensor of one or more dimensions with an accelerator tensor raises
`HostMeetsAccelerator`, as CUDA would; so does indexing a host tensor with an accelerator index. A host scalar
(0-dim) may meet an accelerator tensor (CUDA allows it), and an accelerator tensor may be indexed by a host index.
The labels follow tensors through operations; a move (``.to(device)``, ``.cpu()``) returns a new tensor, as on
a GPU, so the tensor it was called on keeps its label.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_MARK = "_smolppo_host"

FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.randperm,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.linspace,
    torch.eye,
    torch.scalar_tensor,
}
LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like}
UNCHECKED = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.copy_, torch.Tensor.__setitem__}


class HostMeetsAccelerator(RuntimeError):
    """A host tensor met an accelerator tensor: this would stop the run on a GPU."""


def on_host(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, _MARK, False))


def _tensors(*trees) -> list[torch.Tensor]:
    return [leaf for tree in trees for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _label(tensor: torch.Tensor, host: bool) -> None:
    if host:
        setattr(tensor, _MARK, True)
    elif on_host(tensor):
        delattr(tensor, _MARK)


def _names_host(device) -> bool | None:
    """True for a device given as the string "cpu" (the host), False for any other device, None for none."""
    if device is None:
        return None
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _target_of_to(args, kwargs) -> bool | None:
    """Whether ``Tensor.to(...)`` moves to the host (True), the accelerator (False) or only casts (None)."""
    if "device" in kwargs:
        return _names_host(kwargs["device"])
    for arg in args[1:]:
        if isinstance(arg, torch.Tensor):
            return on_host(arg)
        if isinstance(arg, (str, torch.device)):
            return _names_host(arg)
    return None


class CpuAsAccelerator(TorchFunctionMode):
    """While active, the CPU plays host and accelerator at once (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._check(func, args, kwargs)
        out = func(*args, **kwargs)
        if out is args[0] and func in (torch.Tensor.to, torch.Tensor.cpu):
            out = out.view_as(out)  # a move on one device returns the same tensor: a new one keeps the old label
        self._relabel(func, args, kwargs, out)
        return out

    @staticmethod
    def _check(func, args, kwargs) -> None:
        if func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            indexed, index = args[0], args[1]
            if on_host(indexed) and indexed.dim() > 0 and any(not on_host(t) for t in _tensors(index)):
                raise HostMeetsAccelerator(
                    f"a host tensor {tuple(indexed.shape)} is indexed with an accelerator tensor: on a GPU, "
                    "'indices should be either on cpu or on the same device as the indexed tensor'"
                )
            return
        if func in UNCHECKED:
            return
        tensors = _tensors(args, kwargs)
        host = [t for t in tensors if on_host(t) and t.dim() > 0]
        if host and any(not on_host(t) for t in tensors):
            name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
            raise HostMeetsAccelerator(
                f"{name} mixes a host tensor {tuple(host[0].shape)} with accelerator tensors: on a GPU, 'Expected "
                "all tensors to be on the same device'"
            )

    @staticmethod
    def _relabel(func, args, kwargs, out) -> None:
        outputs = _tensors(out)
        if not outputs:
            return
        if func in FACTORIES:
            host = _names_host(kwargs.get("device"))
            host = True if host is None else host
        elif func in LIKE:
            host = _names_host(kwargs.get("device"))
            host = on_host(args[0]) if host is None else host
        elif func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to:
            host = _target_of_to(args, kwargs)
            host = on_host(args[0]) if host is None else host
        elif func is torch.Tensor.copy_:
            host = on_host(args[0])
        else:
            inputs = _tensors(args, kwargs)
            if not inputs:
                return
            host = all(on_host(t) for t in inputs)
        for tensor in outputs:
            _label(tensor, host)
