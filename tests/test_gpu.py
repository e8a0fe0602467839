"""On a CUDA GPU (`python -m pytest -m gpu tests`): the self-check passes, every stage of an update stays on the GPU,
and a GPU checkpoint resumes on a machine without one. Skipped where there is no CUDA; CI has none."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import make_smoke_trainer, train_smoke
from tests.test_selfcheck import selfcheck

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_accelerator_state"),
]


def test_the_selfcheck_passes_on_the_gpu(tmp_path):
    report_path = tmp_path / "selfcheck.json"
    result = selfcheck("--device", "cuda", "--output", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["environment"]["build_problem"] is None and report["environment"]["kernel_runs"]
    assert report["failed"] == 0 and report["passed"] >= 9


@pytest.mark.parametrize("flags", [(), ("--use-lora", "--bf16"), ("--advantage-estimator", "grpo", "--bf16")])
def test_every_stage_of_an_update_stays_on_the_gpu(tmp_path, flags):
    trainer = make_smoke_trainer(
        tmp_path / "out", "--reward-funcs", "examples/reward_functions.py:readable_text", *flags
    )
    algo = trainer.algorithm
    assert algo.accelerator.device.type == "cuda"
    exp = algo.make_experience(trainer.prompts, trainer.sampler.indices(0))
    exp.check_device(algo.accelerator.device)
    assert exp.reward_parts["readable_text"].is_cuda and exp.scores.is_cuda
    metrics = algo.metrics(exp, algo.optimise(exp, 0))
    assert all(v == v for k, v in metrics.items() if k != "grad_norm")


def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    assert train_smoke(out, "--max-updates", "1", "--save-steps", "1").returncode == 0
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        result = train_smoke(out, "--max-updates", "2", "--resume-from-checkpoint", "latest")
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["updates"] == 2
