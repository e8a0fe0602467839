"""Train the reward model PPO needs: a 1-output sequence classifier on chosen/rejected pairs, with trl's RewardTrainer.

Offline smoke run (tiny local model, CPU, well under a minute):
    python train_reward_model.py --preset smoke

The real run (from the SFT model, on Intel/orca_dpo_pairs):
    python train_reward_model.py
    python train_reward_model.py --use-lora --bf16
    python train_ppo.py --reward-model ./reward_model_output

Every field of `smolppo.configs.RewardModelConfig` is a flag (see --help). Writes the model and tokenizer,
`logs/` (TensorBoard), `checkpoint-*` and `reward_model_summary.json` (held-out accuracy and margin) to
--output-dir.
"""

from __future__ import annotations

import logging

from smolppo.cli import parse_config, run_main
from smolppo.configs import RewardModelConfig
from smolppo.signals import signal_exit_code

logger = logging.getLogger("train_reward_model")


def main() -> int:
    config = parse_config(RewardModelConfig, recipes="train_reward_model")

    from accelerate import PartialState

    from smolppo.distributed import process_group
    from smolppo.rewards.training import SUMMARY_FILE, train_reward_model
    from smolppo.runs import output_dir
    from smolppo.runs.checkpointing import check_output_dir, latest_checkpoint

    state = PartialState(**process_group())  # one process, or one of several under `accelerate launch`

    resume_from = check_output_dir(
        config.output_dir, config.overwrite_output_dir, config.resume_from_checkpoint, SUMMARY_FILE
    )
    clear = config.overwrite_output_dir and not resume_from
    if clear:
        output_dir.check_overwrite(config.output_dir, {"policy-model": config.policy_model, "dataset": config.dataset})
    with output_dir.run_lock(config.output_dir, enabled=state.is_main_process):  # the run's lock, taken once
        if resume_from == "latest":
            resume_from = latest_checkpoint(config.output_dir)
        summary = train_reward_model(config, resume_from=resume_from, clear_output=clear)
        state.wait_for_everyone()  # the lock goes only when every process is done
    if summary["status"] == "interrupted":
        logger.warning(
            "stopped by %s after step %d; checkpoint saved. Resume with: python train_reward_model.py <same flags> "
            "--resume-from-checkpoint latest",
            summary["signal"],
            summary["steps"],
        )
        return signal_exit_code(summary["signal"])
    heldout = summary["heldout"]
    logger.info(
        "held-out pairwise accuracy %.3f, margin %+.3f on %d pairs; model in %s",
        heldout["pairwise_accuracy"],
        heldout["margin"],
        heldout["num_pairs"],
        config.output_dir,
    )
    return 0


def run() -> None:
    """The `smolppo-train-reward-model` command after `pip install -e .`: the same as this script."""
    run_main(main)


if __name__ == "__main__":
    run()
