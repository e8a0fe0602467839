"""The algorithm's switches wired as they say, on the smoke models in-process: `--missing-eos-score`,
`--whiten-rewards` and `--kl-in-loss` under GAE (the formulas themselves are tested by hand in test_ppo_math.py),
and the algorithm's own state across a save and a load."""

import pytest
import torch
from torch.testing import assert_close

from tests.conftest import make_smoke_trainer, reset_accelerate_state

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


def _token_rewards_seen_by_gae(exp) -> torch.Tensor:
    """With gamma = lam = 1 the returns are reward-to-go, so the per-token rewards GAE saw are their differences."""
    returns, mask = exp.returns, exp.rollout.response_mask
    following = torch.cat([returns[:, 1:], torch.zeros_like(returns[:, :1])], dim=1) * mask
    return (returns - following) * mask


def test_whitened_rewards_feed_gae(tmp_path):
    """GAE sees per-token rewards scaled to unit variance over the batch's real tokens, their mean kept."""
    plain = make_smoke_trainer(tmp_path / "plain", "--gamma", "1", "--lam", "1")
    raw = _token_rewards_seen_by_gae(_experience(plain))
    reset_accelerate_state()
    trainer = make_smoke_trainer(tmp_path / "whitened", "--whiten-rewards", "--gamma", "1", "--lam", "1")
    exp = _experience(trainer)
    mask = exp.rollout.response_mask.bool()
    seen = _token_rewards_seen_by_gae(exp)[mask].double()
    assert seen.var().item() == pytest.approx(1.0, rel=1e-3)  # unbiased variance of the real tokens' rewards
    assert seen.mean().item() == pytest.approx(raw[mask].double().mean().item(), abs=1e-5)  # the mean is kept
    assert not torch.allclose(seen, raw[mask].double())  # the same rollout (same seed), other rewards


def test_gae_with_the_kl_in_the_loss(tmp_path):
    """No KL penalty in the rewards: every real token's return is its response's score. The loss's KL term is the
    k3 estimate, 0 (to rounding) while the policy is the reference, positive once it has moved."""
    trainer = make_smoke_trainer(tmp_path, "--kl-in-loss", "--gamma", "1", "--lam", "1")
    algo = trainer.algorithm
    exp = _experience(trainer)
    mask = exp.rollout.response_mask
    assert_close(exp.returns, exp.scores[:, None].to(exp.returns.dtype).expand_as(mask) * mask)
    parts = algo.micro_batch_loss(exp.select(torch.arange(4)).trimmed())
    assert parts.value_loss is not None and 0.0 <= parts.kl_loss.item() < 1e-6  # 0 up to rounding
    assert "loss/kl" in trainer.step()
    moved = algo.micro_batch_loss(_experience(trainer).select(torch.arange(4)).trimmed())
    assert moved.kl_loss.item() > 0.0


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
