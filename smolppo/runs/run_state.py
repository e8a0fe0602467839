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

from smolppo import files
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
    """Under DeepSpeed, the full (policy, value) weights gathered from all ranks; else (None, None).

    Every process must call this (ZeRO-3 gathers shards collectively)."""
    if not algorithm.deepspeed:
        return None, None
    full = algorithm.accelerator.get_state_dict(algorithm.model)
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
    AdamW state (two fp32 moments per trainable parameter)."""

    def unique_bytes(params) -> int:
        storages = {p.data_ptr(): p.numel() * p.element_size() for p in params}  # tied weights are saved once
        return sum(storages.values())

    policy = algorithm.policy
    lora = hasattr(policy, "disable_adapter")
    weights = unique_bytes(p for p in policy.parameters() if p.requires_grad or not lora)
    if algorithm.value_scorer is not None:
        weights += unique_bytes(algorithm.value_scorer.classifier.parameters())
    optimizer = 2 * 4 * sum(p.numel() for p in algorithm.trainable_params)
    return {"weights": weights, "optimizer": 0 if algorithm.deepspeed else optimizer}


def save_checkpoint(algorithm, config, counters: dict) -> str | None:
    """A ``checkpoint-<update>`` directory with everything needed to continue exactly; None on other ranks."""
    from accelerate.utils import gather_object

    rng_states = gather_object([rng_state()])  # one per process, so each continues its own stream
    state_dicts = full_state_dicts(algorithm)
    algorithm.accelerator.wait_for_everyone()
    if not algorithm.accelerator.is_main_process:
        return None
    algorithm_state = algorithm.state_dict()
    kl_state = algorithm_state["kl_controller"]

    def write(directory: str) -> None:
        write_models(algorithm, directory, state_dicts)
        if algorithm_state["optimizer"] is not None:  # None under DeepSpeed, which shards it; see load_checkpoint
            torch.save(algorithm_state["optimizer"], os.path.join(directory, files.OPTIMIZER_FILE))
        torch.save(algorithm_state["lr_scheduler"], os.path.join(directory, SCHEDULER_FILE))
        torch.save(rng_states, os.path.join(directory, RNG_FILE))
        state = {
            "update": counters["update"],
            "episodes": counters["episodes"],
            "kl_coef": kl_state["kl_coef"],
            "kl_horizon": kl_state.get("kl_horizon"),
            "kl_engaged": kl_state.get("kl_engaged"),
            checkpointing.OPTIMIZER_STATE_KEY: algorithm_state["optimizer"] is not None,
            "last_metrics": counters["last_metrics"],
            "watch": counters.get("watch", {}),
            "config": config.recorded(),
        }
        with open(os.path.join(directory, files.STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    path = checkpointing.save_checkpoint(config.output_dir, counters["update"], write, config.save_total_limit)
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
    with open(os.path.join(path, files.STATE_FILE)) as f:
        state = json.load(f)
    load_weights_into(algorithm.policy, path)
    if algorithm.value_scorer is not None:
        load_weights_into(algorithm.value_scorer.classifier, os.path.join(path, VALUE_MODEL_DIR))
    optimizer = None
    if algorithm.deepspeed:
        logger.warning("no optimizer state restored from %s (DeepSpeed run): AdamW moments restart", path)
    elif not state.get(checkpointing.OPTIMIZER_STATE_KEY, True):
        logger.warning("%s keeps weights only (its optimizer state was dropped): AdamW moments restart", path)
    else:
        optimizer = torch.load(os.path.join(path, files.OPTIMIZER_FILE), weights_only=False)
    algorithm.load_state_dict(
        {
            "optimizer": optimizer,
            "lr_scheduler": torch.load(os.path.join(path, SCHEDULER_FILE), weights_only=False),
            "kl_controller": {k: state.get(k) for k in ("kl_coef", "kl_horizon", "kl_engaged")},
        }
    )
    rng_states = torch.load(os.path.join(path, RNG_FILE), weights_only=False)
    if len(rng_states) != acc.num_processes:
        logger.warning(
            "checkpoint was written by %d processes, resuming with %d: random streams restart",
            len(rng_states),
            acc.num_processes,
        )
    set_rng_state(rng_states[acc.process_index % len(rng_states)])
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
