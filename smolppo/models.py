"""Loading causal LMs, sequence classifiers and tokenizers by hub id or path (LoRA too), with clear failures.

Any causal LM / sequence classifier that `transformers` can load works; reward checkpoints written by
`trl`'s `RewardTrainer` (``checkpoint-N`` directories) load as they are.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import nn

from smolppo.errors import UserError
from smolppo.paths import looks_like_local_path

logger = logging.getLogger(__name__)

SMOKE_HINT = (
    "point --{flag} at a local directory, or try the offline smoke preset: --preset smoke (without network, "
    "HF_HUB_OFFLINE=1 makes hub ids fail at once instead of after retries)"
)


def resolve_model_path(name: str, flag: str) -> str:
    """Map a ``.gguf`` file to its converted folder (`smolppo.real_model`), and fail early, naming the flag, for
    local paths that do not exist."""
    path = name
    if path.lower().endswith(".gguf"):
        from smolppo.real_model import folder_for_gguf

        return folder_for_gguf(os.path.expanduser(path))
    if looks_like_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"{flag.replace('-', ' ')} {path!r} does not exist; {SMOKE_HINT.format(flag=flag)}")
    path = os.path.expanduser(path)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in MODEL_CONFIG_FILES):
        raise UserError(
            f"{flag.replace('-', ' ')} {path!r} holds no model (no config.json or adapter_config.json: an "
            f"interrupted save or copy?); point --{flag} at a complete model folder, a checkpoint-N or a hub id"
        )
    return path


MODEL_CONFIG_FILES = ("config.json", "adapter_config.json")


def damaged_weights(directory: str) -> str | None:
    """The first ``*.safetensors`` file in `directory` whose header cannot be read, or None."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    return next((n for n in names if not safetensors_readable(os.path.join(directory, n))), None)


def _load(loader, path: str, flag: str, **kwargs):
    from safetensors import SafetensorError

    try:
        return loader(path, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise load_error(path, flag, exc) from exc


def load_error(path: str, flag: str, exc: Exception) -> UserError:
    """One line for a model that failed to load: the damaged file of a local folder, else the reason and a hint."""
    what = f"{flag.replace('-', ' ')} {path!r}"
    if os.path.isdir(path):
        damaged = damaged_weights(path)
        if damaged:
            return UserError(f"could not load {what}: {damaged} is damaged or truncated; save or copy it again")
    first_line = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    hint = "check the folder's files" if os.path.isdir(path) else SMOKE_HINT.format(flag=flag)
    return UserError(f"could not load {what}: {first_line}; {hint}")


def load_tokenizer(path: str, flag: str = "policy-model"):
    """The tokenizer at `path`, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, path, flag)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {path!r} has no EOS token; PPO needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _config_without_dropout(path: str, flag: str, **overrides):
    """The model config with every dropout probability set to 0: PPO's log-probs must be deterministic."""
    from transformers import AutoConfig

    config = _load(AutoConfig.from_pretrained, path, flag)
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_causal_lm(path: str, flag: str = "policy-model"):
    from transformers import AutoModelForCausalLM

    config = _config_without_dropout(path, flag)
    model = _load(AutoModelForCausalLM.from_pretrained, path, flag, config=config, dtype=torch.float32)
    disable_dropout(model)
    return model


def load_sequence_classifier(path: str, flag: str = "reward-model", **overrides):
    """A sequence classifier with exactly one output (a reward model, or a value model initialised from one).

    `overrides` (e.g. ``num_labels=1``) turn another checkpoint, such as the policy, into a fresh classifier."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    config = _config_without_dropout(path, flag, **overrides)
    if getattr(config, "num_labels", 1) != 1:
        raise UserError(
            f"{flag.replace('-', ' ')} {path!r} has {config.num_labels} outputs; a reward model must be a sequence "
            "classifier with num_labels=1 (train one with train_reward_model.py)"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    except ValueError as exc:
        raise UserError(
            f"{flag.replace('-', ' ')} {path!r} is not a sequence-classification model "
            f"({type(config).__name__}); a reward model must be one with num_labels=1"
        ) from exc
    except (OSError, SafetensorError) as exc:
        raise load_error(path, flag, exc) from exc
    disable_dropout(model)
    score_head(model)
    return model


def score_head(model: nn.Module) -> nn.Module:
    """The linear head that maps hidden states to the score (``score`` in most architectures)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise UserError(f"{type(model).__name__} has no 'score' head; cannot use it as a reward or value model")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a `PreTrainedModel` (the module named by ``base_model_prefix``)."""
    return getattr(model, model.base_model_prefix)


def lora_config_for(config, model, task_type: str):
    """A `peft.LoraConfig` from the config's LoRA fields, after checking the target modules exist in `model`."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in config.lora_target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"LoRA target modules {missing} do not exist in the model; choose from {linear}")
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type=task_type,
    )


def apply_lora(policy, config):
    """Wrap the policy with LoRA adapters; the frozen base with adapters off is the reference model."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(policy, lora_config_for(config, policy, "CAUSAL_LM"))
    disable_dropout(model)
    return model


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus those in the model's generation config."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def check_embeddings(model, tokenizer, what: str, fix: str) -> None:
    """One line when `tokenizer` has ids that `model` has no embedding for."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise UserError(
            f"{what} has {vocab} token embeddings but the tokenizer it reads has {len(tokenizer)} tokens; {fix}"
        )


def safetensors_readable(path: str) -> bool:
    """True when the safetensors file's header parses (a truncated or overwritten file does not)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - any parse failure means a damaged file
        return False
    return True
