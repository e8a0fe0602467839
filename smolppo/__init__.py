"""smolppo: PPO, GRPO, RLOO and REINFORCE++ for small causal language models (the scripts at the repository root are
the front door; README.md says how to run them)."""

import os

# Importing trl (smolppo does: its argument parser, its RewardTrainer) sets vLLM's log level to ERROR where vLLM is
# installed, which would hide vLLM's warnings, a layer's weights failing to load at a push among them. vLLM logs its
# warnings unless the user chose a level; this runs before any smolppo module imports trl.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
