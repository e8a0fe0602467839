"""The configuration of every script, in one place for reading; each class lives in `smolppo.configs`.

* `PPOConfig` - `train_ppo.py` (PPO and the other advantage estimators);
* `RewardModelConfig` - `train_reward_model.py`;
* `EvalConfig` - `evaluate_generations.py`;
* `PlotConfig` - `plot_training_progress.py`.

Every field is a ``--kebab-case`` flag (booleans that default to on have a ``--no-`` form) and a key of a YAML
file passed with ``--config``. Presets are YAML recipes under ``recipes/<script>/`` (``--preset smoke``).
Precedence, lowest first: field default < preset < YAML file < command line.
"""

from smolppo.configs import (  # noqa: F401 - re-exported for `from config import PPOConfig`
    DEFAULT_DATASET,
    DEFAULT_POLICY_MODEL,
    DEFAULT_REWARD_MODEL,
    EvalConfig,
    PlotConfig,
    PPOConfig,
    RewardModelConfig,
    Schedule,
)
