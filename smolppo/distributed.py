"""Process-group choices shared by the scripts and the trainer (one place, so both ask `accelerate` the same)."""

from __future__ import annotations

import os

import torch


def use_cpu() -> bool:
    """Run on CPU when asked (``accelerate launch --cpu`` sets ACCELERATE_USE_CPU), or when several processes
    were launched on a machine without CUDA: then `accelerate` needs ``cpu=True`` to form a gloo group."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
