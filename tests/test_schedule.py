"""The learning-rate schedule: transformers' rules, warm-started, with an optional floor under the decay."""

import math

import pytest
import torch
from transformers import get_scheduler

from smolppo.algorithm.optim import apply_configured_learning_rate, current_learning_rate, warm_started_scheduler
from smolppo.errors import UserError


def _rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(current_learning_rate(optimizer))
        optimizer.step()
        scheduler.step()
    return rates


def _optimizer(lr: float = 1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, device="cpu"))], lr=lr)


def test_linear_decay_with_a_floor_matches_hand_computed_rates():
    optimizer = _optimizer()
    scheduler = warm_started_scheduler("linear", optimizer, warmup_steps=0, total_steps=4, min_lr_ratio=0.5)
    # linear over 5 scheduler steps (total + 1): factor 1 - s/5, lifted to 0.5 + 0.5 * (1 - s/5)
    assert _rates(scheduler, optimizer, 5) == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])


def test_warm_up_is_untouched_and_cosine_with_a_floor_is_transformers_cosine_with_min_lr():
    ours_optimizer, theirs_optimizer = _optimizer(2e-5), _optimizer(2e-5)
    ours = warm_started_scheduler("cosine", ours_optimizer, warmup_steps=3, total_steps=12, min_lr_ratio=0.3)
    theirs = get_scheduler(
        "cosine_with_min_lr",
        theirs_optimizer,
        num_warmup_steps=3,
        num_training_steps=13,
        scheduler_specific_kwargs={"min_lr_rate": 0.3},
    )
    theirs_optimizer.step()
    theirs.step()  # the same warm start: the first step trains at 1/3 of the peak
    ours_rates, theirs_rates = _rates(ours, ours_optimizer, 13), _rates(theirs, theirs_optimizer, 13)
    torch.testing.assert_close(torch.tensor(ours_rates), torch.tensor(theirs_rates), rtol=1e-6, atol=0.0)
    assert ours_rates[:3] == pytest.approx([2e-5 / 3, 2 * 2e-5 / 3, 2e-5])  # the warm-up ramps from above 0
    assert min(ours_rates) > 0.3 * 2e-5 - 1e-12 and ours_rates[-1] == pytest.approx(0.3 * 2e-5, rel=0.02)


def test_no_floor_leaves_transformers_schedule_as_it_is():
    ours_optimizer, theirs_optimizer = _optimizer(), _optimizer()
    ours = warm_started_scheduler("cosine", ours_optimizer, warmup_steps=0, total_steps=8)
    theirs = get_scheduler("cosine", theirs_optimizer, num_warmup_steps=0, num_training_steps=9)
    assert _rates(ours, ours_optimizer, 9) == _rates(theirs, theirs_optimizer, 9)
    assert current_learning_rate(ours_optimizer) == pytest.approx(0.0, abs=1e-12)


def test_a_floored_schedule_resumes_where_it_stopped():
    straight_optimizer = _optimizer()
    straight = warm_started_scheduler("cosine", straight_optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.2)
    expected = _rates(straight, straight_optimizer, 10)

    first_optimizer = _optimizer()
    first = warm_started_scheduler("cosine", first_optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.2)
    head = _rates(first, first_optimizer, 6)
    state = first.state_dict()
    assert all(entry is None for entry in state["lr_lambdas"])  # plain functions: nothing but numbers saved

    resumed_optimizer = _optimizer()
    resumed = warm_started_scheduler("cosine", resumed_optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.2)
    resumed.load_state_dict(state)
    apply_configured_learning_rate(resumed, resumed_optimizer, 1.0)
    assert head + _rates(resumed, resumed_optimizer, 4) == pytest.approx(expected)
    assert min(expected[2:]) >= 0.2 and not math.isclose(expected[-1], 0.2)  # still above the floor at the end


def test_a_floor_on_a_schedule_without_a_rule_is_refused():
    with pytest.raises(UserError, match="--min-lr-ratio needs a schedule given by a rule"):
        warm_started_scheduler("reduce_lr_on_plateau", _optimizer(), warmup_steps=0, total_steps=4, min_lr_ratio=0.1)
