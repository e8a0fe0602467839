"""Writing and reading what a run leaves behind: the final models, and checkpoints that resume exactly
(models, optimizer, scheduler, KL controller, every process's random state, counters)."""

from __future__ import annotations

import json
import logging
import os
import random
import warnings

import numpy as np
import torch
from torch import nn

from smolppo import files, zero
from smolppo.errors import UserError
from smolppo.files import (
    ADAPTER_WEIGHTS,
    MODEL_WEIGHTS,
    RNG_FILE,
    SCHEDULER_FILE,
    VALUE_MODEL_DIR,
)
from smolppo.runs import checkpointing, output_dir

logger = logging.getLogger(__name__)


def save_model(algorithm, target: str) -> None:
    """Final policy (full weights or LoRA adapter) + tokenizer in `target`, value model beside it (gae)."""
    algorithm.accelerator.wait_for_everyone()
    state_dicts = full_state_dicts(algorithm)
    if algorithm.accelerator.is_main_process:
        with output_dir.publishing(target) as staging:  # staged, then moved in; never over the user's files
            write_models(algorithm, staging, state_dicts)


def full_state_dicts(algorithm) -> tuple[dict | None, dict | None]:
    """Under DeepSpeed, the full (policy, value) weights gathered from all ranks (on the main process; None on the
    others); without it (None, None): the modules are saved as they are.

    Every process must call this (ZeRO-3 gathers shards collectively)."""
    if not algorithm.deepspeed:
        return None, None
    full = zero.full_state_dict(algorithm.accelerator, algorithm.accelerator.unwrap_model(algorithm.model))
    if full is None:
        return None, None
    policy = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
    value = {k.removeprefix("value.classifier."): v for k, v in full.items() if k.startswith("value.classifier.")}
    return policy, value


def write_models(algorithm, directory: str, state_dicts: tuple[dict | None, dict | None] = (None, None)) -> None:
    policy_state, value_state = state_dicts
    with warnings.catch_warnings():  # peft says it saves the embedding layers when lm_head carries an adapter
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)
        algorithm.policy.save_pretrained(directory, state_dict=policy_state)
    algorithm.tokenizer.save_pretrained(directory)
    if algorithm.value_scorer is not None:
        value_dir = os.path.join(directory, VALUE_MODEL_DIR)
        algorithm.value_scorer.classifier.save_pretrained(value_dir, state_dict=value_state)
        algorithm.tokenizer.save_pretrained(value_dir)


def checkpoint_bytes(algorithm) -> dict[str, int]:
    """What one checkpoint holds, in bytes: the saved weights (full policy or its adapter, value model) and the
    optimizer state (AdamW's two fp32 moments per trainable parameter, or DeepSpeed's own state)."""

    def numel(param) -> int:
        return getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves each process an empty placeholder

    def saved_size(param) -> int:  # under DeepSpeed trained weights are saved from its fp32 master copy
        return 4 if algorithm.deepspeed and param.requires_grad else param.element_size()

    def unique_bytes(params) -> int:
        storages = {id(p): numel(p) * saved_size(p) for p in params}  # tied weights are saved once
        return sum(storages.values())

    policy = algorithm.policy
    lora = hasattr(policy, "disable_adapter")
    weights = unique_bytes(p for p in policy.parameters() if p.requires_grad or not lora)
    if algorithm.value_scorer is not None:
        weights += unique_bytes(algorithm.value_scorer.classifier.parameters())
    trainable = sum(numel(p) for p in algorithm.trainable_params)
    if not algorithm.deepspeed:
        return {"weights": weights, "optimizer": 2 * 4 * trainable}
    # DeepSpeed's own state, all shards together: fp32 master weights and two moments, and (below ZeRO-3) a copy
    # of the trainable weights in the module's dtype.
    module_copy = 0 if algorithm.zero_stage == 3 else trainable * algorithm.trainable_params[0].element_size()
    return {"weights": weights, "optimizer": 3 * 4 * trainable + module_copy}


