"""The algorithm's state on disk, written and read by the algorithm itself (`Algorithm.save` / `Algorithm.load`).

A directory it saves holds:

* the policy (full weights, or its LoRA adapter) and the value model (gae) in Hugging Face format, so
  ``from_pretrained`` loads a checkpoint as it loads a final model;
* AdamW's moments as tensors (``optimizer.safetensors``), or under DeepSpeed each process's shard (``deepspeed/``);
* everything else as data in ``algorithm_state.json``: the optimizer's parameter groups, the learning-rate schedule,
  the KL controller, the DeepSpeed layout and every process's random streams (Python, NumPy, torch, this GPU's).

Nothing is unpickled when resuming. Checkpoints of the earlier format (``optimizer.pt``, ``scheduler.pt``,
``rng_state.pt``, the KL controller in ``trainer_state.json``) are read with ``torch.load(weights_only=True)``,
which accepts tensors and plain data only (NumPy's random state allowed by name) and refuses anything else in one
line. DeepSpeed reads its own shards with pickle, so each is first scanned for the types it names, and one naming
a type DeepSpeed does not write is refused the same way.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import random
import re
import warnings

import numpy as np
import torch
from torch import nn

from smolppo import files, zero
from smolppo.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: the pickled optimizer.pt / scheduler.pt / rng_state.pt of earlier versions


# ------------------------------------------------------------------ the random streams as data
def rng_state() -> dict:
    """This process's random streams as JSON data: Python, NumPy, torch's CPU and this process's own GPU (not
    every visible GPU's: a checkpoint then resumes with another GPU count)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device()).tolist()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state`'s output (or an earlier checkpoint's tensors and arrays)."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8, device="cpu"))
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = own_cuda_rng_state(state.get("cuda"), device)
        if cuda is not None:
            torch.cuda.set_rng_state(torch.as_tensor(cuda, dtype=torch.uint8, device="cpu"), device)
        elif state.get("cuda") is not None:
            logger.warning("the checkpoint has no random state for GPU %d: its stream restarts", device)


def own_cuda_rng_state(saved, device_index: int):
    """This process's GPU random state from a checkpoint: one state (a list of bytes, or a tensor in the earlier
    format), or the entry for `device_index` of a list of every visible GPU's (older checkpoints); None where
    there is none."""
    if saved is None or isinstance(saved, torch.Tensor) or (saved and isinstance(saved[0], int)):
        return saved
    return saved[device_index] if device_index < len(saved) else None


# ------------------------------------------------------------------ the optimizer as tensors and data
def optimizer_as_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's ``state_dict()`` split into named tensors (``<param>.<name>``) and its parameter groups."""
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    return tensors, state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    """`optimizer_as_tensors`' inverse: the ``state_dict()`` AdamW loads (betas as the tuple it expects)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**group, **({"betas": tuple(group["betas"])} if "betas" in group else {})} for group in param_groups]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------ weights
def full_state_dicts(algorithm) -> tuple[dict | None, dict | None]:
    """Under DeepSpeed, the full (policy, value) weights gathered from all ranks (on the main process; None on the
    others); without it (None, None): the modules are saved as they are. Every process must call this."""
    if not algorithm.deepspeed:
        return None, None
    full = zero.full_state_dict(algorithm.accelerator, algorithm.accelerator.unwrap_model(algorithm.model))
    if full is None:
        return None, None
    policy = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
    value = {k.removeprefix("value.classifier."): v for k, v in full.items() if k.startswith("value.classifier.")}
    return policy, value


def write_models(algorithm, directory: str, state_dicts: tuple[dict | None, dict | None] = (None, None)) -> None:
    """Policy (or adapter) + tokenizer in `directory`, the value model (gae) in its sub-directory."""
    policy_state, value_state = state_dicts
    with warnings.catch_warnings():  # peft says it saves the embedding layers when lm_head carries an adapter
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)
        algorithm.policy.save_pretrained(directory, state_dict=policy_state)
    algorithm.tokenizer.save_pretrained(directory)
    if algorithm.value_scorer is not None:
        value_dir = os.path.join(directory, files.VALUE_MODEL_DIR)
        algorithm.value_scorer.classifier.save_pretrained(value_dir, state_dict=value_state)
        algorithm.tokenizer.save_pretrained(value_dir)


def load_weights_into(model: nn.Module, directory: str) -> None:
    """Load weights written by `save_pretrained` (full model or LoRA adapter) back into `model` in place."""
    from safetensors.torch import load_file

    adapter_file = os.path.join(directory, files.ADAPTER_WEIGHTS)
    if os.path.isfile(adapter_file):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter_file))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"adapter in {directory!r} does not match the policy: {result.unexpected_keys[:3]}")
        return
    state = load_file(os.path.join(directory, files.MODEL_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a head tied to the embeddings is not saved
        raise UserError(
            f"weights in {directory!r} do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


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


# ------------------------------------------------------------------ save
def engine_layout(algorithm) -> dict:
    """What DeepSpeed's sharded state depends on: it restores only into the same layout."""
    return {"processes": algorithm.accelerator.num_processes, "zero_stage": algorithm.zero_stage}


def save(algorithm, directory: str) -> dict | None:
    """Write the algorithm's whole state into `directory` (which exists); every process calls it. Returns, on the
    main process, what the checkpoint's index records: its format, whether it holds the optimizer's tensors, and
    DeepSpeed's layout when it holds DeepSpeed's state."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    acc = algorithm.accelerator
    rng_states = gather_object([rng_state()])  # one per process, so each continues its own stream
    weights = full_state_dicts(algorithm)
    if algorithm.deepspeed:
        zero.save_engine_state(algorithm.model, os.path.join(directory, files.DEEPSPEED_DIR))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    write_models(algorithm, directory, weights)
    param_groups = None
    if not algorithm.deepspeed:  # DeepSpeed's engine keeps (and shards) its own
        tensors, param_groups = optimizer_as_tensors(algorithm.optimizer.state_dict())
        save_file(tensors, os.path.join(directory, files.OPTIMIZER_TENSORS))
    state = {
        "format": FORMAT,
        "optimizer_param_groups": param_groups,
        "lr_scheduler": algorithm.lr_scheduler.state_dict(),
        "kl_controller": algorithm.kl_controller.state_dict(),
        "deepspeed": engine_layout(algorithm) if algorithm.deepspeed else None,
        "rng": rng_states,
    }
    with open(os.path.join(directory, files.ALGORITHM_STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f)
    holds = {files.CHECKPOINT_FORMAT_KEY: FORMAT, "optimizer_state": param_groups is not None}
    return {**holds, "deepspeed_state": state["deepspeed"]} if algorithm.deepspeed else holds


# ------------------------------------------------------------------ load
NUMPY_RANDOM_STATE = (
    "numpy.dtype",
    "numpy.ndarray",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
)
# The types DeepSpeed 0.19 pickles into its ZeRO-2/3 shards besides tensors and plain data (fp32 and bf16, full and
# LoRA, measured); fp16 training adds its dynamic loss scaler.
DEEPSPEED_WRITES = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def load(algorithm, directory: str) -> None:
    """Restore what `save` wrote (or an earlier format's files) into `algorithm`; a damaged or unsafe file is one
    line naming it."""
    try:
        _load(algorithm, directory)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/safetensors/json report damage in many types
        raise UserError(
            f"checkpoint {directory!r} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); resume "
            "from an earlier checkpoint-N"
        ) from exc


def _load(algorithm, directory: str) -> None:
    acc = algorithm.accelerator
    state = read_state(directory)
    engine_state = deepspeed_state_to_restore(algorithm, directory, state.get("deepspeed"))
    with algorithm.gathered(modifier_rank=0):  # ZeRO-3: whole weights to load into, rank 0's copy kept
        load_weights_into(algorithm.policy, directory)
        if algorithm.value_scorer is not None:
            load_weights_into(algorithm.value_scorer.classifier, os.path.join(directory, files.VALUE_MODEL_DIR))
        if algorithm.deepspeed and engine_state is None:
            zero.set_master_weights(algorithm.trainable_params)  # else the next step restores the old weights
    if engine_state is not None:
        refuse_unsafe_pickles(engine_state)
        zero.load_engine_state(algorithm.model, engine_state)
    elif algorithm.deepspeed:
        logger.warning("%s has no DeepSpeed state for this run: weights restored, AdamW moments restart", directory)
    elif state["optimizer"] is None:
        logger.warning("%s keeps weights only (its optimizer state was dropped): AdamW moments restart", directory)
    else:
        # on the CPU first: a GPU checkpoint resumes on a CPU machine, and under DDP each process takes its own
        # copy (not rank 0's GPU); load_state_dict then moves each state to its parameter's device
        algorithm.optimizer.load_state_dict(state["optimizer"])
    algorithm.restore_schedules(state["lr_scheduler"], state["kl_controller"])
    rng_states = state["rng"]
    if len(rng_states) != acc.num_processes:
        logger.warning(
            "checkpoint was written by %d processes, resuming with %d: random streams restart",
            len(rng_states),
            acc.num_processes,
        )
    set_rng_state(rng_states[acc.process_index % len(rng_states)])


def read_state(directory: str) -> dict:
    """The saved state as ``optimizer`` (a state_dict, or None when not kept), ``lr_scheduler``,
    ``kl_controller``, ``deepspeed`` (the layout, or None) and ``rng`` (one per process), from either format."""
    from safetensors.torch import load_file

    path = os.path.join(directory, files.ALGORITHM_STATE_FILE)
    if not os.path.isfile(path):
        return read_earlier_format(directory)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    tensors_file = os.path.join(directory, files.OPTIMIZER_TENSORS)
    optimizer = None
    if state["optimizer_param_groups"] is not None and os.path.isfile(tensors_file):
        optimizer = optimizer_from_tensors(load_file(tensors_file, device="cpu"), state["optimizer_param_groups"])
    return {**state, "optimizer": optimizer}


def read_earlier_format(directory: str) -> dict:
    """Format 1: pickled optimizer, scheduler and random states, the KL controller and the DeepSpeed layout in the
    checkpoint's index. Read as plain data only (see `load_data_file`)."""
    with open(os.path.join(directory, files.STATE_FILE), encoding="utf-8") as f:
        index = json.load(f)
    optimizer_file = os.path.join(directory, files.LEGACY_OPTIMIZER_FILE)
    kept = index.get("optimizer_state", True) and os.path.isfile(optimizer_file)
    return {
        "optimizer": load_data_file(optimizer_file) if kept else None,
        "lr_scheduler": load_data_file(os.path.join(directory, files.LEGACY_SCHEDULER_FILE)),
        "kl_controller": {k: index.get(k) for k in ("kl_coef", "kl_horizon", "kl_engaged")},
        "deepspeed": index.get("deepspeed_state"),
        "rng": load_data_file(os.path.join(directory, files.LEGACY_RNG_FILE), allow=NUMPY_RANDOM_STATE),
    }


def load_data_file(path: str, allow: tuple[str, ...] = ()):
    """A pickled file read as tensors and plain data only (and the types named in `allow`): a file carrying any
    other object, which unpickling would build and could run code, is refused in one line."""
    unsafe = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allow]
    if unsafe:
        raise unsafe_file_error(path, unsafe)
    with torch.serialization.safe_globals([_global(name) for name in allow]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"(Unsupported global: \S+|got <[^>]+>)", str(exc))
            raise unsafe_file_error(path, [found.group(1) if found else str(exc).splitlines()[0][:120]]) from exc


def refuse_unsafe_pickles(engine_state: str) -> None:
    """DeepSpeed unpickles its shards without restriction: refuse any naming a type DeepSpeed does not write."""
    for root, _, names in os.walk(engine_state):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".pt"):
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                unsafe = [name for name in found if name not in DEEPSPEED_WRITES]
                if unsafe:
                    raise unsafe_file_error(path, unsafe)


def unsafe_file_error(path: str, names: list[str]) -> UserError:
    return UserError(
        f"{path!r} holds pickled objects that are not plain data ({', '.join(names[:3])}): resuming would build "
        "them and could run code, so it is refused; resume only from checkpoints you wrote, or start a new run "
        "from its weights with --policy-model DIR"
    )


def _global(name: str):
    module, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):  # numpy 1 names its module numpy.core
        return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), attribute)


def deepspeed_state_to_restore(algorithm, directory: str, saved: dict | None) -> str | None:
    """The checkpoint's DeepSpeed engine state when this run can restore it (DeepSpeed, the same ZeRO stage and
    number of processes), else None; says why a DeepSpeed checkpoint's state cannot be used."""
    engine_dir = os.path.join(directory, files.DEEPSPEED_DIR)
    if not saved or not os.path.isdir(engine_dir):
        return None
    now = engine_layout(algorithm)
    if now != saved:
        logger.warning(
            "%s holds DeepSpeed state for %s, this run is %s: only the weights are restored", directory, saved, now
        )
        return None
    return engine_dir
