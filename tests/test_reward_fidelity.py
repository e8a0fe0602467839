"""Reward fidelity on an artifact made by another tool: a reward model trained here by trl's `RewardTrainer` on
conversational pairs, with its own tokenizer (another vocabulary than the policy's, pad == EOS == <|im_end|>,
SmolLM2's chat template). PPO, its start-up check and evaluation must read it exactly as the model itself does."""

import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from smolppo import smoke
from smolppo.rewards.reader import load_reward_reader
from smolppo.smoke import load_smoke_rows
from tests.conftest import run_script

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversation(row, answer):
    messages = [{"role": "system", "content": row["system"]}] if row["system"] else []
    return messages + [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}]


def build_tokenizer(out_dir):
    """A byte-level BPE of another size than the policy's (400 vs 320 tokens), SmolLM2 conventions."""
    smoke.build_tokenizer(str(out_dir), vocab_size=400, chat_template=SMOLLM2_TEMPLATE)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def trl_reward_model(tmp_path_factory):
    """Train a tiny Llama reward model with RewardTrainer on every smoke row, conversational format."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    out = tmp_path_factory.mktemp("trl_rm")
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    rows = load_smoke_rows()
    data = Dataset.from_list(
        [
            {
                "prompt": conversation(r, "")[:-1],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    args = RewardConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=16,
        num_train_epochs=6,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(model_dir)
    return model_dir


def own_reading(model, tokenizer, row, answer) -> float:
    """How the model itself reads a conversation: its tokenizer's chat template and its own pooling."""
    inputs = tokenizer.apply_chat_template(conversation(row, answer), return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return float(model(**inputs).logits[0, 0])


def test_reward_trainer_model_fixture_is_what_users_have(trl_reward_model, tokenizer):
    rm_tokenizer = AutoTokenizer.from_pretrained(trl_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(trl_reward_model)
    assert rm_tokenizer.pad_token_id == rm_tokenizer.eos_token_id == model.config.pad_token_id
    assert rm_tokenizer.get_vocab() != tokenizer.get_vocab()  # another vocabulary than the smoke policy


def test_our_rewards_equal_the_models_own_reading(trl_reward_model, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(trl_reward_model).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(trl_reward_model)
    reader = load_reward_reader(str(trl_reward_model), None, tokenizer, batch_size=8)
    rows = load_smoke_rows()[:30]
    prompts = [(r["system"], r["question"]) for r in rows]
    chosen = reader.score(prompts, [r["chosen"] for r in rows])
    rejected = reader.score(prompts, [r["rejected"] for r in rows])
    expected_chosen = torch.tensor([own_reading(model, rm_tokenizer, r, r["chosen"]) for r in rows])
    expected_rejected = torch.tensor([own_reading(model, rm_tokenizer, r, r["rejected"]) for r in rows])
    torch.testing.assert_close(chosen, expected_chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, expected_rejected, atol=1e-4, rtol=0)
    assert (chosen > rejected).all()  # 30/30 pairs ranked as the model ranks them


def _summary(out):
    return json.loads((out / "run_summary.json").read_text())


def test_ppo_checks_then_trains_against_it(trl_reward_model, tmp_path, smoke_paths):
    out = tmp_path / "ppo"
    result = run_script(
        "train_ppo.py",
        "--preset",
        "smoke",
        "--reward-model",
        str(trl_reward_model),
        "--output-dir",
        str(out),
        "--max-updates",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check = _summary(out)["reward_model_check"]
    # the 32 rows after the training rows, less the 2 whose prompt exceeds --max-prompt-length (128) as in training
    assert check["pairwise_accuracy"] > 0.9 and check["num_pairs"] == 30 and check["margin"] > 0
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert events.Scalars("reward_model/pairwise_accuracy")[0].value == pytest.approx(check["pairwise_accuracy"])
    assert [e.step for e in events.Scalars("rewards/mean")] == [1, 2, 3]
    # Another vocabulary: the value model is the policy's body with a fresh head, over the policy's tokens.
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.get_input_embeddings().num_embeddings == AutoTokenizer.from_pretrained(out).vocab_size

    report_path = tmp_path / "eval.json"
    result = run_script(
        "evaluate_generations.py",
        "--model-path",
        str(out),
        *"--num-prompts 3 --num-completions 2 --max-new-tokens 10 --output".split(),
        str(report_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["settings"]["resolved_reward_model"] == str(trl_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(trl_reward_model).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(trl_reward_model)
    rows = load_smoke_rows()
    for completion in report["models"][0]["completions"]:
        row = rows[completion["dataset_row"]]
        expected = own_reading(model, rm_tokenizer, row, completion["text"])
        assert completion["reward"] == pytest.approx(expected, abs=1e-4)


# A template written for ShareGPT role names: it renders none of the user/assistant turns the model was trained on.
WRONG_TEMPLATE = (
    "### Conversation\n{% for m in messages %}{% if m['role'] == 'human' %}Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'gpt' %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


@pytest.mark.soak  # CI runs it after the README command
def test_wrong_template_is_caught_by_the_start_up_check(trl_reward_model, tmp_path):
    out = tmp_path / "wrong"
    flags = ["--preset", "smoke", "--reward-model", str(trl_reward_model), "--reward-template", WRONG_TEMPLATE]
    result = run_script("train_ppo.py", *flags, "--output-dir", str(out), "--max-updates", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(out)["reward_model_check"]["pairwise_accuracy"] < 0.6
    assert "probably not being read as it was trained" in result.stderr and "--reward-template" in result.stderr

    refused_dir = tmp_path / "refused"
    result = run_script("train_ppo.py", *flags, "--output-dir", str(refused_dir), "--min-reward-accuracy", "0.9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: reward model pairwise accuracy")
    assert "Traceback" not in result.stderr
    assert not refused_dir.exists()


def test_reward_model_without_chat_template_needs_a_flag(trl_reward_model, tmp_path):
    rm = tmp_path / "rm_no_template"
    shutil.copytree(trl_reward_model, rm)
    (rm / "chat_template.jinja").unlink(missing_ok=True)
    config_path = rm / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(rm).chat_template
    out = tmp_path / "out"
    result = run_script("train_ppo.py", "--preset", "smoke", "--reward-model", str(rm), "--output-dir", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward model") and "no chat template" in last and "--reward-template" in last
    assert not out.exists()
