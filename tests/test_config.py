"""Config: defaults from the spec, CLI / YAML / preset precedence, derived values, rejected values."""

import pytest

from smolppo import smoke
from smolppo.cli import parse_config
from smolppo.configs import PPOConfig
from smolppo.errors import UserError


def parse(*args):
    return parse_config(PPOConfig, list(args), recipes="train_ppo")


def test_spec_defaults():
    cfg = parse()
    assert cfg.policy_model == "HuggingFaceTB/smollm2-135M-SFT-Only"
    assert cfg.reward_model.endswith("reward_model_orca_output/checkpoint-2160")
    assert (cfg.ppo_epochs, cfg.init_kl_coef, cfg.kl_target, cfg.gamma, cfg.lam) == (4, 0.05, 6.0, 1.0, 0.95)
    assert (cfg.temperature, cfg.per_device_train_batch_size) == (0.7, 4)
    assert not hasattr(cfg, "top_p")  # evaluation has its own; rollouts sample the full distribution
    assert (cfg.lora_r, cfg.lora_alpha, cfg.peak_learning_rate, cfg.num_train_epochs) == (16, 32, 5e-6, 3)
    assert cfg.gradient_checkpointing and not cfg.bf16 and not cfg.use_lora
    assert (cfg.num_samples, cfg.save_total_limit, cfg.output_dir) == (10_000, 1, "./ppo_training_output")
    assert cfg.accumulation_steps == cfg.mini_batch_size // cfg.per_device_train_batch_size == 4
    assert cfg.learning_rate is None and cfg.gradient_accumulation_steps is None  # derived values are not written back


def test_cli_flags_are_kebab_case():
    cfg = parse(
        *"--use-lora --policy-model /m --reward-model /r --dataset d.jsonl --output-dir /o --no-adaptive-kl".split(),
        *"--lora-target-modules q_proj v_proj".split(),
    )
    assert cfg.use_lora and not cfg.adaptive_kl
    assert (cfg.policy_model, cfg.reward_model, cfg.dataset, cfg.output_dir) == ("/m", "/r", "d.jsonl", "/o")
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_precedence_default_preset_yaml_cli(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_new_tokens: 20\nlearning_rate: 0.01\n")
    cfg = parse("--preset", "smoke", "--config", str(yaml_file), "--learning-rate", "0.02")
    assert cfg.policy_model == smoke.resolve("smoke:policy")  # preset (its smoke name resolved at parsing)
    assert cfg.max_new_tokens == 20  # YAML over preset
    assert cfg.peak_learning_rate == cfg.learning_rate == 0.02  # CLI over YAML
    assert cfg.ppo_epochs == 2


def test_schedule_is_derived_in_one_place():
    cfg = parse(
        *"--rollout-batch-size 8 --mini-batch-size 4 --per-device-train-batch-size 2 --num-train-epochs 3".split(),
        *"--warmup-ratio 0.1".split(),
    )
    sched = cfg.schedule(num_prompts=50, num_processes=2)
    assert sched.global_rollout_batch == 16
    assert sched.updates_per_epoch == 3
    assert sched.total_updates == 9
    assert sched.optimizer_steps_per_update == cfg.ppo_epochs * 2
    assert sched.planned_updates == 9 and sched.planned_optimizer_steps == 9 * cfg.ppo_epochs * 2
    assert sched.warmup_steps == 8  # ceil(0.1 x 72 optimizer steps): warm-up counts optimizer steps
    short = parse("--max-updates", "2").schedule(1000)
    assert short.total_updates == 2
    assert short.planned_updates == 3 * (1000 // 64)  # the LR schedule follows the plan, not max_updates


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning-rate", "0"], "learning_rate must be > 0"),
        (["--advantage-estimator", "ppo2"], "advantage_estimator must be one of gae, grpo, rloo, reinforce_pp"),
        (["--attn-implementation", "flash"], "attn_implementation must be one of auto, eager, sdpa"),
        (["--advantage-estimator", "grpo"], "set --samples-per-prompt to 2 or more"),
        (["--reward-model", "none"], "no --reward-funcs were given"),
        (["--reward-funcs", "r.py:f", "--reward-weights", "1"], "reward_weights has 1 values for 2 reward sources"),
        (["--reward-funcs", "rewards.py"], "must be 'file.py:function' or 'module:function'"),
        (["--advantage-estimator", "rloo", "--samples-per-prompt", "2", "--value-model", "x"], "has no value model"),
        (
            ["--rollout-batch-size", "10", "--samples-per-prompt", "3", "--mini-batch-size", "8"],
            "rollout_batch_size x samples_per_prompt (30) must be a multiple of mini_batch_size (8)",
        ),
        (["--rollout-top-p", "0.9"], "rollout_top_p=0.9 is refused"),
        (["--rollout-batch-size", "10", "--mini-batch-size", "4"], "must be a multiple of mini_batch_size"),
        (
            ["--rollout-batch-size", "12", "--mini-batch-size", "6", "--per-device-train-batch-size", "4"],
            "multiple of per_device_train_batch_size",
        ),
        (["--gradient-accumulation-steps", "3"], "gradient_accumulation_steps (3) must equal"),
        (["--kl-estimator", "k2"], "kl_estimator must be 'k1' or 'k3'"),
        (["--min-lr-ratio", "1"], "min_lr_ratio must be in [0, 1), got 1.0"),
        (["--lr-scheduler-type", "reduce_lr_on_plateau"], "'reduce_lr_on_plateau' cannot drive a training run's"),
        (["--lr-scheduler-type", "cosine_with_min_lr"], "(a floor under the decay: --min-lr-ratio); use one of"),
        (["--lr-scheduler-type", "cosin"], "lr_scheduler_type 'cosin' cannot drive a training run's schedule"),
        (["--kl-integral-gain", "-0.1"], "kl_integral_gain must be >= 0, got -0.1"),
        (["--ppo-epochs", "0"], "ppo_epochs must be a positive integer"),
        (["--preset", "huge"], "unknown preset 'huge'; choose one of ['full', 'lora', 'rtx5090_bf16', 'smoke']"),
    ],
)
def test_invalid_values_are_rejected_with_the_expectation(args, message):
    with pytest.raises(UserError) as info:
        parse(*args)
    assert message in str(info.value)


