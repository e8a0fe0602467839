"""DeepSpeed ZeRO, where the run touches it: which stage runs, whole weights when ZeRO-3 partitions them, and the
engine's own sharded state (fp32 master weights and AdamW moments) in a checkpoint."""

from __future__ import annotations

from contextlib import nullcontext

import torch

ENGINE_TAG = "state"  # DeepSpeed's checkpoint tag inside a checkpoint's files.DEEPSPEED_DIR


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run; None without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def gathered(accelerator, params, modifier_rank: int | None = None):
    """Under ZeRO-3, the partitioned `params` made whole inside the block (every process enters it). With
    `modifier_rank`, what that process writes into them is kept and shared when the block ends."""
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def full_state_dict(accelerator, module) -> dict | None:
    """`module`'s whole weights on the main process (gathered from every rank under ZeRO-3), None on the others.
    Every process must call it. Trained weights come from DeepSpeed's fp32 master copy when the module holds
    them in bf16 (DeepSpeed's bf16 mode), so nothing the optimizer holds is rounded away. Tied weights stay one
    tensor, so saving writes them once."""
    with gathered(accelerator, module.parameters()):
        masters = {}  # data_ptr of a bf16 trained weight -> its fp32 master copy (a collective: every rank)
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                from deepspeed.utils import safe_get_full_fp32_param

                masters[param.data_ptr()] = safe_get_full_fp32_param(param)
        if not accelerator.is_main_process:
            return None
        copies: dict[int, torch.Tensor] = {}  # one copy per storage
        full = {}
        for name, tensor in module.state_dict().items():
            if tensor.data_ptr() not in copies:
                master = masters.get(tensor.data_ptr())
                copies[tensor.data_ptr()] = (master if master is not None else tensor).detach().clone().cpu()
            full[name] = copies[tensor.data_ptr()]
        return full


def save_engine_state(engine, directory: str) -> None:
    """DeepSpeed's own checkpoint of `engine` (each process writes its shard of the fp32 master weights and
    optimizer state); every process must call it. Frozen weights are left out: they never change."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_engine_state(engine, directory: str) -> None:
    """Restore what `save_engine_state` wrote: weights, fp32 master weights and optimizer moments."""
    path, _ = engine.load_checkpoint(
        directory,
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state in {directory}")


def set_master_weights(params) -> None:
    """Make DeepSpeed's fp32 master copy equal the module's weights (after loading weights into the module; under
    ZeRO-3 call it inside `gathered`): otherwise the next optimizer step would restore the old weights."""
    from deepspeed.utils import safe_set_full_fp32_param

    for param in params:
        if param.requires_grad:
            safe_set_full_fp32_param(param, param.data.float())


def describe(accelerator, model) -> dict:
    """How the run is distributed, for the run summary: proof that DeepSpeed (and which stage) really ran."""
    return {
        "type": accelerator.distributed_type.value,
        "processes": accelerator.num_processes,
        "backend": getattr(accelerator.state, "backend", None),
        "zero_stage": zero_stage(accelerator),
        "wrapper": type(model).__name__,
    }
