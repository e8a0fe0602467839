"""Loading the four PPO models (policy, reference, reward, value) and their tokenizer, with clear failures.

Any causal LM / sequence classifier that `transformers` can load works; reward checkpoints written by
`trl`'s `RewardTrainer` (``checkpoint-N`` directories) load as they are.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from smolppo.errors import UserError
from smolppo.paths import looks_like_local_path
from smolppo.rewards.reader import RewardReader, recorded_template
from smolppo.smoke import resolve as resolve_smoke_name

logger = logging.getLogger(__name__)

SMOKE_HINT = (
    "point --{flag} at a local directory, or try the offline smoke preset: --preset smoke (without network, "
    "HF_HUB_OFFLINE=1 makes hub ids fail at once instead of after retries)"
)


def resolve_model_path(name: str, flag: str) -> str:
    """Map smoke names to paths, a ``.gguf`` file to its converted folder (`smolppo.real_model`), and fail early,
    naming the flag, for local paths that do not exist."""
    path = resolve_smoke_name(name)
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
    from smolppo.runs.checkpointing import safetensors_readable

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


def reference_context(policy):
    """A context in which `policy` computes the reference model's outputs (LoRA: adapters disabled)."""
    if hasattr(policy, "disable_adapter"):
        return policy.disable_adapter()
    return nullcontext()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant, so LoRA needs no input grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def attention_for(setting: str) -> str | None:
    """The attention kernel `setting` asks for; None (``auto``) keeps the model's own (SDPA for Llama).

    ``eager`` is faster on CPU (forward + backward of the SmolLM2-135M body in bf16: 20 % at 122 tokens, 21 % at 512,
    with about 1 GB more memory at 2 x 512 tokens), but it is not the default: on the smoke task its runs learned
    less than SDPA's (mean gain 0.16 vs 0.62 over seeds 42 and 1-4), a difference not explained yet
    (docs/PERFORMANCE.md)."""
    return None if setting == "auto" else setting


def set_attention(implementation: str | None, *models: nn.Module | None) -> None:
    """Switch each model (a PEFT model included) to `implementation`; None leaves them as loaded."""
    if implementation is None:
        return
    for model in models:
        if model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.set_attn_implementation(implementation)


def store_body_linears_in_bf16(model: nn.Module) -> None:
    """Keep a frozen model's body `nn.Linear` weights in bf16, for use under bf16 autocast only.

    Autocast casts every Linear weight to bf16 on each call, and it caches that cast only for weights that require
    grad, so a frozen model paid a full cast per forward. Stored in bf16 (the same round-to-nearest cast), its outputs
    are bit-identical and it uses half the memory. Embeddings, norms, the LM head and a score head stay fp32."""
    heads = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
    if hasattr(model, "score"):
        heads.append(model.score)
    skip = {id(p) for head in heads if head is not None for p in head.parameters()}
    skip |= {id(p) for p in model.get_input_embeddings().parameters()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in skip:
            module.to(torch.bfloat16)


@contextmanager
def eval_mode(*models: nn.Module):
    """Temporarily put `models` in eval mode (restoring train mode afterwards)."""
    previous = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, previous):
            m.train(was_training)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus those in the model's generation config."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def load_weights_into(model: nn.Module, directory: str) -> None:
    """Load weights written by `save_pretrained` (full model or LoRA adapter) back into `model` in place."""
    from safetensors.torch import load_file

    adapter_file = os.path.join(directory, "adapter_model.safetensors")
    if os.path.isfile(adapter_file):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter_file))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"adapter in {directory!r} does not match the policy: {result.unexpected_keys[:3]}")
        return
    state = load_file(os.path.join(directory, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(
            f"weights in {directory!r} do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


@dataclass
class PPOModels:
    """The policy tokenizer, the three trained/frozen networks of a PPO run and the reward reader."""

    tokenizer: object
    policy: nn.Module
    ref_policy: nn.Module | None
    value_model: nn.Module | None  # gae only
    reward: RewardReader | None  # None with --reward-model none


def check_embeddings(model, tokenizer, what: str, fix: str) -> None:
    """One line when `tokenizer` has ids that `model` has no embedding for."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise UserError(
            f"{what} has {vocab} token embeddings but the tokenizer it reads has {len(tokenizer)} tokens; {fix}"
        )


def load_reward_tokenizer(path: str, fallback):
    """The reward model's own tokenizer (RewardTrainer saves it beside the weights), else `fallback`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found with reward model %s; reading it with the policy's tokenizer", path)
        return fallback
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_reader(name: str, template: str | None, fallback_tokenizer, batch_size: int = 16) -> RewardReader:
    """The reward model with its own tokenizer, read as it was trained (see `smolppo.rewards.reader`)."""
    path = resolve_model_path(name, "reward-model")
    model = load_sequence_classifier(path, "reward-model")
    tokenizer = load_reward_tokenizer(path, fallback_tokenizer)
    check_embeddings(model, tokenizer, f"reward model {path!r}", "save the tokenizer it was trained with beside it")
    return RewardReader(model, tokenizer, template or recorded_template(path), batch_size=batch_size, name=path)


def load_value_model(config, policy_path: str, policy_tokenizer, reward: RewardReader | None):
    """The value model reads the policy's token ids: ``--value-model``, else the reward model when it shares the
    policy's vocabulary, else the policy's body with a fresh 1-output head."""
    if config.value_model:
        path = resolve_model_path(config.value_model, "value-model")
        model = load_sequence_classifier(path, "value-model")
    elif reward is not None and reward.tokenizer.get_vocab() == policy_tokenizer.get_vocab():
        model = load_sequence_classifier(reward.model.name_or_path, "reward-model")
    else:
        why = "no reward model" if reward is None else "reward model has another vocabulary"
        logger.info("%s: value model = policy body + a new 1-output head", why)
        from transformers.utils import logging as hf_logging

        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its "LOAD REPORT" (LM head unused, score head new) is what we intend
        try:
            model = load_sequence_classifier(
                policy_path, "policy-model", num_labels=1, pad_token_id=policy_tokenizer.pad_token_id
            )
        finally:
            hf_logging.set_verbosity(previous)
    fix = "pass --value-model with a classifier trained from the policy's tokenizer"
    check_embeddings(model, policy_tokenizer, "value model", fix)
    return model


def load_ppo_models(config) -> PPOModels:
    """Policy (+LoRA), reference (a frozen copy, or none with LoRA), reward reader (when a reward model is used) and
    value model (only for the gae estimator)."""
    for name, flag in ((config.reward_model if config.uses_reward_model else None, "reward-model"),
                       (config.value_model, "value-model")):  # fmt: skip
        if name:  # local paths first: a missing one fails at once, before the hub is asked for anything
            resolve_model_path(name, flag)
    policy_path = resolve_model_path(config.policy_model, "policy-model")
    tokenizer = load_tokenizer(policy_path, "policy-model")
    reward = None
    if config.uses_reward_model:
        reward = load_reward_reader(config.reward_model, config.reward_template, tokenizer, config.mini_batch_size)
    policy = load_causal_lm(policy_path, "policy-model")
    check_embeddings(policy, tokenizer, "policy", "they were not trained together")
    value_model = load_value_model(config, policy_path, tokenizer, reward) if config.uses_value_model else None
    if config.use_lora:
        policy, ref_policy = apply_lora(policy, config), None
    else:
        ref_policy = load_causal_lm(policy_path, "policy-model")
    return PPOModels(tokenizer, policy, ref_policy, value_model, reward)