def test_unknown_yaml_key_is_rejected(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown keys \\['learning_rat'\\]"):
        parse("--config", str(yaml_file))


def test_too_few_prompts_for_one_batch():
    with pytest.raises(ValueError, match="fewer than one rollout batch"):
        parse().schedule(num_prompts=10)


def test_lora_gets_its_own_learning_rate_unless_one_is_given():
    assert parse().peak_learning_rate == 5e-6
    assert parse("--use-lora").peak_learning_rate == 5e-5  # 10x: adapters start at zero
    assert parse("--use-lora", "--learning-rate", "1e-4").peak_learning_rate == 1e-4  # explicit wins
    assert parse("--preset", "smoke").peak_learning_rate == 3e-3
    assert parse("--preset", "smoke", "--use-lora").peak_learning_rate == 1e-2  # its own (docs/ALGORITHM.md)
    assert parse("--use-lora").recorded()["learning_rate"] == 5e-5  # what runs record and resume compares


def test_kl_horizon_is_one_update_whatever_the_estimator_or_length_unless_set():
    schedule = parse().schedule(10_000)
    assert schedule.kl_horizon == 64  # one update's episodes: the coefficient moves at most 20% per update
    assert parse("--horizon", "10000").schedule(10_000).kl_horizon == 10_000
    grpo = parse("--advantage-estimator", "grpo", "--samples-per-prompt", "4").schedule(10_000)
    assert grpo.kl_horizon == grpo.episodes_per_update == 4 * 64
    assert parse("--preset", "smoke", "--max-updates", "4").schedule(95).kl_horizon == 16
    assert parse("--total-episodes", "1000").schedule(10_000).kl_horizon == 64


def test_trl_names_work_on_the_command_line_and_in_yaml(tmp_path):
    cfg = parse(
        *"--model_name_or_path /m --reward_model_path /r --dataset_name d.jsonl --dataset_train_split test".split(),
        *"--use_peft --num_ppo_epochs 2 --response_length 20 --kl_coef 0.1 --num_generations 2".split(),
        *"--advantage_estimator grpo".split(),
    )
    assert (cfg.policy_model, cfg.reward_model, cfg.dataset, cfg.dataset_split) == ("/m", "/r", "d.jsonl", "test")
    assert cfg.use_lora and (cfg.ppo_epochs, cfg.max_new_tokens, cfg.init_kl_coef, cfg.samples_per_prompt) == (
        2,
        20,
        0.1,
        2,
    )
    yaml_file = tmp_path / "trl.yaml"
    yaml_file.write_text("sft_model_path: /sft\nuse_peft: true\nnum_mini_batches: 8\ntotal_episodes: 1000\n")
    cfg = parse("--config", str(yaml_file), "--rollout-batch-size", "64")
    assert cfg.policy_model == "/sft" and cfg.use_lora
    assert cfg.effective_mini_batch_size == 8 and cfg.mini_batch_size == 16  # 64 sequences / 8; the field untouched
    assert cfg.recorded()["mini_batch_size"] == 8
    schedule = cfg.schedule(10_000)
    assert schedule.total_updates == 16  # ceil(1000 episodes / 64 per update), not 3 epochs


def test_trl_semantics_that_differ_are_fields_of_their_own():
    cfg = parse("--missing_eos_penalty", "1.5")
    assert cfg.missing_eos_penalty == 1.5 and cfg.missing_eos_score is None
    with pytest.raises(UserError, match="not both"):
        parse("--missing-eos-penalty", "1", "--missing-eos-score", "-1")
    with pytest.raises(UserError, match=r"num_mini_batches \(5\) must divide rollout_batch_size x samples_per_prompt"):
        parse("--num-mini-batches", "5")


def test_report_to_names_and_missing_packages_are_one_line():
    assert parse("--report_to", "none").report_to == ["none"]
    with pytest.raises(UserError, match="report_to must name some of tensorboard, wandb, trackio, none"):
        parse("--report-to", "mlflow")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match="report_to wandb needs the wandb package: pip install wandb"):
            parse("--report-to", "tensorboard", "wandb")


