"""The benchmark runs the real trainer on a model shape built from scratch and reports every stage."""

import importlib.util
import json
import os
import subprocess

import pytest

from tests.conftest import REPO, run_script


def test_benchmark_reports_throughput_stages_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        *"benchmarks/bench_ppo.py --timed-updates 2 --response-length 8 --prompt-length 16".split(),
        *"--rollout-batch-size 8 --output".split(),
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


def test_static_generation_cache_is_used_and_changes_no_number(monkeypatch, fresh_accelerator_state):
    """The GPU check's static-cache case: the benchmark really generates with a StaticCache, and on CPU (where
    transformers compiles nothing) the run's numbers equal the dynamic cache's."""
    import transformers.cache_utils as cache_utils

    monkeypatch.syspath_prepend(f"{REPO}/benchmarks")
    import bench_ppo

    built = []
    original = cache_utils.StaticCache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.StaticCache, "__init__", counting_init)
    small = dict(warmup_updates=0, timed_updates=1, response_length=4, prompt_length=16, rollout_batch_size=8)
    dynamic = bench_ppo.run(bench_ppo.BenchConfig(**small, ppo_epochs=1))
    assert not built
    static = bench_ppo.run(bench_ppo.BenchConfig(**small, ppo_epochs=1, generation_cache="static"))
    assert len(built) == 1 and static["config"]["generation_cache"] == "static"
    assert static["response_length_measured"] == 4
    assert static["fingerprint"] == dynamic["fingerprint"]


@pytest.mark.soak
def test_gpu_check_script_runs_its_cases(tmp_path):
    """benchmarks/gpu_check.sh, the one command a session with a lent GPU runs, tried on CPU (its dry run): the
    self-check first, then every case exits 0 and leaves its JSON (a log only on failure), within the device
    tool's 8 files; the vLLM case where vLLM is installed, else a line saying it was skipped."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_WHEELS": str(tmp_path / "none")}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    with_vllm = importlib.util.find_spec("vllm") is not None
    cases = ("full", "lora", "static", "vllm") if with_vllm else ("full", "lora", "static")
    assert names == sorted(["environment.log", "selfcheck.json", *(f"bench_{c}.json" for c in cases)])
    assert with_vllm or "== vllm: skipped (vLLM is not installed here" in result.stdout
    assert len(names) <= 8
    reports = {c: json.loads((out / f"bench_{c}.json").read_text()) for c in cases}
    assert reports["lora"]["config"]["use_lora"] and reports["static"]["config"]["generation_cache"] == "static"
    assert not with_vllm or reports["vllm"]["config"]["generation_backend"] == "vllm"
    assert all(r["config"]["bf16"] and r["response_length_measured"] == 8 for r in reports.values())
    environment = (out / "environment.log").read_text(encoding="utf-8")
    assert "torch " in environment and "2 passed, 0 failed, 0 skipped" in environment  # the self-check came first
    assert json.loads((out / "selfcheck.json").read_text(encoding="utf-8"))["failed"] == 0


def test_seed_spread_summary_pairs_variants_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(f"{REPO}/benchmarks")
    import smoke_seed_spread as spread

    assert spread.parse_variant("sdpa") == ("sdpa", 0.0) and spread.parse_variant("eager+1e-6") == ("eager", 1e-6)
    runs = [
        {"variant": v, "seed": s, "gain": g}
        for v, s, g in [("a", 1, 0.2), ("a", 2, 0.4), ("a", 3, 0.1), ("b", 1, 0.3), ("b", 2, 0.6), ("b", 3, 0.1)]
    ]
    text = spread.summary(runs, ["a", "b"], [1, 2, 3])
    assert "0.233" in text and "0.333" in text  # means
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, t = 0.1 / (0.1 / sqrt 3) = 1.73
    assert "b - a: mean +0.100, 2/3 higher, paired t +1.73" in text
    assert text.splitlines()[1].split()[4] == "1"  # one run of a below 0.15
