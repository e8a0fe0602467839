"""Checkpoints as earlier versions wrote them (format 1), to prove they still resume.

Format 1 kept the optimizer's ``state_dict()``, the learning-rate scheduler's and every process's random state
(Python's tuple, NumPy's array, torch's byte tensors) as pickles written by ``torch.save`` (``optimizer.pt``,
``scheduler.pt``, ``rng_state.pt``), and the KL controller's ``kl_coef``, ``kl_horizon`` and ``kl_engaged`` in
``trainer_state.json``. `as_format_1` rewrites a checkpoint of this version into exactly those files.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch


def as_format_1(path: str) -> None:
    """Rewrite the checkpoint at `path` (written by this version) as format 1, in place."""
    from safetensors.torch import load_file

    from smolppo.algorithm.state import optimizer_from_tensors

    with open(os.path.join(path, "algorithm_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        index = json.load(f)
    if state["optimizer_param_groups"] is not None:
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        torch.save(
            optimizer_from_tensors(tensors, state["optimizer_param_groups"]), os.path.join(path, "optimizer.pt")
        )
        os.remove(os.path.join(path, "optimizer.safetensors"))
    torch.save(state["lr_scheduler"], os.path.join(path, "scheduler.pt"))
    torch.save([as_objects(rng) for rng in state["rng"]], os.path.join(path, "rng_state.pt"))
    index.pop("checkpoint_format")
    index.update(state["kl_controller"])
    with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.remove(os.path.join(path, "algorithm_state.json"))


def as_objects(rng: dict) -> dict:
    """One process's random state as format 1 pickled it: tuples, a NumPy array, byte tensors."""
    version, python_state, gauss = rng["python"]
    kind, keys, position, has_gauss, cached = rng["numpy"]
    out = {
        "python": (version, tuple(python_state), gauss),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached),
        "torch": torch.tensor(rng["torch"], dtype=torch.uint8),
    }
    if "cuda" in rng:
        out["cuda"] = torch.tensor(rng["cuda"], dtype=torch.uint8)
    return out


class RunsCode:
    """An object whose unpickling calls a function (here it creates the file `marker`): what a checkpoint from
    someone else could carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
