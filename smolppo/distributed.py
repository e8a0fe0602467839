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


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there ``--bf16`` makes an update much
    cheaper (1.7x measured on a 2-core Xeon, see docs/PERFORMANCE.md)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)
