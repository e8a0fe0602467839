"""The benchmark runs the real trainer on a model shape built from scratch and reports every stage."""

import json

from tests.conftest import run_script


def test_benchmark_reports_throughput_stages_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/bench_ppo.py",
        "--timed-updates",
        "2",
        "--response-length",
        "8",
        "--prompt-length",
        "16",
        "--rollout-batch-size",
        "8",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for line in ("episodes/s", "generated tokens/s", "rollout", "reward", "reference_logprobs", "values", "update"):
        assert line in result.stdout
    stages = report["stage_seconds"]
    assert set(stages) >= {"rollout", "reward", "policy_logprobs", "reference_logprobs", "values", "update"}
    assert all(seconds > 0 for seconds in stages.values())
    assert report["response_length_measured"] == 8  # the benchmark's fixed work was really generated
    assert report["peak_memory_bytes"] > 100 * 2**20  # a process peak RSS, not a placeholder


def test_benchmark_without_a_critic_has_no_value_stage(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--timed-updates", "1", "--response-length", "8", "--prompt-length", "16", "--rollout-batch-size", "4"]
    result = run_script("benchmarks/bench_ppo.py", *flags, "--advantage-estimator", "grpo", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["samples_per_prompt"] == 4  # grpo's default group
    assert "values" not in report["stage_seconds"]
    assert report["response_length_measured"] == 8
