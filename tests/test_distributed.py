"""Several processes through `accelerate launch` on CPU (gloo), and the shipped accelerate configs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from smolppo import files
from tests.conftest import REPO, scalars

CONFIG_DIR = os.path.join(REPO, "accelerate_configs")
# accelerate's `--cpu` launcher starts one process unless MPI is installed; its torchrun launcher
# (`--multi_gpu`) starts several, and on a machine without CUDA they form a gloo group on CPU.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


def launch(*args):
    return subprocess.run(
        [*LAUNCH, os.path.join(REPO, "train_ppo.py"), "--preset", "smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, smoke_cache):
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = launch("--output-dir", str(out), "--max-updates", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


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
        assert config.deepspeed_config["gradient_clipping"] == "auto"
