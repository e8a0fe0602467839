"""The advantage estimators other than GAE, on the smoke task: they learn, they carry no value model anywhere
(memory, metrics, files, checkpoints), and the KL can move from the reward into the loss."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tests.conftest import make_smoke_trainer, run_script

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")
make_trainer = make_smoke_trainer


@pytest.mark.parametrize(
    "estimator, prompts, min_gain",
    [
        ("grpo", 8, 0.4),  # 8 prompts x 4 samples per update: gains 1.23 / 1.45 / 0.82 measured (seeds 42 / 1 / 2)
        pytest.param("rloo", 16, 0.15, marks=pytest.mark.soak),  # CI runs these right after the README command
        pytest.param("reinforce_pp", 16, 0.5, marks=pytest.mark.soak),
    ],
)
def test_estimator_learns_without_a_value_model(tmp_path, estimator, prompts, min_gain):
    trainer = make_trainer(
        tmp_path,
        "--advantage-estimator",
        estimator,
        "--samples-per-prompt",
        "4",
        "--rollout-batch-size",
        str(prompts),
        "--max-updates",
        "40",
    )
    assert trainer.algorithm.value_scorer is None
    assert all(n.startswith("policy.") for n, _ in trainer.algorithm.model.named_parameters())
    history = [trainer.step() for _ in range(trainer.schedule.total_updates)]
    rewards = np.array([m["rewards/mean"] for m in history])
    assert rewards[-8:].mean() > rewards[:8].mean() + min_gain, rewards.round(2)
    assert "loss/value" not in history[-1] and "value/mean" not in history[-1]
    assert history[-1]["episodes"] == 40 * prompts * 4
    assert all(np.isfinite(m["kl_divergence"]) for m in history)


def test_group_advantages_are_shared_by_each_prompts_samples(tmp_path):
    trainer = make_trainer(tmp_path, "--advantage-estimator", "grpo", "--samples-per-prompt", "4", "--kl-in-loss")
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
    rollout = exp.rollout
    prompts = rollout.input_ids[:, : rollout.context_length]
    assert all(torch.equal(prompts[i], prompts[i - i % 4]) for i in range(len(rollout)))  # 4 in a row per prompt
    # KL in the loss: no penalty in the advantages, every token of a response carries its group-normalised score
    group = exp.scores.view(-1, 4)
    expected = ((group - group.mean(1, keepdim=True)) / (group.std(1, keepdim=True) + 1e-4)).reshape(-1)
    mask = rollout.response_mask
    assert_close(exp.advantages, expected[:, None] * mask)
    parts = trainer.algorithm.micro_batch_loss(exp.select(torch.arange(4)).trimmed())
    assert parts.value_loss is None and parts.kl_loss is not None and parts.kl_loss.item() >= 0.0  # k3 is non-negative
    assert_close(parts.loss, parts.policy_stats.loss + trainer.algorithm.kl_status()["kl_coef"] * parts.kl_loss)
    metrics = trainer.step()
    assert "loss/kl" in metrics


@pytest.mark.soak  # CI runs it after the README command
def test_reward_function_alone_trains_and_is_logged(tmp_path):
    trainer = make_trainer(
        tmp_path,
        *"--reward-model none --reward-funcs examples/reward_functions.py:readable_text --reward-weights 10".split(),
    )
    assert trainer.reward.reader is None and trainer.algorithm.reward.reader is None and trainer.reward_check is None
    summary = trainer.train()
    from smolppo.evaluation.plotting import read_scalars

    scalars = read_scalars({"run": str(tmp_path / "logs")})
    readable = scalars[scalars.tag == "rewards/readable_text"].sort_values("step").value.to_numpy()
    assert len(readable) == 40
    assert readable[-8:].mean() > readable[:8].mean() + 0.05, readable.round(3)
    assert summary["reward_sources"] == [{"name": "readable_text", "weight": 10.0}]
    assert summary["resolved_paths"]["reward_model"] is None and summary["reward_model_check"] is None


@pytest.mark.soak  # CI runs it after the README command
def test_grpo_run_writes_and_resumes_without_a_value_model(tmp_path, smoke_cache):
    out = tmp_path / "grpo"
    flags = ["--advantage-estimator", "grpo", "--samples-per-prompt", "2", "--save-steps", "2"]
    make_trainer(out, *flags, "--max-updates", "2").train()
    assert not (out / "value_model").exists() and not (out / "checkpoint-2" / "value_model").exists()
    assert (out / "model.safetensors").is_file()
    resumed = run_script(
        "train_ppo.py",
        "--preset",
        "smoke",
        "--output-dir",
        str(out),
        *flags,
        "--max-updates",
        "4",
        "--resume-from-checkpoint",
        "latest",
        "--allow-config-change",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["updates"] == 4 and summary["status"] == "finished"
    assert summary["config"]["advantage_estimator"] == "grpo"
    assert not (out / "value_model").exists()


def test_evaluation_scores_a_function_only_run_with_its_functions(tmp_path):
    from examples.reward_functions import readable_text
    from smolppo.configs import EvalConfig
    from smolppo.evaluation.evaluate import evaluate

    function = ["--reward-funcs", "examples/reward_functions.py:readable_text", "--reward-weights", "10"]
    trainer = make_trainer(tmp_path, "--reward-model", "none", *function, "--max-updates", "1")
    trainer.train()
    report = evaluate(
        EvalConfig(
            model_path=[str(tmp_path)],
            num_prompts=3,
            num_completions=2,
            bootstrap_samples=50,
            max_new_tokens=8,
            device="cpu",
        )
    )
    settings = report["settings"]
    assert settings["resolved_reward_model"] is None
    assert settings["reward_sources"] == [{"name": "readable_text", "weight": 10.0}]
    completions = report["models"][0]["completions"]
    assert len(completions) == 6
    for c in completions:
        assert abs(c["reward"] - 10 * readable_text([c["text"]])[0]) < 1e-5


def test_grpo_penalty_is_weighed_against_the_group_relative_score(tmp_path):
    """grpo adds the KL penalty to group-normalised scores: the penalty-to-score figure (and the run summary's
    warning) compares it with their spread, not the raw score's (a reward model of small margins would otherwise
    warn at once)."""
    from smolppo.algorithm import ppo_math

    trainer = make_trainer(tmp_path, "--advantage-estimator", "grpo", "--samples-per-prompt", "4")
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
    exp.kl = exp.kl + 0.5 * exp.rollout.response_mask  # some KL to weigh
    stats = dict.fromkeys(("loss", "learning_rate", "policy_loss", "clip_fraction", "approx_kl", "entropy"), 0.0)
    metrics = trainer.algorithm.metrics(exp, {**stats, "first_ratio_deviation": 0.0})
    penalty = trainer.algorithm.kl_status()["kl_coef"] * exp.kl.sum(1).mean()
    relative = ppo_math.group_advantages(exp.scores, 4, "grpo", scale=True)
    assert metrics["objective/kl_penalty_to_score"] == pytest.approx(float(penalty / relative.std()), rel=1e-5)
    exp.scores = exp.scores * 0.1  # a reward model of ten times smaller margins: grpo learns the same from it
    shrunk = trainer.algorithm.metrics(exp, {**stats, "first_ratio_deviation": 0.0})
    assert shrunk["objective/kl_penalty_to_score"] == pytest.approx(metrics["objective/kl_penalty_to_score"], rel=1e-2)


def test_the_penalty_ratio_is_undefined_when_no_group_has_spread(tmp_path):
    """Measured on the real task under grpo: every response of both groups alike, the group-relative score all
    zeros, and the ratio over a clamped spread of 1e-6 read 691,878 in the log, the progress bar and the window that
    the end-of-run report averages. No spread: the ratio is nan (shown as n/a), and the report's windows skip it."""
    import math

    from smolppo.algorithm import ppo_math
    from smolppo.job.trainer import _fixed

    trainer = make_trainer(tmp_path, "--advantage-estimator", "grpo", "--samples-per-prompt", "4")
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
    exp.kl = exp.kl + 0.5 * exp.rollout.response_mask
    exp.scores = torch.arange(len(exp.scores), device=exp.scores.device).div(4, rounding_mode="floor").float()
    assert ppo_math.group_advantages(exp.scores, 4, "grpo", scale=True).abs().max().item() == 0.0
    stats = dict.fromkeys(("loss", "learning_rate", "policy_loss", "clip_fraction", "approx_kl", "entropy"), 0.0)
    metrics = trainer.algorithm.metrics(exp, {**stats, "first_ratio_deviation": 0.0})
    assert math.isnan(metrics["objective/kl_penalty_to_score"])
    assert _fixed(metrics["objective/kl_penalty_to_score"], 2) == "n/a" and _fixed(-0.001, 2) == "0.00"
    assert metrics["objective/non_score_reward"] < 0.0  # the penalty itself is still logged