def test_smoke_with_trl_flags_runs_and_prints_its_schedule(tmp_path, smoke_cache, fresh_accelerator_state, caplog):
    import logging

    from tests.conftest import make_smoke_trainer

    caplog.set_level(logging.INFO, logger="smolppo.job.trainer")
    out = tmp_path / "run"
    make_smoke_trainer(out, "--use_peft", "--report_to", "tensorboard", "--max-updates", "2").train()
    assert (
        "gae: 2 updates (5 per epoch), 16 prompts x 1 samples = 16 episodes per update, 4 optimizer steps"
        in caplog.text
    )
    assert (out / "adapter_model.safetensors").is_file() and any((out / "logs").iterdir())


def test_help_lists_fields_by_section_with_trl_aliases():
    from smolppo.cli import config_parser

    text = config_parser(PPOConfig).format_help()
    sections = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[1:] == [group._argument_group_name for group in PPOConfig.GROUPS]  # one per group, in order
    assert sections[1:6] == ["presets", "model", "data", "rewards", "advantage estimator"]
    lora = text[text.index("\nLoRA:") : text.index("\nprecision and memory:")]
    assert "--use_peft" in lora and "--lora_r" in lora


def test_the_kl_controller_gets_its_gains_from_the_config():
    from smolppo.algorithm.ppo_math import PIDKLController, kl_controller

    controller = kl_controller(parse("--kl-integral-gain", "0.3").algorithm_settings().kl, horizon=8)
    assert isinstance(controller, PIDKLController) and (controller.ki, controller.kd) == (0.3, 1.0)
    assert kl_controller(parse().algorithm_settings().kl, horizon=8).ki == 0.6
