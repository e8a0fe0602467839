"""train_reward_model.py: learns a learnable preference, scores the last real token, plugs into PPO and eval."""

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl.trainer.reward_trainer import DataCollatorForPreference

from smolppo.reward_modeling import distinct_pad_id, last_token_scores, split_pairs
from smolppo.scoring import TokenScorer
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
    assert summary["heldout"]["mean_margin"] > 0
    acc = EventAccumulator(str(reward_run / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "heldout/pairwise_accuracy" in tags and "heldout/mean_margin" in tags
    assert acc.Scalars("heldout/pairwise_accuracy")[-1].value == summary["heldout"]["pairwise_accuracy"]
    assert len([d for d in os.listdir(reward_run) if d.startswith("checkpoint-")]) == 1  # save_total_limit=1


def test_saved_model_scores_the_last_real_token(reward_run):
    """The classifier's own pooling (what RewardTrainer trains) reads the same token PPO reads: the final EOS."""
    model = AutoModelForSequenceClassification.from_pretrained(reward_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id != tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    sequences = [[40, 41, 42, eos], [50, 51, eos], [60, 61, 62, 63, 64, 65, eos]]
    batch = DataCollatorForPreference(pad_token_id=model.config.pad_token_id)(
        [{"chosen_ids": sequences[0], "rejected_ids": sequences[1]}, {"chosen_ids": sequences[2], "rejected_ids": [7]}]
    )
    with torch.no_grad():
        pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        ours = last_token_scores(TokenScorer(model), sequences, model.config.pad_token_id)
        # and reading before the EOS would give something else
        before_eos = last_token_scores(TokenScorer(model), [s[:-1] for s in sequences], model.config.pad_token_id)
    torch.testing.assert_close(pooled[[0, 2, 1]], ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, before_eos)


def test_pad_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2-style tokenizer
    assert distinct_pad_id(tokenizer) != tokenizer.eos_token_id


def test_split_is_seeded_and_disjoint():
    pairs = [{"chosen_ids": [i], "rejected_ids": [i + 100]} for i in range(20)]
    train, test = split_pairs(pairs, 0.25, seed=1)
    assert len(test) == 5 and len(train) == 15
    assert split_pairs(pairs, 0.25, seed=1) == (train, test)
    assert not {p["chosen_ids"][0] for p in train} & {p["chosen_ids"][0] for p in test}


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
