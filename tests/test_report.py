"""`evaluate_generations.py --report`: its maths on hand-built tensors, and every number of a real smoke report
recomputed here from the models themselves (plain `transformers` forward passes, no project code)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from smolppo.evaluation.capability import perplexity, token_kl
from tests.conftest import run_script

TEMPERATURE = 0.7


def test_token_kl_hand_computed():
    # Position 0: p = (1/2, 1/2), q = (1/4, 3/4). Position 1 is masked out and must not count.
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    baseline = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert_close(token_kl(logits, baseline, torch.tensor([[1.0, 0.0]])), torch.tensor([expected]))
    assert_close(token_kl(logits, logits, torch.ones(1, 2)), torch.zeros(1))  # a model is at KL 0 from itself


def test_perplexity_hand_computed():
    assert perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)  # two tokens each at probability 1/4
    assert math.isnan(perplexity(0.0, 0))


@pytest.fixture(scope="module")
def smoke_report(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    result = run_script(
        "evaluate_generations.py",
        *("--baseline-model", "smoke:policy", "--model-path", str(smoke_run), "--report", str(out)),
        *("--num-prompts", "4", "--num-completions", "3", "--max-new-tokens", "12", "--reference-max-tokens", "24"),
        *("--temperature", str(TEMPERATURE), "--report-examples", "2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def _models(smoke_paths, smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = AutoModelForCausalLM.from_pretrained
    models = {smoke_paths["policy"]: load(smoke_paths["policy"]).eval(), str(smoke_run): load(str(smoke_run)).eval()}
    return models, AutoTokenizer.from_pretrained(str(smoke_run))


def _prompt_ids(tokenizer, row: dict) -> list[int]:
    messages = ([{"role": "system", "content": row["system"]}] if row["system"].strip() else []) + [
        {"role": "user", "content": row["question"]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_report_numbers_recomputed_from_the_models(smoke_report, smoke_paths, smoke_run):
    out, report = smoke_report
    models, tokenizer = _models(smoke_paths, smoke_run)
    rows = [json.loads(line) for line in open(smoke_paths["orca"], encoding="utf-8")]
    prompts = {p["prompt_index"]: _prompt_ids(tokenizer, rows[p["dataset_row"]]) for p in report["prompts"]}
    eos = tokenizer.eos_token_id
    for entry in report["models"]:
        model, s = models[entry["name"]], entry["summary"]
        # Capability: log-likelihood of each held-out row's `chosen` answer (cut at 24 tokens, EOS when it fits).
        total, tokens = 0.0, 0
        for p in report["prompts"]:
            answer = tokenizer(rows[p["dataset_row"]]["chosen"].strip(), add_special_tokens=False)["input_ids"]
            answer = (answer + [eos] if len(answer) < 24 else answer)[:24]
            ids = prompts[p["prompt_index"]] + answer
            logp = torch.log_softmax(_logits(model, ids)[len(ids) - len(answer) - 1 : -1], -1)
            value = logp.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            assert entry["reference_logprobs"][p["prompt_index"]] == pytest.approx(value, abs=2e-3)
            total, tokens = total + value, tokens + len(answer)
        assert s["num_reference_tokens"] == tokens
        assert s["reference_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-4)
        # Preference and behaviour from the completions alone.
        completions = entry["completions"]
        rewards = np.array([c["reward"] for c in completions])
        assert s["reward_mean"] == pytest.approx(rewards.mean())
        assert s["reward_mean_ci95"][0] <= s["reward_mean"] <= s["reward_mean_ci95"][1]
        responses = [c["token_ids"] for c in completions]
        assert [len(t) + c["ended_with_eos"] for t, c in zip(responses, completions)] == [
            c["length"] for c in completions
        ]
        bigrams = [tuple(t[i : i + 2]) for t in responses for i in range(len(t) - 1)]
        assert s["distinct_1"] == pytest.approx(len({x for t in responses for x in t}) / sum(map(len, responses)))
        assert s["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
        degenerate = [
            bool(t) and max(Counter(tuple(t[i : i + 3]) for i in range(len(t) - 2)).values(), default=0) >= 4
            for t in responses
        ]
        assert s["degenerate_rate"] == pytest.approx(np.mean(degenerate))
        assert s["truncated_rate"] == pytest.approx(np.mean([not c["ended_with_eos"] for c in completions]))
        assert s["eos_rate"] == pytest.approx(np.mean([c["ended_with_eos"] for c in completions]))
        assert s["response_length_mean"] == pytest.approx(np.mean([c["length"] for c in completions]))
        repeats = [
            (len(grams) - len(set(grams))) / len(grams)
            if (grams := [tuple(t[i : i + 3]) for i in range(len(t) - 2)])
            else 0.0
            for t in responses
        ]
        assert s["repeated_3gram_share"] == pytest.approx(np.mean(repeats))
        low, high = s["reward_mean_ci95"]  # the bootstrap of the per-prompt means, with the report's draws
        draws = np.random.default_rng(42).integers(0, 4, size=(2000, 4))
        per_prompt = np.array(
            [np.mean([c["reward"] for c in completions if c["prompt_index"] == i]) for i in range(4)]
        )
        means = per_prompt[draws].mean(1)
        assert (low, high) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    # KL of the trained model from the baseline, on the trained model's own completions, at the sampling temperature.
    trained = report["models"][1]
    kls = []
    for c in trained["completions"]:
        response = c["token_ids"] + ([eos] if c["ended_with_eos"] else [])
        ids = prompts[c["prompt_index"]] + response
        span = slice(len(ids) - len(response) - 1, len(ids) - 1)
        p = torch.log_softmax(_logits(models[trained["name"]], ids)[span] / TEMPERATURE, -1)
        q = torch.log_softmax(_logits(models[report["models"][0]["name"]], ids)[span] / TEMPERATURE, -1)
        kls.append((p.exp() * (p - q)).sum().item())
        assert c["kl_to_baseline"] == pytest.approx(kls[-1], rel=1e-3, abs=1e-3)
    assert trained["summary"]["kl_to_baseline_mean"] == pytest.approx(np.mean(kls), rel=1e-3)
    assert "kl_to_baseline_mean" not in report["models"][0]["summary"]  # the baseline is the reference point
    # Win rate: prompts where the trained model's mean reward beats the baseline's.
    per_prompt = {
        m["name"]: np.array(
            [np.mean([c["reward"] for c in m["completions"] if c["prompt_index"] == i]) for i in range(4)]
        )
        for m in report["models"]
    }
    (comparison,) = report["comparisons"]
    wins = int((per_prompt[trained["name"]] > per_prompt[report["models"][0]["name"]]).sum())
    assert comparison["wins"] == wins and comparison["win_rate"] == wins / 4


def test_report_markdown_and_figures(smoke_report, smoke_run):
    import matplotlib.image

    out, report = smoke_report
    assert sorted(p.name for p in out.iterdir()) == [
        "lengths.png",
        "report.json",
        "report.md",
        "reward_vs_kl.png",
        "reward_vs_perplexity.png",
    ]
    for figure in ("lengths.png", "reward_vs_kl.png", "reward_vs_perplexity.png"):
        image = matplotlib.image.imread(out / figure)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0  # a drawn figure, not a blank one
    text = (out / "report.md").read_text()
    for section in ("## Preference adherence", "## Capability kept", "## Behaviour", "## Trade-off"):
        assert section in text
    trained = report["models"][1]["summary"]
    assert f"{trained['reference_perplexity']:.3f}" in text and f"{trained['kl_to_baseline_mean']:.3f}" in text
    assert text.count("### Prompt ") == 2 and text.count("*best, reward") == 2 * 2  # 2 prompts x 2 models
    best = max((c for c in report["models"][1]["completions"] if c["prompt_index"] == 0), key=lambda c: c["reward"])
    assert f"*best, reward {best['reward']:.3f}" in text


def test_report_into_a_file_is_one_line_and_keeps_the_file(tmp_path, smoke_run):
    target = tmp_path / "notes.md"
    target.write_text("mine")
    result = run_script("evaluate_generations.py", "--model-path", str(smoke_run), "--report", str(target))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file" in result.stderr.strip().splitlines()[-1]
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]
