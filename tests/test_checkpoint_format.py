"""What a checkpoint holds and how it is read: the algorithm saves and loads itself, weights in Hugging Face format,
every other state as tensors or JSON data (nothing unpickled on resume), checkpoints of the earlier pickled format
still resume with the same numbers, and a checkpoint carrying a pickled object is refused in one line."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from smolppo.algorithm import state as algorithm_state
from smolppo.errors import UserError
from tests.conftest import make_smoke_trainer
from tests.legacy_checkpoint import RunsCode, as_format_1

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

POLICY_FILES = {"model.safetensors", "config.json", "generation_config.json"}  # as save_pretrained writes them
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
STATE_FILES = {
    "algorithm_state.json",  # schedules, KL controller, random streams, optimizer groups: data
    "optimizer.safetensors",  # AdamW's moments: tensors
    "trainer_state.json",  # the job's index: counters, config, what the checkpoint holds
}
CHECKPOINT_FILES = POLICY_FILES | TOKENIZER_FILES | STATE_FILES | {"value_model"}


def test_optimizer_state_round_trips_through_tensors_and_data():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    tensors, groups = algorithm_state.optimizer_as_tensors(optimizer.state_dict())
    assert sorted(tensors) == ["0.exp_avg", "0.exp_avg_sq", "0.step", "1.exp_avg", "1.exp_avg_sq", "1.step"]
    restored = algorithm_state.optimizer_from_tensors(tensors, json.loads(json.dumps(groups)))  # through JSON
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95) and fresh.param_groups[0]["weight_decay"] == 0.1
    for index in (0, 1):
        torch.testing.assert_close(
            fresh.state_dict()["state"][index]["exp_avg"], optimizer.state[params[index]]["exp_avg"]
        )


def test_random_streams_round_trip_as_json():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = json.loads(json.dumps(algorithm_state.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(2, device="cpu"))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    algorithm_state.set_rng_state(saved)
    got = (random.random(), np.random.rand(), torch.rand(2, device="cpu"))
    assert got[:2] == expected[:2]
    torch.testing.assert_close(got[2], expected[2])


def test_each_process_restores_its_own_gpu_random_state():
    own = algorithm_state.own_cuda_rng_state
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(2)]
    assert own([1, 2, 3], 0) == [1, 2, 3]  # this version: this process's own state, as data
    assert torch.equal(own(states[1], 0), states[1])  # format 1: this process's own state
    assert torch.equal(own(states, 1), states[1])  # older checkpoints: every visible GPU's
    assert own(states, 3) is None and own(None, 0) is None  # fewer GPUs saved


def test_a_checkpoint_holds_no_pickle_and_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trainer = make_smoke_trainer(tmp_path / "out")
    trainer.step()
    path = trainer.save_checkpoint()
    assert set(os.listdir(path)) == CHECKPOINT_FILES
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert not f.read(2).startswith(b"PK"), name  # no torch.save zip anywhere
    index = json.loads(open(os.path.join(path, "trainer_state.json"), encoding="utf-8").read())
    assert index["checkpoint_format"] == 2 and index["update"] == 1 and index["optimizer_state"] is True
    policy = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(policy.lm_head.weight, trainer.algorithm.policy.lm_head.weight)
    AutoModelForSequenceClassification.from_pretrained(os.path.join(path, "value_model"))


def test_a_checkpoint_of_the_earlier_pickled_format_resumes_with_the_same_numbers(tmp_path):
    trainer = make_smoke_trainer(tmp_path / "out")
    trainer.step()
    trainer.step()
    path = trainer.save_checkpoint()
    expected = [trainer.step() for _ in range(2)]  # the run going on from the checkpoint
    legacy = str(tmp_path / "legacy" / "checkpoint-2")
    os.makedirs(os.path.dirname(legacy))
    os.rename(path, legacy)
    as_format_1(legacy)
    assert sorted(f for f in os.listdir(legacy) if f.endswith(".pt")) == [
        "optimizer.pt",
        "rng_state.pt",
        "scheduler.pt",
    ]
    resumed = make_smoke_trainer(tmp_path / "resumed")
    resumed.load_checkpoint(legacy)
    assert resumed.update == 2 and resumed.algorithm.kl_controller.value == trainer.algorithm.kl_controller.value
    for want in expected:
        got = resumed.step()
        for key in ("rewards/mean", "loss", "kl_divergence", "objective/kl_coef"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_a_checkpoint_carrying_a_pickled_object_is_refused_in_one_line(tmp_path):
    trainer = make_smoke_trainer(tmp_path / "out")
    trainer.step()
    checkpoint = trainer.save_checkpoint()
    as_format_1(checkpoint)
    marker = tmp_path / "code_ran"
    optimizer = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)
    optimizer["param_groups"][0]["note"] = RunsCode(str(marker))
    torch.save(optimizer, os.path.join(checkpoint, "optimizer.pt"))
    before = {f: os.path.getmtime(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint)}
    resumed = make_smoke_trainer(tmp_path / "out")
    with pytest.raises(UserError) as refused:
        resumed.load_checkpoint(checkpoint)
    message = str(refused.value)
    assert "\n" not in message and "optimizer.pt" in message and "not plain data (io.open)" in message
    assert "could run code" in message and "--policy-model" in message  # why, and what to do instead
    assert not marker.exists()  # the object was never built
    assert {f: os.path.getmtime(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint)} == before


def test_deepspeed_shards_naming_a_foreign_type_are_refused(tmp_path):
    engine = tmp_path / "deepspeed" / "engine"
    engine.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(1)}, "ds_version": "0.19"}, engine / "mp_rank_00_model_states.pt")
    algorithm_state.refuse_unsafe_pickles(str(tmp_path / "deepspeed"))  # tensors and plain data pass
    torch.save({"optimizer": RunsCode(str(tmp_path / "ran"))}, engine / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(UserError, match="zero_pp_rank_0_optim_states.pt.*io.open"):
        algorithm_state.refuse_unsafe_pickles(str(tmp_path / "deepspeed"))
    torch.save({"optimizer": Evaluates()}, engine / "zero_pp_rank_0_optim_states.pt")  # a builtin is no exception
    with pytest.raises(UserError, match="builtins.eval"):
        algorithm_state.refuse_unsafe_pickles(str(tmp_path / "deepspeed"))
    assert not (tmp_path / "ran").exists()


class Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_the_pi_controller_resumes_with_its_integral_and_smoothed_kl(tmp_path):
    from smolppo.algorithm.ppo_math import PIDKLController

    trainer = make_smoke_trainer(tmp_path / "out", "--kl-controller", "pi", "--kl-target", "0.2")
    controller = trainer.algorithm.kl_controller
    assert isinstance(controller, PIDKLController) and controller.kd == 0.0
    for _ in range(3):
        trainer.step()
    assert controller.engaged and controller.integral != 0.0 and controller.value != trainer.config.init_kl_coef
    path = trainer.save_checkpoint()
    resumed = make_smoke_trainer(tmp_path / "resumed", "--kl-controller", "pi", "--kl-target", "0.2")
    resumed.load_checkpoint(path)
    assert resumed.algorithm.kl_controller.state_dict() == controller.state_dict()
