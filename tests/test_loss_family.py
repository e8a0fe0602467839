"""The loss family (dapo, grpo, dr_grpo, bnpo; clip-higher, dual-clip, GSPO's sequence ratio; dynamic sampling)
and its exact aggregation: a mini-batch's gradient does not depend on how it is cut into micro-batches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from smolppo.algorithm import ppo_math
from smolppo.configs.algorithm import LOSS_TYPES
from tests.conftest import make_smoke_trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])


# ---------------------------------------------------------------------------------------------- by hand
def test_each_aggregation_by_hand():
    whole = ppo_math.LossNorm(tokens=4.0, sequences=2.0, max_length=4)
    assert ppo_math.aggregate(PER_TOKEN, MASK, "dapo", whole).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert ppo_math.aggregate(PER_TOKEN, MASK, "bnpo", whole).item() == pytest.approx(10 / 4)
    assert ppo_math.aggregate(PER_TOKEN, MASK, "grpo", whole).item() == pytest.approx((2.0 + 4.0) / 2)
    assert ppo_math.aggregate(PER_TOKEN, MASK, "dr_grpo", whole).item() == pytest.approx(10 / (2 * 4))
    with pytest.raises(ValueError, match="unknown loss_type"):
        ppo_math.aggregate(PER_TOKEN, MASK, "sum", whole)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_shares_of_micro_batches_add_up_to_the_whole(loss_type):
    """The mini-batch's norm is counted once; each row's share then does not depend on its neighbours."""
    whole = ppo_math.whole_batch_norm(MASK, max_length=4)
    one_piece = ppo_math.aggregate(PER_TOKEN, MASK, loss_type, whole)
    pieces = sum(ppo_math.aggregate(PER_TOKEN[i : i + 1], MASK[i : i + 1], loss_type, whole) for i in range(2))
    assert_close(pieces, one_piece)
    if loss_type in ("dapo", "bnpo"):  # what a per-micro-batch mean gave instead: each piece its own mean, averaged
        per_piece_means = (2.0 + 4.0) / 2
        assert one_piece.item() != pytest.approx(per_piece_means)


def test_clip_higher_dual_clip_and_the_sequence_ratio_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.5]]))  # ratio 1.5 on both tokens
    mask = torch.ones(1, 2)
    symmetric = ppo_math.policy_terms(new, old, torch.ones(1, 2), mask, 0.2)
    assert_close(symmetric.loss, torch.full((1, 2), -1.2))  # clipped at 1 + 0.2
    higher = ppo_math.policy_terms(new, old, torch.ones(1, 2), mask, 0.2, epsilon_high=0.28)
    assert_close(higher.loss, torch.full((1, 2), -1.28))  # clip-higher: the positive side allows 1.28
    assert higher.clipped.tolist() == [[1.0, 1.0]]
    # Negative advantage, ratio 4: PPO's loss is -A * 4 = 8; dual-clip bounds it at -c A = 6 for c = 3.
    big = torch.log(torch.tensor([[4.0, 4.0]]))
    plain = ppo_math.policy_terms(big, old, torch.full((1, 2), -2.0), mask, 0.2)
    dual = ppo_math.policy_terms(big, old, torch.full((1, 2), -2.0), mask, 0.2, dual_clip=3.0)
    assert_close(plain.loss, torch.full((1, 2), 8.0))
    assert_close(dual.loss, torch.full((1, 2), 6.0))
    # GSPO: one ratio per sequence, exp of the mean token log-ratio over the real tokens.
    tokens = torch.log(torch.tensor([[2.0, 0.5, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    seq = ppo_math.policy_terms(tokens, torch.zeros(1, 3), torch.ones(1, 3), mask, 0.2, level="sequence")
    assert seq.log_ratio.shape == (1, 1) and seq.log_ratio.item() == pytest.approx(0.0, abs=1e-6)  # sqrt(2 x 0.5)
    assert_close(seq.loss, torch.full((1, 3), -1.0))  # the sequence's ratio times each token's advantage


def test_groups_without_reward_spread_are_found():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    assert ppo_math.groups_with_signal(scores, 2).tolist() == [False, False, True, True, False, False]


# ---------------------------------------------------------------------------------------------- in the engine
def _gradients(tmp_path, micro: int, loss_type: str, estimator_flags: tuple[str, ...]) -> list[list[torch.Tensor]]:
    """The gradient each optimizer step of one update sees, with micro-batches of `micro` sequences."""
    flags = ("--loss-type", loss_type, "--mini-batch-size", "8", "--per-device-train-batch-size", str(micro))
    trainer = make_smoke_trainer(
        tmp_path / f"{loss_type}-{micro}", *flags, "--ppo-epochs", "1", "--kl-in-loss", *estimator_flags
    )
    algo = trainer.algorithm
    exp = varied_lengths(trainer, CUTS[estimator_flags])
    assert len(set(exp.rollout.response_lengths.tolist())) > 2  # responses of different lengths
    if "--dynamic-sampling" in estimator_flags:  # the first group: no EOS twice, -1 twice, left out of the loss
        assert exp.trained.tolist()[:4] == [0.0, 0.0, 1.0, 1.0]
    steps = []
    algo.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append([p.grad.detach().clone() for p in algo.trainable_params])
    )
    algo.optimise(exp, 0)
    return steps


def varied_lengths(trainer, cuts=(3, 0, 7, 1, 5, 0, 2, 9)):
    """One update's experience with responses cut short by an EOS at the given places (0: left as sampled)."""
    from smolppo.algorithm.rollout import build_rollout

    algo, prompts = trainer.algorithm, trainer.prompts
    indices = [i for i in trainer.sampler.indices(0) for _ in range(algo.config.estimator.samples_per_prompt)]
    rollout = algo.rollout([prompts.input_ids[i] for i in indices])
    responses, context = rollout.responses.clone(), rollout.context_length
    for row, cut in zip(range(len(rollout)), cuts):
        if cut:
            responses[row, cut - 1] = algo.eos_ids[0]
    cut = build_rollout(
        rollout.input_ids[:, :context],
        rollout.attention_mask[:, :context],
        responses,
        algo.eos_ids,
        algo.tokenizer.pad_token_id,
    )
    return algo.experience_from(cut, prompts, indices)


