"""The stages of `train_ppo.py` as helpers, so tests and the benchmark build exactly what the script builds."""

from __future__ import annotations

from smolppo.data import PromptSet, build_prompts, load_rows

PAIR_COLUMNS = ("chosen", "rejected")


def load_training_prompts(config, tokenizer, rows: list[dict] | None = None) -> PromptSet:
    """The first `num_samples` rows of the dataset, rendered and filtered by length."""
    rows = load_rows(config.dataset, config.dataset_split) if rows is None else rows
    return build_prompts(rows[: config.num_samples], tokenizer, config.max_prompt_length, source=config.dataset)


def held_out_pairs(config, rows: list[dict]) -> list[dict]:
    """Up to `reward_check_pairs` rows after the training rows that have chosen and rejected answers."""
    if not config.reward_check_pairs or not rows or any(c not in rows[0] for c in PAIR_COLUMNS):
        return []
    held_out = [r for r in rows[config.num_samples :] if r.get("question") and r.get("chosen") and r.get("rejected")]
    return held_out[: config.reward_check_pairs]


def build_ppo_trainer(config, accelerator=None):
    """Seed, load the models and the prompts, check the reward model, and assemble a `PPOTrainer`."""
    from transformers import set_seed

    from smolppo.models import load_ppo_models
    from smolppo.rewards import check_reward_model
    from smolppo.trainer import PPOTrainer

    set_seed(config.seed)
    models = load_ppo_models(config)
    rows = load_rows(config.dataset, config.dataset_split)
    prompts = load_training_prompts(config, models.tokenizer, rows)
    reward_check = None
    if config.reward_check_pairs:
        reward_check = check_reward_model(models.reward, held_out_pairs(config, rows), config.min_reward_accuracy)
    return PPOTrainer(
        config,
        models.tokenizer,
        models.policy,
        models.value_model,
        models.reward,
        prompts,
        ref_policy=models.ref_policy,
        accelerator=accelerator,
        reward_check=reward_check,
    )
