"""Process-group choices shared by the scripts and the trainer (one place, so both ask `accelerate` the same)."""

from __future__ import annotations

import os
import sys

import torch

from smolppo.errors import UserError


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config (or ``--use_deepspeed``) sets ACCELERATE_USE_DEEPSPEED."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def use_cpu() -> bool:
    """Run on CPU when asked (``accelerate launch --cpu`` sets ACCELERATE_USE_CPU), or when several processes
    were launched on a machine without CUDA: then `accelerate` needs ``cpu=True`` to form a gloo group. Not for
    DeepSpeed runs (`accelerate` drops DeepSpeed under ``cpu=True``): `process_group` decides for them."""
    if _flag("ACCELERATE_USE_CPU"):
        return True
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def on_windows() -> bool:
    return sys.platform == "win32"


def several_gpus_on_windows() -> bool:
    """Several processes on CUDA under native Windows, whose PyTorch builds have no NCCL: gloo then."""
    return on_windows() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available()


def process_group() -> dict:
    """Keyword arguments for `accelerate.PartialState`: ``cpu``, and the gloo backend where the default would not
    work: under DeepSpeed without CUDA (else every process would think it is rank 0 of 1), and for several GPUs on
    Windows, whose PyTorch builds have no NCCL."""
    if deepspeed_requested():
        check_deepspeed_usable()
        return {"cpu": False} if torch.cuda.is_available() else {"cpu": False, "backend": "gloo"}
    cpu = use_cpu()
    if several_gpus_on_windows() and not cpu:
        os.environ.setdefault("USE_LIBUV", "0")  # Windows builds of PyTorch have no libuv for the TCP store
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": cpu}


def ddp_backend() -> str | None:
    """The backend `transformers.Trainer` needs named (``ddp_backend``): gloo for several GPUs on Windows."""
    return "gloo" if several_gpus_on_windows() else None


def check_deepspeed_usable() -> None:
    """One line, before anything is loaded, when DeepSpeed was asked for but cannot run."""
    if on_windows():
        raise UserError(
            "DeepSpeed does not support several GPUs on native Windows; run it under WSL2 (Ubuntu), or launch with "
            "accelerate_configs/multi_gpu.yaml (DDP over gloo works on Windows)"
        )
    if _flag("ACCELERATE_USE_CPU"):
        raise UserError(
            "the accelerate config asks for both DeepSpeed and --cpu (use_cpu: true); accelerate would then train "
            "without DeepSpeed. Drop --cpu / use_cpu: DeepSpeed runs on CPU by itself when there is no GPU"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"the accelerate config asks for DeepSpeed, which cannot be imported ({exc}); pip install deepspeed, "
            "or launch with accelerate_configs/multi_gpu.yaml"
        ) from exc


def check_distributed_type(distributed_type) -> None:
    """After the process group is formed: refuse a run that asked for DeepSpeed and would train without it."""
    from accelerate.utils import DistributedType

    if deepspeed_requested() and distributed_type != DistributedType.DEEPSPEED:
        raise UserError(
            f"DeepSpeed was asked for, but accelerate set up {distributed_type.value} and would train without it; "
            "launch with `accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml` and no --cpu"
        )


def make_accelerator(accumulation_steps: int, micro_batch_size: int, max_grad_norm: float, bf16: bool):
    """The run's `Accelerator`. Under DeepSpeed its config takes the run's micro-batch, accumulation and clipping
    (``auto`` or absent in the accelerate config; a different number there is refused in one line)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    wanted = {
        "gradient_accumulation_steps": (accumulation_steps, "mini_batch_size / per_device_train_batch_size"),
        "gradient_clipping": (max_grad_norm, "--max-grad-norm"),
        "train_micro_batch_size_per_gpu": (micro_batch_size, "--per-device-train-batch-size"),
    }
    for key, env in (
        ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
        ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING"),
    ):
        _check_agrees(key, os.environ.pop(env, "auto"), *wanted[key])  # else accelerate would use it instead
    group = process_group()
    handlers = [InitProcessGroupKwargs(backend=group.pop("backend"))] if "backend" in group else []
    accelerator = Accelerator(
        **group,
        gradient_accumulation_steps=accumulation_steps,
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=handlers,
    )
    check_distributed_type(accelerator.distributed_type)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds_config = plugin.deepspeed_config
        for key, (value, source) in wanted.items():
            _check_agrees(key, ds_config.get(key, "auto"), value, source)
            ds_config[key] = value
        ds_config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch x accumulation x processes
    return accelerator


def _check_agrees(key: str, given, value, source: str) -> None:
    """A DeepSpeed/accelerate setting is ``auto`` (or absent) or equals the run's `value`; else one line."""
    if given != "auto" and float(given) != float(value):
        raise UserError(
            f"the DeepSpeed/accelerate config sets {key}: {given}, but this run uses {value} ({source}); "
            f"set {key} to auto there (or remove it), and choose the value with train_ppo.py's flags"
        )


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there ``--bf16`` makes an update much
    cheaper (1.7x measured on a 2-core Xeon, see docs/PERFORMANCE.md)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)
