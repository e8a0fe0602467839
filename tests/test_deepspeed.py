"""DeepSpeed ZeRO-2 and ZeRO-3 for real: two CPU processes over gloo (`accelerate launch` with the shipped configs),
compared with the two-process DDP run update for update, and resumed from DeepSpeed's own sharded state."""

import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from smolppo import files
from tests.conftest import REPO, launch, one_line_error, run_script, scalars

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks DeepSpeed's CPU (gloo) path"),
    pytest.mark.skipif(sys.platform != "linux", reason="deepspeed is a test requirement on Linux only"),
]

CONFIGS = {stage: os.path.join(REPO, "accelerate_configs", f"deepspeed_zero{stage}.yaml") for stage in (2, 3)}


def zero_launch(stage: int, out, *args):
    launcher = ("--config_file", CONFIGS[stage], "--num_processes", "2", "--main_process_port", "0")
    result = launch("--output-dir", str(out), *args, launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr  # a rank aborting at exit (seen once with ZeRO-3 + LoRA)
    return result


def weights(out) -> dict[str, torch.Tensor]:
    name = files.ADAPTER_WEIGHTS if (out / files.ADAPTER_WEIGHTS).exists() else files.MODEL_WEIGHTS
    found = load_file(out / name)
    found.update({f"value.{k}": v for k, v in load_file(out / files.VALUE_MODEL_DIR / files.MODEL_WEIGHTS).items()})
    return found


def initial_policy(out) -> dict[str, torch.Tensor]:
    summary = json.loads((out / files.RUN_SUMMARY_FILE).read_text())
    return load_file(os.path.join(summary["resolved_paths"]["policy_model"], files.MODEL_WEIGHTS))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


_RUNS: dict = {}


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, smoke_cache):
    """``zero_run(stage, *flags)``: a 4-update run (checkpoints at 2 and 4, both with their optimizer state), once per
    module for each setting."""

    def run(stage: int, *flags: str):
        key = (stage, *flags)
        if key not in _RUNS:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "out"
            result = zero_launch(
                stage,
                out,
                *"--max-updates 4 --save-steps 2 --save-total-limit 9 --save-optimizer-state all".split(),
                *flags,
            )
            _RUNS[key] = (out, result)
        return _RUNS[key]

    return run


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory, smoke_cache):
    out = tmp_path_factory.mktemp("ddp_lora") / "out"
    result = launch("--output-dir", str(out), "--max-updates", "4", "--use-lora")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def assert_deepspeed_ran(out, stage: int, checkpoints=("checkpoint-2", "checkpoint-4")) -> None:
    """DeepSpeed's engine trained (the summary) and wrote its own sharded state into the checkpoints."""
    summary = json.loads((out / files.RUN_SUMMARY_FILE).read_text())
    assert summary["distributed"] == {
        "type": "DEEPSPEED",
        "processes": 2,
        "backend": "gloo",
        "zero_stage": stage,
        "wrapper": "DeepSpeedEngine",
    }
    for checkpoint in checkpoints:
        shards = sorted(os.listdir(out / checkpoint / files.DEEPSPEED_DIR / "state"))
        optimizer_shards = [s for s in shards if s.endswith("optim_states.pt")]  # bf16_zero_... in bf16 mode
        assert len(optimizer_shards) == 2
        for rank, shard in enumerate(optimizer_shards):
            assert shard.endswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), shard
        assert not (out / checkpoint / files.OPTIMIZER_TENSORS).exists()  # the DDP layout is not written
        state = json.loads((out / checkpoint / files.STATE_FILE).read_text())
        assert state["deepspeed_state"] == {"processes": 2, "zero_stage": stage}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_ddp_update_for_update(zero_run, two_process_run, stage):
    out, _ = zero_run(stage)
    assert_deepspeed_ran(out, stage)
    ours, ddp = scalars(out / "logs", "rewards/mean"), scalars(two_process_run / "logs", "rewards/mean")
    assert list(ours) == list(ddp) == [1, 2, 3, 4]
    for update in ours:
        assert ours[update] == pytest.approx(ddp[update], abs=1e-4)
    assert max_difference(weights(out), weights(two_process_run)) < 1e-4
    # the weights moved: the comparison above is not between two untrained models
    trained = load_file(out / files.MODEL_WEIGHTS)
    assert max((trained[k] - initial_policy(out)[k]).abs().max().item() for k in trained) > 1e-3


@pytest.mark.parametrize("stage, flags", [(2, ()), (3, ()), (3, ("--use-lora",)), (2, ("--bf16",))])
def test_zero_resume_continues_from_its_checkpoint(zero_run, tmp_path, stage, flags):
    """Resuming restores DeepSpeed's fp32 master weights and AdamW moments: the resumed run ends exactly where the
    straight run ends (restoring only the module's weights would let the first step undo the checkpoint)."""
    straight, _ = zero_run(stage, *flags)
    halves = tmp_path / "halves"
    shutil.copytree(straight, halves)
    for entry in os.listdir(halves):  # keep checkpoint-2 only, as if the run had stopped there
        if entry != "checkpoint-2":
            path = halves / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = zero_launch(stage, halves, "--max-updates", "4", "--resume-from-checkpoint", "latest", *flags)
    assert "moments restart" not in result.stderr
    assert max_difference(weights(halves), weights(straight)) < 1e-6
    assert list(scalars(halves / "logs", "rewards/mean")) == [3, 4]