def save_checkpoint(algorithm, config, counters: dict) -> str | None:
    """A ``checkpoint-<update>`` directory with everything needed to continue exactly; None on other ranks.

    Under DeepSpeed every process first writes its shard of the engine's state (fp32 master weights, AdamW
    moments) into the staging directory; the main process then adds the rest and renames it in."""
    from accelerate.utils import gather_object

    acc, update = algorithm.accelerator, counters["update"]
    rng_states = gather_object([rng_state()])  # one per process, so each continues its own stream
    state_dicts = full_state_dicts(algorithm)
    if algorithm.deepspeed:
        if acc.is_main_process:
            checkpointing.fresh_staging_dir(config.output_dir, update)
        acc.wait_for_everyone()
        staging = checkpointing.staging_dir(config.output_dir, update)
        zero.save_engine_state(algorithm.model, os.path.join(staging, files.DEEPSPEED_DIR))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    algorithm_state = algorithm.state_dict()
    kl_state = algorithm_state["kl_controller"]

    def write(directory: str) -> None:
        write_models(algorithm, directory, state_dicts)
        if algorithm_state["optimizer"] is not None:  # None under DeepSpeed: files.DEEPSPEED_DIR holds it
            torch.save(algorithm_state["optimizer"], os.path.join(directory, files.OPTIMIZER_FILE))
        torch.save(algorithm_state["lr_scheduler"], os.path.join(directory, SCHEDULER_FILE))
        torch.save(rng_states, os.path.join(directory, RNG_FILE))
        state = {
            "update": update,
            "episodes": counters["episodes"],
            "kl_coef": kl_state["kl_coef"],
            "kl_horizon": kl_state.get("kl_horizon"),
            "kl_engaged": kl_state.get("kl_engaged"),
            checkpointing.OPTIMIZER_STATE_KEY: algorithm_state["optimizer"] is not None,
            "last_metrics": counters["last_metrics"],
            "watch": counters.get("watch", {}),
            "config": config.recorded(),
        }
        if algorithm.deepspeed:
            state[checkpointing.DEEPSPEED_STATE_KEY] = engine_layout(algorithm)
        with open(os.path.join(directory, files.STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    path = checkpointing.save_checkpoint(
        config.output_dir, update, write, config.save_total_limit, staged=algorithm.deepspeed
    )
    if config.save_optimizer_state == "latest":
        checkpointing.drop_optimizer_state(config.output_dir, keep=path)
    return path


def load_checkpoint(algorithm, path: str) -> dict:
    """Restore what `save_checkpoint` wrote into `algorithm`; returns the saved state (counters, metrics)."""
    try:
        return _load_checkpoint(algorithm, path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/safetensors/json report damage in many types
        raise UserError(
            f"checkpoint {path!r} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); resume "
            "from an earlier checkpoint-N"
        ) from exc


def _load_checkpoint(algorithm, path: str) -> dict:
    acc = algorithm.accelerator
    with open(os.path.join(path, files.STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    engine_state = deepspeed_state_to_restore(algorithm, path, state)
    with algorithm.gathered(modifier_rank=0):  # ZeRO-3: whole weights to load into, rank 0's copy kept
        load_weights_into(algorithm.policy, path)
        if algorithm.value_scorer is not None:
            load_weights_into(algorithm.value_scorer.classifier, os.path.join(path, VALUE_MODEL_DIR))
        if algorithm.deepspeed and engine_state is None:
            zero.set_master_weights(algorithm.trainable_params)  # else the next step restores the old weights
    optimizer = None
    if engine_state is not None:
        zero.load_engine_state(algorithm.model, engine_state)
    elif algorithm.deepspeed:
        logger.warning("%s has no DeepSpeed state for this run: weights restored, AdamW moments restart", path)
    elif not state.get(checkpointing.OPTIMIZER_STATE_KEY, True):
        logger.warning("%s keeps weights only (its optimizer state was dropped): AdamW moments restart", path)
    else:
        # on the CPU first: a GPU checkpoint resumes on a CPU machine, and under DDP each process takes its own
        # copy (not rank 0's GPU); load_state_dict then moves each state to its parameter's device
        optimizer = torch.load(os.path.join(path, files.OPTIMIZER_FILE), map_location="cpu", weights_only=False)
    algorithm.load_state_dict(
        {
            "optimizer": optimizer,
            "lr_scheduler": torch.load(os.path.join(path, SCHEDULER_FILE), map_location="cpu", weights_only=False),
            "kl_controller": {k: state.get(k) for k in ("kl_coef", "kl_horizon", "kl_engaged")},
        }
    )
    rng_states = torch.load(os.path.join(path, RNG_FILE), map_location="cpu", weights_only=False)
    if len(rng_states) != acc.num_processes:
        logger.warning(
            "checkpoint was written by %d processes, resuming with %d: random streams restart",
            len(rng_states),
            acc.num_processes,
        )
    set_rng_state(rng_states[acc.process_index % len(rng_states)])
    return state


def engine_layout(algorithm) -> dict:
    """What DeepSpeed's sharded state depends on: it restores only into the same layout."""
    return {"processes": algorithm.accelerator.num_processes, "zero_stage": algorithm.zero_stage}


def deepspeed_state_to_restore(algorithm, path: str, state: dict) -> str | None:
    """The checkpoint's DeepSpeed engine state when this run can restore it (DeepSpeed, the same ZeRO stage and
    number of processes), else None; says why a DeepSpeed checkpoint's state cannot be used."""
    saved = state.get(checkpointing.DEEPSPEED_STATE_KEY)
    directory = os.path.join(path, files.DEEPSPEED_DIR)
    if not saved or not os.path.isdir(directory):
        return None
    now = engine_layout(algorithm)
    if now != saved:
        logger.warning(
            "%s holds DeepSpeed state for %s, this run is %s: only the weights are restored", path, saved, now
        )
        return None
    return directory


def rng_state() -> dict:
    """This process's random streams: Python, NumPy, torch's CPU and this process's own GPU (not every visible
    GPU's: a checkpoint then resumes with another GPU count)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = own_cuda_rng_state(state.get("cuda"), device)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        elif state.get("cuda") is not None:
            logger.warning("the checkpoint has no random state for GPU %d: its stream restarts", device)


def own_cuda_rng_state(saved, device_index: int) -> torch.Tensor | None:
    """This process's GPU random state from a checkpoint: one state (written by this version), or the entry for
    `device_index` of a list of every visible GPU's (older checkpoints); None where there is none."""
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    return saved[device_index] if device_index < len(saved) else None


def load_weights_into(model: nn.Module, directory: str) -> None:
    """Load weights written by `save_pretrained` (full model or LoRA adapter) back into `model` in place."""
    from safetensors.torch import load_file

    adapter_file = os.path.join(directory, ADAPTER_WEIGHTS)
    if os.path.isfile(adapter_file):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter_file))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"adapter in {directory!r} does not match the policy: {result.unexpected_keys[:3]}")
        return
    state = load_file(os.path.join(directory, MODEL_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(
            f"weights in {directory!r} do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
