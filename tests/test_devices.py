"""Device discipline, checked on a CPU: the CPU plays host and accelerator at once (`tests.host_tensors`), every
stage hands its tensors on on the rollout's device, and an update reads the device once, not per micro-batch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from smolppo.devices import DeviceMismatch, check_on_device, same_device
from tests.conftest import make_smoke_trainer
from tests.host_tensors import CpuAsAccelerator, HostMeetsAccelerator, on_host

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")
ACCELERATOR = torch.device("cpu")  # a torch.device names the accelerator's device under CpuAsAccelerator


# ---------------------------------------------------------------------------------------------- the stand-in
def test_the_stand_in_fails_where_cuda_fails():
    """The bug a GPU met in the first update: a reward function's rewards built on the host, indexed with the
    mini-batch order on the accelerator."""
    with CpuAsAccelerator():
        parts = torch.tensor([1.0, 2.0, 3.0])  # built on the host
        order = torch.randperm(3).to(ACCELERATOR)
        with pytest.raises(HostMeetsAccelerator, match="indices should be"):
            parts[order]
        with pytest.raises(HostMeetsAccelerator, match="same device"):
            parts + torch.ones(3, device=ACCELERATOR)
        with pytest.raises(HostMeetsAccelerator):
            torch.cat([parts, torch.zeros(2, device=ACCELERATOR)])


def test_the_stand_in_allows_what_cuda_allows():
    with CpuAsAccelerator():
        on_device = torch.arange(4.0, device=ACCELERATOR)
        host_index = torch.tensor([0, 2])
        assert on_device[host_index].tolist() == [0.0, 2.0]  # an accelerator tensor indexed from the host
        assert (on_device * torch.tensor(2.0)).tolist() == [0.0, 2.0, 4.0, 6.0]  # a host scalar
        moved = torch.tensor([1.0, 2.0]).to(ACCELERATOR)
        assert not on_host(moved) and (moved + on_device[:2]).tolist() == [1.0, 3.0]
        back = on_device.cpu()
        assert on_host(back) and on_host(back * 2) and not on_host(back.to(ACCELERATOR))
        assert on_host(torch.zeros_like(back)) and not on_host(torch.zeros_like(on_device))


# ---------------------------------------------------------------------------------------------- whole updates
UPDATES = {
    "ppo+reward functions": ("--reward-funcs", "examples/reward_functions.py:readable_text", "--bf16"),
    "grpo+lora": ("--advantage-estimator", "grpo", "--samples-per-prompt", "2", "--use-lora"),
    "ppo+kl in loss": ("--kl-in-loss", "--max-updates", "2"),
}


@pytest.mark.parametrize("flags", UPDATES.values(), ids=UPDATES.keys())
def test_an_update_never_lets_a_host_tensor_meet_the_accelerator(tmp_path, flags):
    trainer = make_smoke_trainer(tmp_path / "out", *flags)
    algo = trainer.algorithm
    with CpuAsAccelerator():
        exp = algo.make_experience(trainer.prompts, trainer.sampler.indices(0))
        metrics = algo.metrics(exp, algo.optimise(exp, 0))
    tensors = {**exp.rollout.tensors(), "scores": exp.scores, "advantages": exp.advantages, **exp.reward_parts}
    assert not [name for name, tensor in tensors.items() if on_host(tensor)]
    assert metrics["rewards/mean"] == pytest.approx(float(exp.scores.mean()))


# ---------------------------------------------------------------------------------------------- stage boundaries
def test_a_stage_boundary_names_the_tensor_on_another_device(tmp_path):
    trainer = make_smoke_trainer(tmp_path / "out", "--reward-funcs", "examples/reward_functions.py:readable_text")
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
    exp.check_device(ACCELERATOR)  # as built: every tensor on the rollout's device
    exp.reward_parts["readable_text"] = exp.reward_parts["readable_text"].to("meta")
    with pytest.raises(DeviceMismatch, match=r"reward_parts\['readable_text'\] is on meta"):
        exp.check_device(ACCELERATOR)
    with pytest.raises(DeviceMismatch, match="values: values is on meta, the rollout on cpu"):
        check_on_device(ACCELERATOR, "values", values=torch.zeros(2, device="meta"), none=None)


def test_devices_compare_with_an_open_index():
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cuda:1"), torch.device("cuda"))
    assert not same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not same_device(torch.device("cpu"), torch.device("cuda:0"))


# ---------------------------------------------------------------------------------------------- host reads
class HostReads(TorchFunctionMode):
    """Counts the calls in smolppo's own code that copy a device value to the host (each one a GPU
    synchronisation). transformers' SDPA mask check reads one per forward (``padding_mask.all()``): not ours."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
    }

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code.co_filename
        self.count += func in self.READS and f"{os.sep}smolppo{os.sep}" in caller
        return func(*args, **(kwargs or {}))


def _reads_in_optimise(tmp_path, micro_batch: int) -> tuple[int, int]:
    trainer = make_smoke_trainer(tmp_path / f"micro{micro_batch}", "--per-device-train-batch-size", str(micro_batch))
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0))
    with HostReads() as reads:
        trainer.algorithm.optimise(exp, 0)
    micro_batches = trainer.config.ppo_epochs * len(exp.rollout) // micro_batch
    return reads.count, micro_batches


def test_the_update_reads_the_device_once_not_per_micro_batch(tmp_path):
    few, few_batches = _reads_in_optimise(tmp_path, 8)
    many, many_batches = _reads_in_optimise(tmp_path, 1)
    assert many_batches == 8 * few_batches == 32
    assert many == few <= 4  # the trim table, the statistics, and the order (a host tensor) per epoch


# ---------------------------------------------------------------------------------------------- the reward check
def test_the_reward_check_reads_the_model_on_the_accelerator_as_ppo_will(tmp_path):
    """With --bf16 the start-up check reads the reward model as the run does (bf16 linears under autocast, on the
    accelerator's device), not on the CPU in fp32 before the accelerator exists."""
    from smolppo.data import load_rows
    from smolppo.job.build import held_out_pairs
    from smolppo.rewards.reader import pairwise_check

    trainer = make_smoke_trainer(tmp_path / "out", "--bf16")
    reader, config = trainer.reward.reader, trainer.config
    body = reader.model.model.layers[0].self_attn.q_proj.weight
    assert body.dtype == torch.bfloat16 and same_device(body.device, trainer.accelerator.device)
    pairs = held_out_pairs(config, load_rows(config.dataset, config.dataset_split), trainer.algorithm.tokenizer)
    with torch.autocast(trainer.accelerator.device.type, dtype=torch.bfloat16):
        as_read = pairwise_check(reader, pairs)
    assert trainer.reward_check.num_pairs == as_read.num_pairs > 1
    assert trainer.reward_check.margin == as_read.margin