def test_zero3_lora_matches_ddp_lora(zero_run, ddp_lora_run):
    out, _ = zero_run(3, "--use-lora")
    assert_deepspeed_ran(out, 3)
    ours, ddp = scalars(out / "logs", "rewards/mean"), scalars(ddp_lora_run / "logs", "rewards/mean")
    for update in (1, 2, 3, 4):
        assert ours[update] == pytest.approx(ddp[update], abs=1e-4)
    assert max_difference(weights(out), weights(ddp_lora_run)) < 1e-4


def test_zero2_bf16_runs_and_saves_fp32_master_weights(zero_run):
    """DeepSpeed's bf16 mode casts the trained model to bf16: the LM head still computes log-probs in fp32, and the
    saved weights are DeepSpeed's fp32 master copy, not the bf16 working copy."""
    out, _ = zero_run(2, "--bf16")
    assert_deepspeed_ran(out, 2)
    saved = weights(out)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    rounded = sum(bool((t != t.bfloat16().float()).any()) for t in saved.values())
    assert rounded > len(saved) // 2  # most tensors hold values bf16 cannot represent
    summary = json.loads((out / files.RUN_SUMMARY_FILE).read_text())
    assert summary["observed"]["lm_head_dtype"] == "torch.float32"
    assert summary["observed"]["update_matmul_dtype"] == "torch.bfloat16"
    rewards = scalars(out / "logs", "rewards/mean")
    assert all(torch.isfinite(torch.tensor(list(rewards.values()))))


def test_zero3_bf16_runs_and_reports_its_head_precision(zero_run):
    """Under ZeRO-3 the bf16 head is partitioned and only its own call gathers it: it runs in bf16, and the run
    says so instead of claiming fp32. Older checkpoints lose their DeepSpeed state as they lose optimizer.pt."""
    out, _ = zero_run(3, "--bf16", "--save-optimizer-state", "latest")
    assert_deepspeed_ran(out, 3, checkpoints=("checkpoint-4",))
    # --save-optimizer-state latest: the older checkpoint's DeepSpeed state is dropped, and its state file says so
    assert not (out / "checkpoint-2" / files.DEEPSPEED_DIR).exists()
    old_state = json.loads((out / "checkpoint-2" / files.STATE_FILE).read_text())
    assert old_state["optimizer_state"] is False and "deepspeed_state" not in old_state
    summary = json.loads((out / files.RUN_SUMMARY_FILE).read_text())
    assert summary["observed"]["lm_head_dtype"] == "torch.bfloat16"
    assert {t.dtype for t in weights(out).values()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(list(scalars(out / "logs", "rewards/mean").values()))))


def test_ddp_checkpoint_resumes_under_zero2(two_process_run, tmp_path):
    """A checkpoint without DeepSpeed state (here the DDP run's): the weights are loaded into the module and into
    DeepSpeed's fp32 master copy, so the next update starts from the checkpoint, not from the initial weights."""
    out = tmp_path / "moved"
    shutil.copytree(two_process_run, out)
    checkpoint = weights(out / "checkpoint-4")
    result = zero_launch(
        2,
        out,
        *"--max-updates 5 --save-steps 1 --save-total-limit 2 --resume-from-checkpoint latest".split(),
    )
    assert "no DeepSpeed state" in result.stderr and "AdamW moments restart" in result.stderr
    assert_deepspeed_ran(out, 2, checkpoints=("checkpoint-5",))
    # --save-optimizer-state latest (the default): only the newest checkpoint keeps optimizer state, whatever its form
    assert (out / "checkpoint-4" / files.MODEL_WEIGHTS).exists()
    assert not (out / "checkpoint-4" / files.OPTIMIZER_TENSORS).exists()
    resumed = weights(out)
    initial = initial_policy(out)
    policy = [k for k in resumed if not k.startswith("value.")]
    from_checkpoint = max((resumed[k] - checkpoint[k]).abs().max().item() for k in policy)
    from_initial = max((resumed[k] - initial[k]).abs().max().item() for k in policy)
    assert from_checkpoint < from_initial / 2, (from_checkpoint, from_initial)


def test_deepspeed_with_cpu_flag_is_refused_in_one_line(tmp_path):
    """accelerate drops DeepSpeed under --cpu; the run says so instead of training without it."""
    result = run_script(
        "train_ppo.py",
        "--preset",
        "smoke",
        "--output-dir",
        str(tmp_path / "out"),
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"},
    )
    one_line_error(result, "DeepSpeed", "--cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", [(2,), (3,), (2, "--bf16"), (3, "--bf16", "--save-optimizer-state", "latest")])
def test_the_checkpoint_size_said_at_start_is_what_is_written(zero_run, setting):
    """The start-up line's estimate counts DeepSpeed's state and the fp32 weights saved from its master copy."""
    out, result = zero_run(*setting)
    said = re.search(r"models ([\d.]+) MB, optimizer state ([\d.]+) MB", result.stderr)
    assert said, result.stderr[-2000:]
    checkpoint = out / "checkpoint-4"
    models = sum(f.stat().st_size for f in checkpoint.rglob("*.safetensors"))
    engine = sum(f.stat().st_size for f in (checkpoint / files.DEEPSPEED_DIR).rglob("*.pt"))
    for estimate, real in ((float(said[1]) * 1e6, models), (float(said[2]) * 1e6, engine)):
        assert abs(estimate - real) <= 0.05e6 + 0.1 * real, (estimate, real)
