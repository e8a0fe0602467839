"""The algorithm's switches wired as they say, on the smoke models in-process: `--missing-eos-score`,
`--whiten-rewards` and `--kl-in-loss` under GAE (the formulas themselves are tested by hand in test_ppo_math.py),
and the algorithm's own state across a save and a load."""

import pytest
import torch
from torch.testing import assert_close

from smolppo.algorithm import ppo_math
from tests.conftest import make_smoke_trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def _experience(trainer):
    return trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))


def test_missing_eos_score_replaces_the_reward_of_responses_that_never_end(tmp_path):
    trainer = make_smoke_trainer(tmp_path, "--missing-eos-score", "-7.5", "--max-new-tokens", "3")
    algo = trainer.algorithm
    indices = trainer.sampler.indices(0)
    rollout = algo.rollout([trainer.prompts.input_ids[i] for i in indices])
    scores, parts = algo.rewards(rollout, trainer.prompts, indices)
    ended = rollout.ended_with_eos
    assert (~ended).sum() > 0, "3 tokens should leave some responses unfinished"
    assert_close(scores[~ended], torch.full_like(scores[~ended], -7.5))
    assert_close(scores[ended], parts["reward_model"][ended].to(scores.dtype))  # finished ones keep their reward


def test_whitened_rewards_feed_gae(tmp_path):
    trainer = make_smoke_trainer(tmp_path, "--whiten-rewards")
    exp = _experience(trainer)
    mask, cfg = exp.rollout.response_mask, trainer.config
    kl_coef = trainer.algorithm.kl_status()["kl_coef"]
    rewards = ppo_math.token_rewards(exp.scores, exp.kl, kl_coef, mask)
    whitened = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
    raw, returns = ppo_math.gae_advantages(whitened, exp.old_values, mask, cfg.gamma, cfg.lam)
    assert_close(exp.unwhitened_advantages, raw)
    assert_close(exp.returns, returns)
    unwhitened, _ = ppo_math.gae_advantages(rewards, exp.old_values, mask, cfg.gamma, cfg.lam)
    assert not torch.allclose(exp.unwhitened_advantages, unwhitened)  # the switch changed something


def test_gae_with_the_kl_in_the_loss(tmp_path):
    trainer = make_smoke_trainer(tmp_path, "--kl-in-loss")
    algo = trainer.algorithm
    exp = _experience(trainer)
    mask, cfg = exp.rollout.response_mask, trainer.config
    # No KL penalty in the rewards: GAE sees the score alone, at the last real token.
    raw, _ = ppo_math.gae_advantages(
        ppo_math.token_rewards(exp.scores, exp.kl, 0.0, mask), exp.old_values, mask, cfg.gamma, cfg.lam
    )
    assert_close(exp.unwhitened_advantages, raw)
    # The loss: clipped surrogate + vf_coef x value loss + kl_coef x k3 KL to the reference.
    parts = algo.micro_batch_loss(exp.select(torch.arange(4)).trimmed())
    assert parts.value_loss is not None and parts.kl_loss is not None and parts.kl_loss.item() >= 0.0
    expected = parts.policy_stats.loss + cfg.vf_coef * parts.value_loss + algo.kl_status()["kl_coef"] * parts.kl_loss
    assert_close(parts.loss, expected)
    assert "loss/kl" in trainer.step()


def test_algorithm_saves_and_loads_itself(tmp_path):
    """`Algorithm.save` writes what resuming needs (weights, AdamW moments, schedule, KL controller); `load` into
    another algorithm brings it back exactly."""
    trainer = make_smoke_trainer(tmp_path / "a", "--max-updates", "3")
    for _ in range(2):
        trainer.step()
    saved_dir = tmp_path / "saved"
    saved_dir.mkdir()
    holds = trainer.algorithm.save(str(saved_dir))
    assert holds == {"checkpoint_format": 2, "optimizer_state": True}
    other = make_smoke_trainer(tmp_path / "b", "--max-updates", "3")
    assert other.algorithm.lr_scheduler.state_dict() != trainer.algorithm.lr_scheduler.state_dict()
    other.algorithm.load(str(saved_dir))
    assert other.algorithm.kl_controller.state_dict() == trainer.algorithm.kl_controller.state_dict()
    assert other.algorithm.lr_scheduler.state_dict() == trainer.algorithm.lr_scheduler.state_dict()
    mine, theirs = trainer.algorithm.optimizer.state_dict(), other.algorithm.optimizer.state_dict()
    for key, value in mine["state"].items():
        assert_close(theirs["state"][key]["exp_avg"], value["exp_avg"])
    for a, b in zip(trainer.algorithm.policy.parameters(), other.algorithm.policy.parameters()):
        assert_close(a, b)
