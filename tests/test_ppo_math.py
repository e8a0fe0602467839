"""The PPO formulas against tensors worked out by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from smolppo.algorithm import ppo_math


def test_gae_undiscounted_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = ppo_math.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: 1 - 0.7 = 0.3; t=1: (0.7 - 0.6) + 0.5*0.3 = 0.25; t=0: (0.6 - 0.5) + 0.5*0.25 = 0.225
    assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))


def test_gae_ignores_padding_and_bootstraps_zero_after_last_token():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = ppo_math.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.95)
    # t=1: 1 + 0.9*0 - 0.6 = 0.4; t=0: 0.9*0.6 - 0.5 + 0.9*0.95*0.4 = 0.382
    assert_close(adv, torch.tensor([[0.382, 0.4, 0.0]]))
    assert_close(ret, torch.tensor([[0.882, 1.0, 0.0]]))


def test_masked_whiten_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = ppo_math.masked_whiten(x, mask)
    # mean 2, unbiased variance 1 over {1, 2, 3}
    assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    kept_mean = ppo_math.masked_whiten(x, mask, shift_mean=False)
    assert_close(kept_mean, torch.tensor([[1.0, 2.0], [3.0, 0.0]]), atol=1e-6, rtol=0)


def test_masked_whiten_all_reduce_sees_global_statistics():
    x = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    other_rank = torch.tensor([3.0, 9.0, 1.0]).double()  # sum, sum of squares, count of {3}

    out = ppo_math.masked_whiten(x, mask, all_reduce=lambda stats: stats + other_rank)
    assert_close(out, torch.tensor([[-1.0, 0.0]]), atol=1e-6, rtol=0)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert_close(ppo_math.kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    expected_k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert_close(ppo_math.kl_penalty(logp, ref, "k3"), expected_k3)
    assert (ppo_math.kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        ppo_math.kl_penalty(logp, ref, "k2")


def test_token_rewards_put_score_on_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ppo_math.token_rewards(scores, kl, kl_coef=0.5, mask=mask)
    assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-0.25, -1.25, 0.0]]))


def _whole(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A batch's token mean, as the default loss type aggregates a mini-batch taken in one piece."""
    return ppo_math.aggregate(per_token, mask, "dapo", ppo_math.whole_batch_norm(mask))


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    terms = ppo_math.policy_terms(new, old, adv, mask, 0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5 (unclipped), 2.2 (inside the range)
    assert_close(_whole(terms.loss, mask), torch.tensor((-1.2 - 0.5 + 2.2) / 3))
    assert_close(_whole(terms.clipped, mask), torch.tensor(1 / 3))
    log_r = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    assert_close(_whole(0.5 * terms.log_ratio.pow(2), mask), 0.5 * log_r.pow(2).mean())


def test_clipped_policy_loss_gradient_vanishes_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    mask = torch.ones(1, 1)
    terms = ppo_math.policy_terms(new, torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2)
    _whole(terms.loss, mask).backward()
    assert new.grad.abs().item() == 0.0


def test_clipped_value_loss_hand_computed():
    mask = torch.ones(1, 2)
    loss, clipped = ppo_math.value_terms(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]), 0.2
    )
    assert_close(_whole(loss, mask), torch.tensor(0.5))
    assert_close(_whole(clipped, mask), torch.tensor(0.0))
    mask = torch.ones(1, 1)
    loss, clipped = ppo_math.value_terms(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), 0.2)
    assert_close(_whole(loss, mask), torch.tensor(0.5 * 1.8**2))
    assert_close(_whole(clipped, mask), torch.tensor(1.0))


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    assert_close(ppo_math.masked_mean(x, torch.tensor([[1.0, 1.0, 0.0]])), torch.tensor(2.0))


def test_entropy_of_uniform_distribution():
    assert_close(ppo_math.entropy_from_logits(torch.zeros(2, 8)), torch.full((2,), math.log(8)))


def test_adaptive_kl_controller_follows_ziegler():
    ctl = ppo_math.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl = ppo_math.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(5.4, n_steps=100)  # below target before it was ever reached: held (anti-windup)
    assert ctl.value == 0.1 and not ctl.engaged
    ctl.update(7.2, n_steps=100)  # reached: error +0.2
    assert ctl.engaged and ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(5.4, n_steps=100)  # error -0.1, now acted on
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    ctl.update(0.0, n_steps=100)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99 * 0.98)


