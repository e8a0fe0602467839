"""Training the reward model with `trl`'s `RewardTrainer`, and measuring it the way PPO will use it.

Pairs are tokenised as PPO presents sequences (chat-template prompt + answer + EOS). The classifier's own
pooling reads the rightmost token that is not ``pad_token_id``; when pad == EOS (SmolLM2) that would skip
the final EOS, so the reward model is given a distinct pad id and therefore scores the last real token,
the same token `smolppo.scoring` reads during PPO.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch

from smolppo.data import load_rows, preference_pairs, right_pad
from smolppo.errors import UserError
from smolppo.models import load_tokenizer, lora_config_for, resolve_model_path
from smolppo.scoring import TokenScorer

logger = logging.getLogger(__name__)

SUMMARY_FILE = "reward_model_summary.json"


def distinct_pad_id(tokenizer) -> int:
    """A special token id other than EOS to pad with, so that padding never hides a real EOS."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    for token_id in tokenizer.all_special_ids:
        if token_id != eos:
            return token_id
    raise UserError(
        "the tokenizer has no special token besides EOS to pad with; the reward model would score the token "
        "before EOS. Use a tokenizer with an unk/bos/pad token"
    )


def split_pairs(pairs: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then hold out ``test_size`` of the pairs (at least one)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(test_size * len(pairs)))
    if held_out >= len(pairs):
        raise UserError(f"only {len(pairs)} usable pairs: too few to hold out a test split; use more data")
    return [pairs[i] for i in order[held_out:]], [pairs[i] for i in order[:held_out]]


@torch.no_grad()
def last_token_scores(scorer: TokenScorer, sequences: list[list[int]], pad_id: int, batch_size: int = 32):
    """Reward of each sequence read at its last real token (found from lengths, not from pad ids)."""
    device = next(scorer.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = right_pad(chunk, pad_id)
        positions = (mask.sum(1) - 1)[:, None]
        position_ids = torch.arange(ids.shape[1]).expand_as(ids)
        out.append(scorer(ids.to(device), mask.to(device), position_ids.to(device), positions.to(device))[:, 0])
    return torch.cat(out).cpu()


def pairwise_metrics(classifier, pairs: list[dict], pad_id: int, batch_size: int = 32) -> dict:
    """Held-out accuracy (chosen scored above rejected) and mean margin, measured as PPO reads rewards."""
    scorer = TokenScorer(classifier).eval()
    chosen = last_token_scores(scorer, [p["chosen_ids"] for p in pairs], pad_id, batch_size)
    rejected = last_token_scores(scorer, [p["rejected_ids"] for p in pairs], pad_id, batch_size)
    margin = chosen - rejected
    return {
        "pairwise_accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
        "num_pairs": len(pairs),
    }


def build_reward_datasets(config, tokenizer):
    """Train and held-out pairs from the first `num_samples` rows, plus the number dropped for length."""
    rows = load_rows(config.dataset, config.dataset_split, columns=("system", "question", "chosen", "rejected"))
    pairs, dropped = preference_pairs(rows[: config.num_samples], tokenizer, config.max_length)
    train, test = split_pairs(pairs, config.test_size, config.seed)
    return train, test, dropped


def load_reward_init(config):
    """Tokenizer (with a pad id distinct from EOS) and a 1-output classifier initialised from the policy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(config.policy_model, "policy-model")
    tokenizer = load_tokenizer(path, "policy-model")
    pad_id = distinct_pad_id(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model_config = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=pad_id)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=model_config, dtype=torch.float32)
    return tokenizer, model, path


def train_reward_model(config, resume_from: str | None = None) -> dict:
    """Train with `RewardTrainer`, save the (merged) model and tokenizer, return and write the summary."""
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import RewardConfig, RewardTrainer

    from smolppo.tracking import run_environment

    set_seed(config.seed)
    started = time.time()
    tokenizer, model, policy_path = load_reward_init(config)
    train, test, dropped = build_reward_datasets(config, tokenizer)
    peft_config = lora_config_for(config, model, "SEQ_CLS") if config.use_lora else None
    args = RewardConfig(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps or -1,
        logging_steps=config.logging_steps,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        seed=config.seed,
        report_to="none",
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    log_dir = os.path.join(config.output_dir, "logs")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(test),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[TensorBoardCallback(SummaryWriter(log_dir))],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    final = trainer.model
    if hasattr(final, "merge_and_unload"):
        final = final.merge_and_unload()
    final.config.pad_token_id = tokenizer.pad_token_id
    final.save_pretrained(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    metrics = pairwise_metrics(final.eval(), test, tokenizer.pad_token_id, config.per_device_eval_batch_size)
    writer = SummaryWriter(log_dir)
    for name, value in metrics.items():
        writer.add_scalar(f"heldout/{name}", value, trainer.state.global_step)
    writer.close()
    summary = {
        "status": "finished",
        "heldout": metrics,
        "train_pairs": len(train),
        "dropped_too_long": dropped,
        "steps": trainer.state.global_step,
        "policy_model": policy_path,
        "config": asdict(config),
        "wall_time_s": round(time.time() - started, 2),
        "environment": run_environment(),
        "train_loss": float(np.mean([e["loss"] for e in trainer.state.log_history if "loss" in e] or [float("nan")])),
    }
    with open(os.path.join(config.output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
