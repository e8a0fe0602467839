"""The stages of `train_ppo.py` as helpers, so tests and the benchmark build exactly what the script builds."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from torch import nn

from smolppo import files
from smolppo.configs.parts import resume_rules
from smolppo.configs.ppo_fields import GenerationFields, SamplingFields
from smolppo.data import ANSWER_COLUMNS, PromptSet, build_prompts, load_rows, row_prompt
from smolppo.errors import UserError
from smolppo.models import (
    apply_lora,
    check_embeddings,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_path,
)
from smolppo.rewards.reader import RewardReader, load_reward_reader
from smolppo.runs import checkpointing, output_dir

logger = logging.getLogger(__name__)


def load_training_prompts(config, tokenizer, rows: list[dict] | None = None) -> PromptSet:
    """The first `num_samples` rows of the dataset, rendered and filtered by length."""
    rows = load_rows(config.dataset, config.dataset_split) if rows is None else rows
    if config.num_samples > len(rows):
        logger.warning(
            "num_samples=%d but %s has only %d rows: training on all of them, none are left unseen for the "
            "reward-model check or evaluation",
            config.num_samples,
            config.dataset,
            len(rows),
        )
    return build_prompts(rows[: config.num_samples], tokenizer, config.max_prompt_length, source=config.dataset)


ANSWER_TOKEN_LIMIT = 2048  # held-out answers longer than this are not read by the start-up check


def held_out_pairs(config, rows: list[dict], tokenizer) -> list[dict]:
    """Up to `reward_check_pairs` rows after the training rows that have chosen and rejected answers, whose prompt
    fits `max_prompt_length` (as training's do) and whose answers fit `ANSWER_TOKEN_LIMIT`: memory stays bounded."""
    if not config.reward_check_pairs or not rows or any(c not in rows[0] for c in ANSWER_COLUMNS):
        return []

    def fits(text: str, limit: int) -> bool:  # characters first: a token is rarely under one character
        return len(text) <= 16 * limit and len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit

    fitting, too_long = [], 0
    for row in rows[config.num_samples :]:
        if len(fitting) == config.reward_check_pairs:
            break
        if not all(row.get(k) for k in ("question", *ANSWER_COLUMNS)):
            continue
        limit = config.max_prompt_length
        question_fits = len(str(row.get("system") or "")) + len(str(row["question"])) <= 16 * limit
        if (
            question_fits
            and len(row_prompt(tokenizer, row)[1]) <= limit
            and all(fits(str(row[k]), ANSWER_TOKEN_LIMIT) for k in ANSWER_COLUMNS)
        ):
            fitting.append(row)
        else:
            too_long += 1
    if too_long:
        logger.info("reward-model check: passed over %d held-out pairs too long to read", too_long)
    return fitting


def build_ppo_trainer(config, accelerator=None):
    """Seed, load the models, the prompts and the reward sources, check the reward model, and assemble the
    algorithm and the job that runs it (a `smolppo.job.trainer.Trainer`)."""
    from transformers import set_seed

    from smolppo.algorithm.ppo import Algorithm
    from smolppo.distributed import make_accelerator
    from smolppo.job.trainer import Trainer
    from smolppo.rewards.sources import build_reward

    set_seed(config.seed)
    if config.generation_backend == "vllm":  # before anything loads: where vLLM cannot run is one line at once
        from accelerate import PartialState

        from smolppo.algorithm.samplers import check_vllm_usable

        check_vllm_usable(PartialState().num_processes)
    models = load_ppo_models(config)
    reward = build_reward(models.reward, config.reward_funcs, config.reward_weights)
    rows = load_rows(config.dataset, config.dataset_split)
    prompts = load_training_prompts(config, models.tokenizer, rows)
    accelerator = accelerator or make_accelerator(
        config.accumulation_steps, config.per_device_train_batch_size, config.max_grad_norm, config.bf16
    )
    reward_check = None
    if config.reward_check_pairs and models.reward is not None:
        pairs = held_out_pairs(config, rows, models.tokenizer)
        reward_check = check_reward_model_as_read(models.reward, pairs, config, accelerator)
    try:
        schedule = config.schedule(len(prompts.input_ids), accelerator.num_processes)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    algorithm = Algorithm(
        config.algorithm_settings(),
        schedule,
        models.tokenizer,
        models.policy,
        reward,
        accelerator,
        ref_policy=models.ref_policy,
        value_model=models.value_model,
        sampler=build_sampler(config, models, accelerator),
    )
    return Trainer(config, algorithm, prompts, reward, reward_check=reward_check)


def build_sampler(config, models, accelerator):
    """The rollout engine: None for transformers' `generate` (the algorithm's own), else a vLLM engine in this
    process, at the run's precision, sized for the longest prompt and response."""
    if config.generation_backend == "hf":
        return None
    import torch

    from smolppo.algorithm.samplers import VLLMSampler
    from smolppo.models import eos_token_ids

    run_dtype = torch.bfloat16 if config.bf16 else torch.float32
    longest = config.max_prompt_length + config.max_new_tokens
    positions = getattr(models.policy.config, "max_position_embeddings", None) or longest
    return VLLMSampler(
        resolve_model_path(config.policy_model, "policy-model"),
        eos_token_ids(models.tokenizer, models.policy),
        models.tokenizer.pad_token_id,
        config.group(SamplingFields),
        config.group(GenerationFields),
        dtype=getattr(torch, config.vllm_dtype) if config.vllm_dtype != "auto" else run_dtype,
        device=accelerator.device,
        seed=config.seed,
        max_model_len=min(longest, positions),
    )


def check_reward_model_as_read(reader: RewardReader, pairs: list[dict], config, accelerator):
    """The start-up check on the device and in the precision PPO will read the reward model with (bf16 linears
    under autocast with ``--bf16``), not on the CPU in fp32; under several processes each reads its share."""
    import torch
    from accelerate.utils import gather_object

    from smolppo.rewards.reader import check_reward_model
    from smolppo.runtime import store_body_linears_in_bf16

    reader.model.to(accelerator.device)
    if config.bf16:
        store_body_linears_in_bf16(reader.model)
    several = accelerator.num_processes > 1
    share = pairs[accelerator.process_index :: accelerator.num_processes] if several else pairs
    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        return check_reward_model(reader, share, config.min_reward_accuracy, gather_object if several else None)


def check_output_dir_for(config) -> str | None:
    """Refuse, before anything is loaded or written, what would replace or delete something by mistake."""
    resume_from = checkpointing.check_output_dir(
        config.output_dir, config.overwrite_output_dir, config.resume_from_checkpoint, files.RUN_SUMMARY_FILE
    )
    if config.overwrite_output_dir and not resume_from:
        inputs = {
            "policy-model": config.policy_model,
            "reward-model": config.reward_model if config.uses_reward_model else None,
            "value-model": config.value_model,
            "dataset": config.dataset,
        }
        output_dir.check_overwrite(config.output_dir, inputs)
    return resume_from


@dataclass
class ResumePlan:
    checkpoint: str | None = None
    changes: list = field(default_factory=list)
    discard: list = field(default_factory=list)


def plan_resume(config, resume_from: str | None, deepspeed: bool) -> ResumePlan:
    """The usable checkpoint, the settings that differ from it (refused unless allowed), newer checkpoints to drop."""
    if not resume_from:
        return ResumePlan()
    needs_optimizer = not deepspeed
    path = checkpointing.resolve_resume(config.output_dir, resume_from, needs_optimizer)
    rules = resume_rules(type(config))
    changes = checkpointing.check_resume_config(path, config.recorded(), rules, config.allow_config_change)
    newer = checkpointing.newer_checkpoints(config.output_dir, path)
    usable = [p for p in newer if checkpointing.checkpoint_problem(p, needs_optimizer) is None]
    if usable and not config.discard_newer_checkpoints:  # damaged newer ones were passed over: they go anyway
        names = ", ".join(os.path.basename(p) for p in usable)
        raise UserError(
            f"{path!r} is not the newest checkpoint ({names} came after it): resuming from it starts a branch. "
            "Pass --discard-newer-checkpoints to drop the newer ones, or resume from 'latest'"
        )
    return ResumePlan(path, changes, newer)


@dataclass
class PPOModels:
    """The policy tokenizer, the three trained/frozen networks of a PPO run and the reward reader."""

    tokenizer: object
    policy: nn.Module
    ref_policy: nn.Module | None
    value_model: nn.Module | None  # gae only
    reward: RewardReader | None  # None with --reward-model none


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
    for name, flag in (
        (config.reward_model if config.uses_reward_model else None, "reward-model"),
        (config.value_model, "value-model"),
    ):
        if name:  # local paths first: a missing one fails at once, before the hub is asked for anything
            resolve_model_path(name, flag)
    policy_path = resolve_model_path(config.policy_model, "policy-model")
    tokenizer = load_tokenizer(policy_path, "policy-model")
    reward = None
    if config.uses_reward_model:
        reward = load_reward_reader(
            config.reward_model, config.reward_template, tokenizer, config.effective_inference_batch_size
        )
    policy = load_causal_lm(policy_path, "policy-model")
    check_embeddings(policy, tokenizer, "policy", "they were not trained together")
    value_model = load_value_model(config, policy_path, tokenizer, reward) if config.uses_value_model else None
    if config.use_lora:
        policy, ref_policy = apply_lora(policy, config), None
    else:
        ref_policy = load_causal_lm(policy_path, "policy-model")
    return PPOModels(tokenizer, policy, ref_policy, value_model, reward)