def test_pi_kl_controller_hand_computed():
    ctl = ppo_math.PIDKLController(0.1, target=6.0, horizon=100, kp=0.5, ki=0.1, smoothing=0.5, bound=10.0)
    ctl.update(3.0, n_steps=100)  # below the target, never reached: held; the smoothed KL starts at 3
    assert ctl.value == 0.1 and not ctl.engaged and ctl.smoothed_kl == 3.0
    ctl.update(21.0, n_steps=100)  # smoothed 0.5*3 + 0.5*21 = 12: e = log 2; I = 0.1 log 2
    e = math.log(2.0)
    assert ctl.engaged and ctl.smoothed_kl == 12.0
    assert ctl.value == pytest.approx(0.1 * math.exp(0.5 * e + 0.1 * e))
    ctl.update(0.0, n_steps=100)  # smoothed 6: e = 0, the proportional part lets go at once, the integral stays
    assert ctl.value == pytest.approx(0.1 * math.exp(0.1 * e))
    ctl.update(0.0, n_steps=100)  # smoothed 3: e = -log 2
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.5 * e + 0.1 * e - 0.1 * e))


def test_pi_kl_controller_is_bounded_without_windup():
    ctl = ppo_math.PIDKLController(0.1, target=1.0, horizon=1, kp=0.5, ki=1.0, smoothing=0.0, bound=4.0)
    for _ in range(20):  # a long overshoot: e clipped at 1, the integral alone would reach 20
        ctl.update(100.0, n_steps=1)
    assert ctl.value == pytest.approx(0.4)  # at the bound, 4x the initial coefficient
    assert ctl.integral == pytest.approx(math.log(4.0) - 0.5)  # held where the output meets the bound
    ctl.update(1.0 / math.e, n_steps=1)  # back under the target: e = -1, it leaves the bound at once
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.5 + math.log(4.0) - 0.5 - 1.0))
    restored = ppo_math.PIDKLController(0.1, target=1.0, horizon=1, kp=0.5, ki=1.0, smoothing=0.0, bound=4.0)
    restored.load_state_dict(ctl.state_dict())
    ctl.update(2.0, n_steps=1), restored.update(2.0, n_steps=1)
    assert restored.value == ctl.value


def test_pid_kl_controller_acts_on_the_trend():
    pi = ppo_math.PIDKLController(0.1, target=4.0, horizon=1, kp=0.5, ki=0.0, kd=0.0, smoothing=0.0)
    pid = ppo_math.PIDKLController(0.1, target=4.0, horizon=1, kp=0.5, ki=0.0, kd=1.0, smoothing=0.0)
    for kl in (4.0, 8.0):  # the KL doubles in one update
        pi.update(kl, 1), pid.update(kl, 1)
    assert pid.value == pytest.approx(pi.value * math.exp(math.log(2.0)))  # the rise itself adds log 2


def test_fixed_kl_controller_never_moves():
    ctl = ppo_math.FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_discounted_returns_hand_computed_and_masked():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    returns = ppo_math.discounted_returns(rewards, mask, gamma=0.5)
    # row 0: t2 = 2; t1 = 0 + 0.5*2 = 1; t0 = 1 + 0.5*1 = 1.5.  row 1 (7 is padding): t1 = 3; t0 = 0.5 + 1.5 = 2
    assert_close(returns, torch.tensor([[1.5, 1.0, 2.0], [2.0, 3.0, 0.0]]))


def test_grpo_normalises_within_each_group():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0])  # two groups of two
    adv = ppo_math.group_advantages(scores, 2, "grpo")
    # group 1: mean 2, unbiased std sqrt(2); group 2: all equal -> 0
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (math.sqrt(2.0) + 1e-4)
    assert_close(adv, expected)
    assert_close(ppo_math.group_advantages(scores, 2, "grpo", scale=False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_rloo_baseline_leaves_each_response_out():
    scores = torch.tensor([1.0, 2.0, 6.0])
    adv = ppo_math.group_advantages(scores, 3, "rloo")
    # 1 - mean(2, 6) = -3; 2 - mean(1, 6) = -1.5; 6 - mean(1, 2) = 4.5
    assert_close(adv, torch.tensor([-3.0, -1.5, 4.5]))


def test_group_advantages_refuse_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="cannot form groups of 2"):
        ppo_math.group_advantages(torch.zeros(3), 2, "grpo")


def test_pid_controller_goes_on_from_another_controllers_coefficient():
    """Resuming an adaptive run under pid (--allow-config-change): the coefficient continues where it was (the
    integral takes log(coef / init)), not back at the initial one."""
    adaptive = ppo_math.AdaptiveKLController(0.05, target=6.0, horizon=8)
    adaptive.value = 0.2
    pid = ppo_math.PIDKLController(0.05, target=6.0, horizon=8, kd=1.0)
    pid.load_state_dict(adaptive.state_dict())
    assert pid.integral == pytest.approx(math.log(4.0)) and pid.value == pytest.approx(0.2)
    pid.update(6.0, 8)  # at the target, no trend: the coefficient stays
    assert pid.value == pytest.approx(0.2)
