"""Training the reward model with `trl`'s `RewardTrainer`, and measuring it the way PPO will read it.

Each pair is tokenised by `smolppo.rewards.reader.RewardReader.render`: the conversation (system, question, answer)
through the chat template (``--reward-template``), exactly as `RewardTrainer` renders conversational data, so
the trained model is read by PPO and evaluation with the code that made its training data. The model keeps the
tokenizer's pad id (SmolLM2: pad == EOS): its own pooling, used in training and when reading it, then scores the
last token that is not padding (the newline after the final ``<|im_end|>`` in ChatML).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch

from smolppo import files
from smolppo.data import PAIR_COLUMNS, load_rows, row_conversation
from smolppo.errors import UserError
from smolppo.files import REWARD_SUMMARY_FILE
from smolppo.models import load_tokenizer, lora_config_for, resolve_model_path
from smolppo.rewards.reader import PLAIN, RewardReader, pairwise_check
from smolppo.runs import output_dir
from smolppo.signals import GracefulStop

logger = logging.getLogger(__name__)

SUMMARY_FILE = REWARD_SUMMARY_FILE


def split_pairs(pairs: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then hold out ``test_size`` of the pairs (at least one)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(test_size * len(pairs)))
    if held_out >= len(pairs):
        raise UserError(f"only {len(pairs)} usable pairs: too few to hold out a test split; use more data")
    return [pairs[i] for i in order[held_out:]], [pairs[i] for i in order[:held_out]]


def tokenise_pairs(rows: list[dict], reader: RewardReader, max_length: int) -> tuple[list[dict], int]:
    """``chosen_ids``/``rejected_ids`` of each row as the reward model will read them; returns ``(pairs, number
    dropped for exceeding max_length)``. Each pair keeps its row for the held-out metrics."""
    pairs, dropped = [], 0
    for row in rows:
        system, question = row_conversation(row)
        chosen = reader.render(system, question, str(row["chosen"]))
        rejected = reader.render(system, question, str(row["rejected"]))
        if max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected, "row": row})
    if dropped:
        logger.info("dropped %d of %d pairs longer than %d tokens", dropped, len(rows), max_length)
    if not pairs:
        raise UserError(f"no preference pair fits max_length={max_length} tokens; raise --max-length")
    return pairs, dropped


def build_reward_datasets(config, reader: RewardReader):
    """Train and held-out pairs from the first `num_samples` rows, plus the number dropped for length."""
    rows = load_rows(config.dataset, config.dataset_split, columns=PAIR_COLUMNS)
    pairs, dropped = tokenise_pairs(rows[: config.num_samples], reader, config.max_length)
    train, test = split_pairs(pairs, config.test_size, config.seed)
    return train, test, dropped


def load_reward_init(config):
    """Tokenizer and a 1-output classifier initialised from the policy (pad id = the tokenizer's)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(config.policy_model, "policy-model")
    tokenizer = load_tokenizer(path, "policy-model")
    model_config = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=model_config, dtype=torch.float32)
    return tokenizer, model, path


class StopOnSignal:
    """A `TrainerCallback`: Ctrl-C / SIGTERM (Ctrl-Break on Windows) finishes the current step, saves a
    checkpoint and stops training; a second signal stops at once."""

    def __init__(self):
        self._stop = GracefulStop("saving a checkpoint after this step, then stopping")

    @property
    def signal_name(self) -> str | None:
        return self._stop.signal_name

    def on_train_begin(self, args, state, control, **kwargs):
        self._stop.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._stop.restore()

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def checkpointing_arguments(arguments_class, enabled: bool) -> dict:
    """Activation checkpointing for a `TrainingArguments` class under the name its transformers version has
    (5.20 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; vLLM's CPU build pins 5.19)."""
    names = {f.name for f in dataclasses.fields(arguments_class)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}


def train_reward_model(config, resume_from: str | None = None, clear_output: bool = False) -> dict:
    """Train with `RewardTrainer`, save the (merged) model and tokenizer, return and write the summary.

    With `clear_output` (``--overwrite-output-dir``), the previous run's files are removed only once the model
    and data have loaded."""
    from accelerate import PartialState
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import RewardConfig, RewardTrainer

    from smolppo.distributed import ddp_backend
    from smolppo.tracking import run_environment

    main_process = PartialState().is_main_process  # under several processes, only the main one writes our files
    set_seed(config.seed)
    started = time.time()
    tokenizer, model, policy_path = load_reward_init(config)
    reader = RewardReader(model, tokenizer, config.reward_template, config.per_device_eval_batch_size, policy_path)
    train, test, dropped = build_reward_datasets(config, reader)
    if clear_output and main_process:
        output_dir.clear(config.output_dir)
    PartialState().wait_for_everyone()
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
        **checkpointing_arguments(RewardConfig, config.gradient_checkpointing),
        max_length=None,  # pairs over config.max_length were dropped (and counted) by tokenise_pairs: trl's second
        # filter pass over the same lengths would do nothing, and under load it once sat for minutes
        center_rewards_coefficient=config.center_rewards_coefficient,
        seed=config.seed,
        report_to=[n for n in config.report_to if n in ("wandb", "trackio")] or "none",  # TensorBoard: our callback
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=ddp_backend(),
    )
    log_dir = os.path.join(config.output_dir, files.LOGS_DIR)
    stopper = StopOnSignal()
    wants_tensorboard = "tensorboard" in config.report_to and main_process
    tensorboard = [TensorBoardCallback(SummaryWriter(log_dir))] if wants_tensorboard else []
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([_ids_only(p) for p in train]),
        eval_dataset=Dataset.from_list([_ids_only(p) for p in test]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[*tensorboard, stopper],
    )
    card = os.path.join(config.output_dir, "README.md")
    card_existed = os.path.exists(card)
    trainer.train(resume_from_checkpoint=resume_from)
    if not card_existed and os.path.isfile(card) and main_process:
        output_dir.record(config.output_dir, ["README.md"])  # the model card RewardTrainer writes on save
    if stopper.signal_name:
        return {"status": "interrupted", "signal": stopper.signal_name, "steps": trainer.state.global_step}
    final = trainer.model
    if hasattr(final, "merge_and_unload"):
        final = final.merge_and_unload()
    if reader.template is not None:
        tokenizer.chat_template = reader.template  # a custom template becomes the one "chat" reads back
    if main_process:
        with output_dir.publishing(config.output_dir) as staging:
            final.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    final_reader = RewardReader(final.eval(), tokenizer, config.reward_template, config.per_device_eval_batch_size)
    metrics = asdict(pairwise_check(final_reader, [p["row"] for p in test]))
    if not main_process:  # the same model on every process: the main one writes the summary
        return {"status": "finished", "heldout": metrics, "steps": trainer.state.global_step}
    if "tensorboard" in config.report_to:
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
        "reward_template": PLAIN if reader.template is None else "chat",  # custom templates are saved as the chat one
        "config": asdict(config),
        "wall_time_s": round(time.time() - started, 2),
        "environment": run_environment(),
        "train_loss": float(np.mean([e["loss"] for e in trainer.state.log_history if "loss" in e] or [float("nan")])),
    }
    output_dir.write_json_atomically(os.path.join(config.output_dir, SUMMARY_FILE), summary)
    return summary


def _ids_only(pair: dict) -> dict:
    return {"chosen_ids": pair["chosen_ids"], "rejected_ids": pair["rejected_ids"]}
