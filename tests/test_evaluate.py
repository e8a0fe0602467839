"""evaluate_generations.py on real smoke outputs, and its statistics on hand-made numbers."""

import json
import math

import numpy as np
import pytest

from smolppo import smoke
from smolppo.evaluation.report import compare, rank_labels, resample_indices, summarise
from tests.conftest import run_script


def test_rank_labels():
    assert rank_labels([0.1, 0.9, 0.5, 0.3]) == ["WORST", "BEST", "MEDIUM", "MEDIUM"]
    assert rank_labels([1.0, 1.0]) == ["TIE", "TIE"]
    assert rank_labels([2.0, 2.0, 2.0, 2.0]) == ["TIE"] * 4  # equal rewards are ties, never BEST/WORST
    assert rank_labels([3.0, 1.0, 3.0, 2.0]) == ["BEST", "WORST", "BEST", "MEDIUM"]


def test_summarise_hand_computed():
    rewards = np.array([[1.0, 3.0], [2.0, 2.0]])
    every_prompt_once = np.array([[0, 1], [1, 0]])  # both resamples hold each prompt once: the interval is the mean
    s = summarise(rewards, np.array([[4, 6], [5, 5]]), np.array([[True, False], [True, True]]), every_prompt_once)
    assert s["reward_mean_ci95"] == [2.0, 2.0]
    assert s["reward_mean"] == 2.0 and s["reward_median"] == 2.0
    assert s["reward_min"] == 1.0 and s["reward_max"] == 3.0
    assert s["reward_std"] == pytest.approx(math.sqrt(2 / 3))
    assert s["per_prompt_spread_mean"] == 1.0 and s["response_length_mean"] == 5.0 and s["eos_rate"] == 0.75


def test_compare_counts_ties_apart_and_difference_of_means():
    model = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    base = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 3.0]])
    c = compare(model, base, resample_indices(3, 500, seed=0))
    assert (c["wins"], c["ties"], c["losses"]) == (1, 1, 1)
    assert c["win_rate"] == pytest.approx(1 / 3) and c["tie_rate"] == pytest.approx(1 / 3)
    assert c["mean_reward_difference"] == pytest.approx(model.mean() - base.mean())
    assert c["ci95"][0] <= c["mean_reward_difference"] <= c["ci95"][1]
    assert c["win_rate_ci95"][0] <= c["win_rate"] <= c["win_rate_ci95"][1]


def test_bootstrap_interval_hand_computed():
    from smolppo.evaluation.report import bootstrap_ci

    won = np.array([1.0, 0.0, 0.0])  # prompt 0 won, 1 and 2 lost
    draws = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])  # resampled means 1, 0, 0, 1/3
    low, high = bootstrap_ci(won, draws)
    # numpy's linear percentile over the sorted means [0, 0, 1/3, 1]: 2.5 % -> 0, 97.5 % -> 1/3 + 0.925 * 2/3
    assert low == 0.0 and high == pytest.approx(1 / 3 + 0.925 * 2 / 3)


def _evaluate(*args):
    result = run_script("evaluate_generations.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _check_report(report, num_prompts, num_completions):
    """Every prompt has its completions, finite rewards, and the ranks (tested by hand above) of its own rewards."""
    for model in report["models"]:
        completions = model["completions"]
        assert len(completions) == num_prompts * num_completions
        assert all(math.isfinite(c["reward"]) for c in completions)
        for p in range(num_prompts):
            own = sorted((c for c in completions if c["prompt_index"] == p), key=lambda c: c["completion_index"])
            assert [c["completion_index"] for c in own] == list(range(num_completions))
            rewards = [c["reward"] for c in own]
            assert [c["rank"] for c in own] == rank_labels(rewards)
            assert [c["tied"] for c in own] == [rewards.count(r) > 1 for r in rewards]


@pytest.mark.soak  # CI runs it after the README command
def test_evaluates_smoke_model_on_unseen_prompts_reproducibly(smoke_run, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for output in (first, second):
        result = _evaluate(
            "--model-path",
            str(smoke_run),
            "--num-prompts",
            "5",
            "--num-completions",
            "3",
            "--max-new-tokens",
            "12",
            "--output",
            str(output),
        )
        assert "mean" in result.stdout and str(smoke_run)[-20:] in result.stdout
    report = json.loads(first.read_text())
    _check_report(report, 5, 3)
    # The reward model and data come from the run's summary; training used rows 0..95.
    assert report["settings"]["resolved_reward_model"].endswith("reward")
    assert report["settings"]["skipped_rows"] == 96
    assert all(p["dataset_row"] >= 96 for p in report["prompts"])
    assert report["prompts"] == json.loads(second.read_text())["prompts"]
    assert report["models"][0]["completions"] == json.loads(second.read_text())["models"][0]["completions"]


def test_evaluates_lora_adapter_and_compares_with_baseline(lora_run, smoke_run, tmp_path):
    out = tmp_path / "cmp.json"
    _evaluate(
        "--model-path",
        str(lora_run),
        str(smoke_run),
        "--baseline-model",
        "smoke:policy",
        "--num-prompts",
        "4",
        "--num-completions",
        "2",
        "--max-new-tokens",
        "12",
        "--output",
        str(out),
    )
    report = json.loads(out.read_text())
    base = smoke.resolve("smoke:policy")  # smoke names are paths from parsing on
    assert [m["name"] for m in report["models"]] == [base, str(lora_run), str(smoke_run)]
    _check_report(report, 4, 2)
    means = {m["name"]: np.mean([c["reward"] for c in m["completions"]]) for m in report["models"]}
    assert len(report["comparisons"]) == 2
    for c in report["comparisons"]:
        assert c["baseline"] == base
        assert 0.0 <= c["win_rate"] <= 1.0 and c["wins"] + c["ties"] + c["losses"] == 4
        assert c["mean_reward_difference"] == pytest.approx(means[c["model"]] - means[base], abs=1e-6)


def test_directory_without_model_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_script(
        "evaluate_generations.py",
        "--model-path",
        str(tmp_path),
        "--reward-model",
        "smoke:reward",
        "--dataset",
        "smoke:orca",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no model" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
