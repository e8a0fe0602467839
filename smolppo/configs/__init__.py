"""One configuration dataclass per script, composed from shared field groups, and the YAML recipes.

A recipe is a YAML file under ``recipes/<script>/``; ``--preset NAME`` applies ``recipes/<script>/NAME.yaml`` as
defaults (``--config FILE`` then YAML, then the command line override it).
"""

from __future__ import annotations

import os

from smolppo.configs.evaluate import EvalConfig
from smolppo.configs.parts import DEFAULT_DATASET, DEFAULT_NUM_SAMPLES, DEFAULT_POLICY_MODEL, DEFAULT_REWARD_MODEL
from smolppo.configs.plot import PlotConfig
from smolppo.configs.ppo import PPOConfig
from smolppo.configs.ppo_fields import ADVANTAGE_ESTIMATORS, KL_HORIZON_UPDATES
from smolppo.configs.reward import RewardModelConfig
from smolppo.configs.schedule import Schedule
from smolppo.paths import REPO_DIR

RECIPES_DIR = os.path.join(REPO_DIR, "recipes")

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DEFAULT_DATASET",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_POLICY_MODEL",
    "DEFAULT_REWARD_MODEL",
    "KL_HORIZON_UPDATES",
    "RECIPES_DIR",
    "EvalConfig",
    "PPOConfig",
    "PlotConfig",
    "RewardModelConfig",
    "Schedule",
    "available_recipes",
    "recipe_path",
]


def available_recipes(script: str) -> list[str]:
    """Recipe names for `script` (``train_ppo`` or ``train_reward_model``)."""
    folder = os.path.join(RECIPES_DIR, script)
    if not os.path.isdir(folder):
        return []
    return sorted(name[: -len(".yaml")] for name in os.listdir(folder) if name.endswith(".yaml"))


def recipe_path(script: str, name: str) -> str:
    return os.path.join(RECIPES_DIR, script, f"{name}.yaml")
