"""Nothing lost: exact resume, interruption, atomic checkpoints, divergence, bad input, flat memory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from smolppo import files
from smolppo.runs import checkpointing
from tests.conftest import REPO, SMOKE, reset_accelerate_state, run_script_in_process, scalars, snapshot, train_smoke

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (Windows uses Ctrl-Break)")


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "schedule",
    [pytest.param([], marks=pytest.mark.soak), ["--lr-scheduler-type", "cosine", "--warmup-ratio", "0.1"]],
    ids=["constant", "cosine-warmup"],  # the smoke preset's constant LR (soak), and cosine with warm-up
)
def test_resume_continues_exactly(tmp_path, schedule):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train_smoke(straight, "--max-updates", "8", *schedule).returncode == 0
    assert train_smoke(halves, "--max-updates", "4", *schedule).returncode == 0
    result = train_smoke(halves, "--max-updates", "8", "--resume-from-checkpoint", "latest", *schedule)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at update 4" in result.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(halves / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    va = load_file(straight / "value_model" / "model.safetensors")
    vb = load_file(halves / "value_model" / "model.safetensors")
    for key in va:
        torch.testing.assert_close(va[key], vb[key], rtol=1e-5, atol=1e-6)
    sa, sb = (json.loads((d / "run_summary.json").read_text()) for d in (straight, halves))
    assert (sa["updates"], sa["episodes"]) == (sb["updates"], sb["episodes"]) == (8, 128)
    assert sa["kl_coef_next_update"] == pytest.approx(sb["kl_coef_next_update"])
    assert list(scalars(halves / "logs", "loss")) == list(range(1, 9))  # TensorBoard steps continue, no restart
    for tag in ("learning_rate", "rewards/mean", "kl_divergence"):  # the LR schedule follows the plan, not the stop
        resumed, straight_through = scalars(halves / "logs", tag), scalars(straight / "logs", tag)
        assert list(resumed.values()) == pytest.approx(list(straight_through.values()), rel=1e-5, abs=1e-6)
    if schedule:
        rates = list(scalars(straight / "logs", "learning_rate").values())
        assert 0 < rates[0] < rates[3] and len(set(rates)) == 8  # warming up from above zero, then decaying


# ---------------------------------------------------------------------------------------------- interruption
def _start_training(out, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train_ppo.py"), *SMOKE, "--output-dir", str(out), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_training(out, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = out / "logs"
        if logs.is_dir() and any(logs.iterdir()):
            time.sleep(1.0)  # a few updates in
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    raise AssertionError("training did not start")


@pytest.mark.soak
@POSIX_ONLY
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_finishes(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start_training(out, "--num-train-epochs", "500", "--max-updates", "2000", "--save-steps", "5000")
    _wait_for_training(out, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]  # 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in stderr and "--resume-from-checkpoint latest" in stderr
    checkpoints = checkpointing.list_checkpoints(str(out))
    assert len(checkpoints) == 1
    step = checkpoints[0][0]
    assert 0 < step < 2000
    assert json.loads((out / "run_summary.json").read_text())["status"] == "interrupted"
    refused = train_smoke(out, "--max-updates", "2000")
    assert refused.returncode == 2 and "unfinished run" in refused.stderr
    result = train_smoke(out, "--max-updates", str(step + 2), "--resume-from-checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "run_summary.json").read_text())["updates"] == step + 2


@pytest.mark.soak
@POSIX_ONLY
def test_second_interrupt_stops_at_once(tmp_path):
    import threading

    out = tmp_path / "run"
    # Long updates, so the second Ctrl-C lands while the first is still being honoured.
    proc = _start_training(
        out,
        *"--num-train-epochs 500 --max-updates 2000 --save-steps 5000 --max-new-tokens 96 --ppo-epochs 8".split(),
    )
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    _wait_for_training(out, proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while "SIGINT received" not in "".join(chunks) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    stderr = "".join(chunks)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped at once" in stderr and "Traceback" not in stderr
    assert not checkpointing.list_checkpoints(str(out))  # stopped before the graceful checkpoint


# ---------------------------------------------------------------------------------------------- atomic saves
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    from safetensors import torch as safetensors_torch

    from tests.conftest import make_smoke_trainer

    out = tmp_path / "out"
    trainer = make_smoke_trainer(out, "--save-total-limit", "1")
    trainer.step()
    trainer.save_checkpoint()
    real_save_file = safetensors_torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):  # the optimizer's tensors, half written
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", disk_full)
    trainer.step()
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert checkpointing.latest_checkpoint(str(out)).endswith("checkpoint-1")
    assert checkpointing.checkpoint_problem(str(out / "checkpoint-1")) is None
    assert not (out / "checkpoint-2").exists()
    assert not any(p.name.startswith(files.STAGING_PREFIX) for p in out.iterdir())  # the partial save is gone
    monkeypatch.setattr(safetensors_torch, "save_file", real_save_file)
    trainer.step()
    trainer.save_checkpoint()
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [3]


# ---------------------------------------------------------------------------------------------- divergence
@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_non_finite_reward_stops_without_saving_nan(tmp_path, smoke_paths):
    bad_reward = tmp_path / "nan_reward"
    shutil.copytree(smoke_paths["reward"], bad_reward)
    weights = load_file(bad_reward / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, bad_reward / "model.safetensors")
    out = tmp_path / "run"
    result = train_smoke(out, "--reward-model", str(bad_reward))
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert "rewards/mean became nan at update 1" in last and "Traceback" not in result.stderr
    assert not (out / "model.safetensors").exists() and not checkpointing.list_checkpoints(str(out))


# ---------------------------------------------------------------------------------------------- bad input
def _bad_columns_file(tmp_path, smoke_paths):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "answer": "yo"}) + "\n")
    return str(path)


BAD_INPUTS = {
    "missing policy": (
        lambda t, s: ["--policy-model", "./missing/policy"],
        "policy model './missing/policy' does not exist",
    ),
    "reward not a 1-output classifier": (lambda t, s: ["--reward-model", s["policy"]], "has 2 outputs"),
    "reward template": (lambda t, s: ["--reward-template", "chatml"], "--reward-template 'chatml' is not chat"),
    "dataset columns": (lambda t, s: ["--dataset", _bad_columns_file(t, s)], "lacks column(s) ['system', 'question']"),
    "all prompts too long": (lambda t, s: ["--max-prompt-length", "5"], "raise --max-prompt-length"),
    "batch sizes": (lambda t, s: ["--mini-batch-size", "5"], "must be a multiple of mini_batch_size"),
    "learning rate": (lambda t, s: ["--learning-rate", "-1"], "learning_rate must be > 0"),
    "estimator": (lambda t, s: ["--advantage-estimator", "grpo"], "set --samples-per-prompt to 2 or more"),
    "lora targets": (lambda t, s: ["--use-lora", "--lora-target-modules", "qkv"], "LoRA target modules ['qkv']"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, smoke_paths, case, capsys):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "existing_run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    args = [*SMOKE, "--output-dir", str(out), *make_args(tmp_path, smoke_paths)]
    code, stderr = run_script_in_process("train_ppo.py", *args, capsys=capsys)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert snapshot(out) == before


def test_bad_input_through_the_process_is_one_line(tmp_path):
    """The same as a user sees it: exit status 2 and one line on stderr of a real process."""
    result = train_smoke(tmp_path / "o", "--policy-model", "./missing/policy")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: policy model './missing/policy' does not exist")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = train_smoke(tmp_path / "o", "--policy-model", "./missing/policy", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.soak
def test_resident_memory_is_flat_over_many_updates(tmp_path):

    from smolppo.cli import parse_config
    from smolppo.configs import PPOConfig
    from smolppo.job.build import build_ppo_trainer

    reset_accelerate_state()
    config = parse_config(PPOConfig, [*SMOKE, "--output-dir", str(tmp_path), "--max-updates", "200"], "train_ppo")
    trainer = build_ppo_trainer(config)
    process = psutil.Process()
    for _ in range(15):  # warm-up: allocator pools, optimizer state
        trainer.step()
    readings = []
    for _ in range(4):
        for _ in range(15):
            trainer.step()
        readings.append(process.memory_info().rss)
    growth_mb = (readings[-1] - readings[0]) / 2**20
    assert growth_mb < 25, [r / 2**20 for r in readings]
    reset_accelerate_state()