GRPO = ("--advantage-estimator", "grpo", "--samples-per-prompt", "2", "--rollout-batch-size", "4")
ESTIMATORS = {
    "gae": ("--rollout-batch-size", "8"),  # policy, value loss and in-loss KL
    "grpo": GRPO,
    "grpo+dynamic sampling": (*GRPO, "--dynamic-sampling", "--missing-eos-score", "-1"),  # uneven micro-batches
}
CUTS = {flags: (3, 0, 7, 1, 5, 0, 2, 9) for flags in ESTIMATORS.values()}
CUTS[ESTIMATORS["grpo+dynamic sampling"]] = (0, 0, 7, 1, 5, 0, 2, 9)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_a_mini_batch_gradient_does_not_depend_on_the_micro_batch(tmp_path, loss_type, estimator):
    whole = _gradients(tmp_path, 8, loss_type, ESTIMATORS[estimator])
    assert len(whole) == 1
    for micro in (1, 2, 4):
        pieces = _gradients(tmp_path, micro, loss_type, ESTIMATORS[estimator])
        assert len(pieces) == 1
        for got, want in zip(pieces[0], whole[0]):
            assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.soak  # CI runs it after the README command: two processes under accelerate launch (about 40 s)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_processes_take_the_gradient_of_the_one_process_mini_batch(tmp_path, loss_type):
    """Each of two processes holds half of a mini-batch of responses of different lengths: the all-reduced gradient
    equals that of the mini-batch in one process (`tests/ddp_gradient.py`)."""
    import os
    import subprocess
    import sys

    from tests.conftest import LAUNCH, REPO

    script = os.path.join(REPO, "tests", "ddp_gradient.py")
    for command in ([sys.executable, script], [*LAUNCH, script]):
        done = subprocess.run(
            [*command, str(tmp_path), loss_type], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"gradients_{n}.pt") for n in (1, 2))
    assert len(one) == len(two) == 1
    for got, want in zip(two[0], one[0]):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- trl's numbers
def _trl_record() -> dict:
    import json
    import os

    from tests.conftest import REPO

    with open(os.path.join(REPO, "tests", "data", "trl_loss_parity.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case", [c["name"] for c in _trl_record()["cases"]])
def test_our_loss_and_gradient_equal_trls_grpo_trainer(case):
    """Loss and gradient recorded by running trl's own GRPOTrainer loss (benchmarks/trl_loss_parity.py)."""
    record = _trl_record()
    spec = next(c for c in record["cases"] if c["name"] == case)
    inputs = {key: torch.tensor(value) for key, value in record["inputs"].items()}
    logprobs = inputs["logprobs"].clone().requires_grad_(True)
    mask = inputs["mask"]
    advantages = inputs["advantages"][:, None].expand_as(mask)  # trl: one per sequence
    terms = ppo_math.policy_terms(
        logprobs,
        inputs["old_logprobs"],
        advantages,
        mask,
        spec["epsilon"],
        spec["epsilon_high"],
        level=spec["importance_sampling_level"],
    )
    per_token = terms.loss + spec["beta"] * ppo_math.kl_penalty(logprobs, inputs["ref_logprobs"], "k3")
    norm = ppo_math.whole_batch_norm(mask, record["max_completion_length"])
    loss = ppo_math.aggregate(per_token, mask, spec["loss_type"], norm)
    loss.backward()
    assert loss.item() == pytest.approx(spec["loss"], rel=1e-6, abs=1e-7)
    assert_close(logprobs.grad, torch.tensor(spec["gradient"]), rtol=1e-5, atol=1e-7)


@pytest.mark.soak  # CI runs it after the README command (about 20 s)
def test_dynamic_sampling_refills_groups_without_signal_from_new_prompts(tmp_path):
    flags = (
        *"--reward-model none --reward-funcs tests/data/binary_reward.py:odd_length --advantage-estimator".split(),
        *"grpo --samples-per-prompt 2 --dynamic-sampling".split(),
    )
    left_out = {}
    for refills in (0, 4):
        trainer = make_smoke_trainer(tmp_path / f"r{refills}", *flags, "--dynamic-sampling-refills", str(refills))
        exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
        assert len(exp.rollout) == len(exp.trained) == 32  # the batch stays full
        left_out[refills] = int((exp.trained == 0).sum())
        metrics = trainer.algorithm.metrics(exp, trainer.algorithm.optimise(exp, 0))
        assert metrics["dynamic_sampling/dropped_responses"] == left_out[refills]
    assert left_out[0] >= 4 and left_out[4] < left_out[0] / 2  # ties are common; refills replace most of them
