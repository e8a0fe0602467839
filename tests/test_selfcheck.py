"""The self-check a user runs on their own machine (`python -m smolppo.selfcheck`): it runs here on the CPU; the
same checks on a GPU are `pytest -m gpu` (tests/test_gpu.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from smolppo.selfcheck import CHECKS, CU128_FIX, Runner, build_problem
from tests.conftest import REPO


def selfcheck(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "smolppo.selfcheck", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.soak  # CI runs it after the README command (with the whole self-check below)
def test_a_training_run_passes_on_this_cpu(tmp_path):
    report_path = tmp_path / "selfcheck.json"
    result = selfcheck("--device", "cpu", "--checks", "ppo-fp32-full", "--output", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [("ppo-fp32-full", True)]
    run = report["checks"][0]
    assert run["seconds_per_update"] > 0 and run["peak_memory_bytes"] > 0
    assert result.stdout.strip().splitlines()[-1] == "1 passed, 0 failed, 0 skipped"
    assert "\u2714 ppo-fp32-full" in result.stdout and "s/update" in result.stdout


def test_a_failing_check_is_a_cross_and_exit_1_on_a_cp1252_console(tmp_path):
    result = selfcheck(
        "--device",
        "cpu",
        "--checks",
        "ppo-fp32-full,two-processes",
        "--timeout",
        "1",
        "--output",
        str(tmp_path / "r.json"),
        env={"PYTHONIOENCODING": "cp1252"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL ppo-fp32-full") and "no result within 1 s" in line for line in lines)
    assert any(line.startswith("- two-processes") and "skipped" in line for line in lines)
    assert lines[-1] == "0 passed, 1 failed, 1 skipped"


def test_an_unknown_check_is_refused():
    result = selfcheck("--checks", "ppo,warp-drive")
    assert result.returncode == 2 and "unknown checks ['ppo', 'warp-drive']" in result.stderr


def test_a_build_without_kernels_for_the_gpu_says_which_build_to_install():
    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    problem = build_problem("sm_120", cu126, "12.6")
    assert "no kernels for sm_120" in problem and CU128_FIX in problem
    assert build_problem("sm_120", [*cu126, "sm_100", "sm_120"], "12.8") is None
    assert "pytorch.org" in build_problem("sm_37", cu126, "12.6")


def test_a_run_without_a_summary_fails_its_check(tmp_path):
    check = Runner.from_summary("ppo-fp32-full", str(tmp_path), True, "", 1.0)
    assert check.ok is False and "no run_summary.json" in check.detail


@pytest.mark.soak  # CI runs it after the README command: every check, two CPU processes included (about 2 min)
def test_every_check_passes_on_this_cpu(tmp_path):
    report_path = tmp_path / "selfcheck.json"
    result = selfcheck("--device", "cpu", "--two-processes", "--output", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    without_vllm = importlib.util.find_spec("vllm") is None  # its check is skipped, not failed
    assert report["passed"] == 9 - without_vllm and report["failed"] == 0 and report["skipped"] == without_vllm
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
