"""Several processes through `accelerate launch` on CPU (gloo), and the shipped accelerate configs."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from smolppo import files
from smolppo.errors import UserError
from tests.conftest import REPO, launch, scalars

CONFIG_DIR = os.path.join(REPO, "accelerate_configs")


@pytest.mark.soak
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_processes_write_one_set_of_outputs(two_process_run, smoke_run):
    out = two_process_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["updates"] == 4
    assert summary["schedule"]["global_rollout_batch"] == 32
    assert len([f for f in os.listdir(out / "logs") if f.startswith("events.out")]) == 1
    assert [d for d in os.listdir(out) if d.startswith(("checkpoint-", files.STAGING_PREFIX))] == ["checkpoint-4"]
    assert (out / "model.safetensors").exists()
    # Twice the episodes of one process with the same per-device batch, update for update.
    two = scalars(out / "logs", "episodes")
    one = scalars(smoke_run / "logs", "episodes")
    assert [two[k] for k in (1, 2, 3, 4)] == [2 * one[k] for k in (1, 2, 3, 4)] == [32, 64, 96, 128]
    # The reward-model check: each process read half the held-out pairs, the result is the one-process one.
    check, alone = summary["reward_model_check"], json.loads((smoke_run / "run_summary.json").read_text())
    alone = alone["reward_model_check"]
    assert check["num_pairs"] == alone["num_pairs"] > 1 and check["pairwise_accuracy"] == alone["pairwise_accuracy"]
    assert check["margin"] == pytest.approx(alone["margin"], abs=1e-4)


@pytest.mark.soak
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_reward_model_training_on_two_processes_writes_one_model(tmp_path):
    """The run's lock is taken once (by the main process), and only the main process writes our files."""
    import subprocess

    from tests.conftest import LAUNCH

    out = tmp_path / "rm_two"
    result = subprocess.run(
        [*LAUNCH, os.path.join(REPO, "train_reward_model.py"), "--preset", "smoke", "--output-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "reward_model_summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "finished" and summary["heldout"]["num_pairs"] > 0
    assert (out / "model.safetensors").is_file() and not (out / files.LOCK).exists()
    assert not [n for n in os.listdir(out) if n.startswith((files.STAGING_PREFIX, files.TRASH_PREFIX, "unpublished"))]
    assert len([f for f in os.listdir(out / "logs") if f.startswith("events.out")]) <= 2  # training + held-out


@pytest.mark.soak
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_process_resume_matches_straight_run(two_process_run, tmp_path):
    halves = tmp_path / "halves"
    assert launch("--output-dir", str(halves), "--max-updates", "2").returncode == 0
    result = launch("--output-dir", str(halves), "--max-updates", "4", "--resume-from-checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = load_file(two_process_run / "model.safetensors"), load_file(halves / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert list(scalars(halves / "logs", "loss")) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "name, kind, stage",
    [
        ("single_gpu", "NO", None),
        ("multi_gpu", "MULTI_GPU", None),
        ("deepspeed_zero2", "DEEPSPEED", 2),
        ("deepspeed_zero3", "DEEPSPEED", 3),
    ],
)
def test_accelerate_configs_parse(name, kind, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind)
    assert config.mixed_precision == "no"
    if stage is not None:
        assert config.deepspeed_config["zero_stage"] == stage
        # train_ppo.py fills these from its own flags; a number here that disagrees would be refused
        assert not {"gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"} & set(
            config.deepspeed_config
        )


def test_deepspeed_settings_that_disagree_with_the_run_are_refused(monkeypatch):
    """accelerate would replace the run's accumulation by the config's (and DeepSpeed its clipping): one line."""
    from smolppo.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match="gradient_accumulation_steps: 4, but this run uses 2"):
        make_accelerator(accumulation_steps=2, micro_batch_size=4, max_grad_norm=1.0, bf16=False)
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    with pytest.raises(UserError, match="gradient_clipping: 0.5, but this run uses 1.0 .--max-grad-norm"):
        make_accelerator(accumulation_steps=2, micro_batch_size=4, max_grad_norm=1.0, bf16=False)


def test_deepspeed_asked_for_but_missing_is_one_line(monkeypatch):
    from smolppo.distributed import process_group

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` meets where it is not installed
    with pytest.raises(UserError, match="pip install deepspeed"):
        process_group()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(UserError, match="both DeepSpeed and --cpu"):
        process_group()


def test_a_run_that_asked_for_deepspeed_and_got_none_is_refused(monkeypatch):
    from accelerate.utils import DistributedType

    from smolppo.distributed import check_distributed_type

    check_distributed_type(DistributedType.MULTI_CPU)  # not asked for: fine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_distributed_type(DistributedType.DEEPSPEED)
    with pytest.raises(UserError, match="would train without it"):
        check_distributed_type(DistributedType.MULTI_CPU)
