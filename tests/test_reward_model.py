"""train_reward_model.py: learns a learnable preference, scores the last real token, plugs into PPO and eval."""

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from smolppo.rewards.training import split_pairs
from tests.conftest import run_script


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, smoke_cache):
    out = tmp_path_factory.mktemp("rm") / "out"
    result = run_script("train_reward_model.py", "--preset", "smoke", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_held_out_accuracy_clearly_above_chance(reward_run):
    summary = json.loads((reward_run / "reward_model_summary.json").read_text())
    assert summary["heldout"]["num_pairs"] >= 20
    assert summary["heldout"]["pairwise_accuracy"] >= 0.8
    assert summary["heldout"]["margin"] > 0
    assert summary["reward_template"] == "chat"
    acc = EventAccumulator(str(reward_run / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "heldout/pairwise_accuracy" in tags and "heldout/margin" in tags
    assert acc.Scalars("heldout/pairwise_accuracy")[-1].value == summary["heldout"]["pairwise_accuracy"]
    assert len([d for d in os.listdir(reward_run) if d.startswith("checkpoint-")]) == 1  # save_total_limit=1


def test_saved_model_is_read_by_its_own_forward(reward_run):
    """PPO's reading of the saved model is the model's own forward on the chat-rendered conversation."""
    from smolppo.models import load_tokenizer
    from smolppo.rewards.reader import load_reward_reader
    from smolppo.smoke import load_smoke_rows

    model = AutoModelForSequenceClassification.from_pretrained(reward_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.eos_token_id  # kept as RewardTrainer leaves it (SmolLM2-style)
    reader = load_reward_reader(str(reward_run), None, load_tokenizer(str(reward_run)))
    rows = load_smoke_rows()[:5]
    ours = reader.score([(r["system"], r["question"]) for r in rows], [r["chosen"] for r in rows])
    with torch.no_grad():
        for row, score in zip(rows, ours):
            conversation = [{"role": "system", "content": row["system"]}] if row["system"] else []
            conversation += [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["chosen"]},
            ]
            inputs = tokenizer.apply_chat_template(conversation, return_dict=True, return_tensors="pt")
            torch.testing.assert_close(model(**inputs).logits[0, 0], score, atol=1e-4, rtol=1e-4)


def test_split_is_seeded_and_disjoint():
    pairs = [{"chosen_ids": [i], "rejected_ids": [i + 100]} for i in range(20)]
    train, test = split_pairs(pairs, 0.25, seed=1)
    assert len(test) == 5 and len(train) == 15
    assert split_pairs(pairs, 0.25, seed=1) == (train, test)
    assert not {p["chosen_ids"][0] for p in train} & {p["chosen_ids"][0] for p in test}


@pytest.mark.soak  # CI runs it after the README command
def test_trained_reward_model_drives_ppo_and_evaluation(reward_run, tmp_path):
    out = tmp_path / "ppo"
    result = run_script(
        "train_ppo.py",
        "--preset",
        "smoke",
        "--reward-model",
        str(reward_run),
        "--output-dir",
        str(out),
        "--max-updates",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report_path = tmp_path / "eval.json"
    result = run_script(
        "evaluate_generations.py",
        "--model-path",
        str(out),
        "--num-prompts",
        "3",
        "--num-completions",
        "2",
        "--max-new-tokens",
        "8",
        "--output",
        str(report_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["settings"]["resolved_reward_model"] == str(reward_run)  # taken from the PPO run's summary


@pytest.mark.soak  # CI runs it after the README command
def test_lora_reward_model_is_saved_merged(tmp_path):
    out = tmp_path / "rm_lora"
    result = run_script(
        "train_reward_model.py",
        "--preset",
        "smoke",
        "--use-lora",
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--eval-steps",
        "4",
        "--save-steps",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and not any("lora_" in n for n, _ in model.named_parameters())
