"""The stages of `train_ppo.py` as helpers, so tests and the benchmark build exactly what the script builds."""

from __future__ import annotations

from smolppo.data import PromptSet, build_prompts, load_rows


def load_training_prompts(config, tokenizer) -> PromptSet:
    """The first `num_samples` rows of the dataset, rendered and filtered by length."""
    rows = load_rows(config.dataset, config.dataset_split)[: config.num_samples]
    return build_prompts(rows, tokenizer, config.max_prompt_length, source=config.dataset)


def build_ppo_trainer(config, accelerator=None):
    """Seed, load the four models and the prompts, and assemble a `PPOTrainer`."""
    from transformers import set_seed

    from smolppo.models import load_ppo_models
    from smolppo.trainer import PPOTrainer

    set_seed(config.seed)
    models = load_ppo_models(config)
    prompts = load_training_prompts(config, models.tokenizer)
    return PPOTrainer(
        config,
        models.tokenizer,
        models.policy,
        models.value_model,
        models.reward_model,
        prompts,
        ref_policy=models.ref_policy,
        accelerator=accelerator,
    )
