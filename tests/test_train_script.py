"""train_ppo.py run as a subprocess, as a user runs it: outputs, logs, checkpoints, LoRA, refusals."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smolppo import smoke
from tests.conftest import run_script, smoke_preset, smoke_updates

KEY_SCALARS = ["loss", "rewards/mean", "kl_divergence", "learning_rate", "advantage"]
DETAIL_SCALARS = [
    *"loss/policy loss/value policy/clip_fraction value/clip_fraction policy/entropy objective/kl_coef".split(),
    *"response/length_mean response/eos_rate time/rollout time/reward time/reference_logprobs time/values".split(),
    "time/update",
]


def events(log_dir):
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_smoke_run_writes_a_loadable_model(smoke_run):
    out = smoke_run
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1


def test_smoke_run_logs_every_scalar_and_samples(smoke_run):
    out = smoke_run
    acc = events(str(out / "logs"))
    tags = acc.Tags()["scalars"]
    for tag in KEY_SCALARS + DETAIL_SCALARS:
        assert tag in tags, tag
    rewards = [e.value for e in acc.Scalars("rewards/mean")]
    updates = json.loads((out / "run_summary.json").read_text())["updates"]
    assert len(rewards) == updates and [e.step for e in acc.Scalars("loss")] == list(range(1, updates + 1))
    assert sum(rewards[-8:]) / 8 > sum(rewards[:8]) / 8  # the smoke reward is learnable
    assert any("samples" in t for t in acc.Tags()["tensors"])


def test_smoke_run_checkpoints_and_summary(smoke_run):
    out = smoke_run
    checkpoints = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    summary = json.loads((out / "run_summary.json").read_text())
    updates = smoke_updates(summary["num_prompts"])  # every whole rollout batch of every epoch
    assert checkpoints == [f"checkpoint-{updates}"]  # save_total_limit=1 keeps the final update's
    for name in ("optimizer.safetensors", "algorithm_state.json", "trainer_state.json", "value_model"):
        assert os.path.exists(out / checkpoints[0] / name), name
    assert summary["status"] == "finished" and summary["updates"] == updates
    assert summary["episodes"] == updates * smoke_preset()["rollout_batch_size"]  # one sample per prompt
    assert summary["config"]["reward_model"] == smoke.resolve("smoke:reward")  # the path it really read
    assert summary["environment"]["torch"] and summary["peak_memory_bytes"] > 0
    assert summary["observed"] == {
        "gradient_checkpointing_active": False,
        "update_matmul_dtype": "torch.float32",
        "lm_head_dtype": "torch.float32",
    }
    assert summary["reward_model_check"]["pairwise_accuracy"] >= 0.9 and summary["reward_template"] == "chat"
    assert set(KEY_SCALARS) <= set(summary["final_metrics"])


def test_refuses_to_overwrite_a_finished_run(smoke_run):
    out = smoke_run
    before = {name: os.path.getmtime(out / name) for name in os.listdir(out)}
    result = run_script("train_ppo.py", "--preset", "smoke", "--output-dir", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already holds a finished run" in result.stderr and "--overwrite-output-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert before == {name: os.path.getmtime(out / name) for name in os.listdir(out)}


def test_lora_run_with_bf16_and_checkpointing_writes_an_adapter(lora_run):
    out = lora_run
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_" in n for n, _ in model.named_parameters())
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["observed"] == {
        "gradient_checkpointing_active": True,
        "update_matmul_dtype": "torch.bfloat16",
        "lm_head_dtype": "torch.float32",
    }


def test_missing_reward_model_is_one_clear_line(tmp_path):
    result = run_script(
        "train_ppo.py", "--preset", "smoke", "--output-dir", str(tmp_path / "o"), "--reward-model", "./no/such/reward"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "reward model './no/such/reward' does not exist" in last and "--preset smoke" in last


@pytest.mark.soak  # CI runs it after the README command
def test_push_to_hub_offline_is_one_line_and_keeps_the_outputs(tmp_path, smoke_cache):
    out = tmp_path / "run"
    result = run_script(
        *"train_ppo.py --preset smoke --max-updates 2 --push_to_hub --hub_model_id someone/smoke-ppo".split(),
        "--output-dir",
        str(out),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not push '{out}' to the hub as 'someone/smoke-ppo' (OfflineModeIsEnabled")
    assert "the local outputs are complete and untouched" in last
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f"base_model: {smoke.resolve('smoke:policy')}" in card and "reward_model x 1" in card
    assert f"| `rewards/mean` | {summary['final_metrics']['rewards/mean']:.4g} |" in card
    recorded = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert recorded == json.loads(json.dumps(summary["config"]))  # the whole config, as the run used it
