"""Does smolppo work on this machine? One command that says so, line by line, on the device you will train on.

    python -m smolppo.selfcheck                  # or, after pip install -e .: smolppo-selfcheck
    python -m smolppo.selfcheck --device cpu --output selfcheck.json

It prints the versions (Python, torch and its CUDA, transformers, accelerate, peft), the device and its compute
capability (whether this PyTorch build has kernels for it: an RTX 5090 is sm_120 and needs the cu128 build), and
whether bf16 is native there; then it runs, on that device, the smoke preset's tiny models for two updates each:
PPO in fp32 and bf16, full fine-tune and LoRA, GRPO, a resume, an evaluation, and two processes where two GPUs
exist. Each line is a pass or a failure with seconds per update and peak memory; everything goes to a JSON file
too. Each check runs as its own process, exactly as you would run the script. docs/SELFCHECK.md explains each line.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

SMOKE = ("--preset", "smoke", "--max-updates", "2", "--report-to", "none")
RUNS = {  # name: extra train_ppo.py flags
    "ppo-fp32-full": (),
    "ppo-bf16-full": ("--bf16",),
    "ppo-fp32-lora": ("--use-lora",),
    "ppo-bf16-lora": ("--use-lora", "--bf16"),
    "grpo-bf16": ("--advantage-estimator", "grpo", "--samples-per-prompt", "2", "--bf16"),
}
# vLLM rollouts (colocated, bf16) on the smoke policy with heads of 32 (vLLM's CPU minimum); skipped without vLLM
VLLM_RUN = ("--bf16", "--policy-model", "smoke:policy32", "--generation-backend", "vllm")
CHECKS = (*RUNS, "ppo-bf16-vllm", "resume", "evaluation", "two-processes")
PACKAGES = ("torch", "transformers", "accelerate", "peft", "trl", "safetensors")
CU128_FIX = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str = ""
    seconds_per_update: float | None = None
    peak_memory_bytes: int | None = None
    wall_s: float = 0.0


@dataclass
class Report:
    environment: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def as_dict(self) -> dict:
        passed = sum(c.ok is True for c in self.checks)
        return {
            "environment": self.environment,
            "checks": [asdict(c) for c in self.checks],
            "passed": passed,
            "failed": len(self.failed),
            "skipped": sum(c.ok is None for c in self.checks),
        }


# ---------------------------------------------------------------------------------------------- the machine
def environment(device: str) -> dict:
    """Versions, the device, its compute capability and whether this build can run on it, and native bf16."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_cuda": torch.version.cuda,
        **{name: _version(name) for name in PACKAGES},
        "device": device,
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"sm_{major}{minor}"
        env.update(
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            compute_capability=f"{major}.{minor}",
            arch=arch,
            build_archs=torch.cuda.get_arch_list(),
            bf16_native=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
        )
        env["build_problem"] = build_problem(arch, env["build_archs"], torch.version.cuda)
        env["kernel_runs"], env["kernel_error"] = _kernel_runs()
    else:
        from smolppo.distributed import cpu_has_fast_bf16

        env.update(device_name=platform.processor() or platform.machine(), device_count=1)
        env["bf16_native"] = cpu_has_fast_bf16()
    return env


def build_problem(arch: str, build_archs: list[str], cuda_version: str | None) -> str | None:
    """Why this PyTorch build cannot run on a GPU of `arch` (None when it has kernels for it)."""
    if arch in build_archs:
        return None
    fix = CU128_FIX if arch.startswith("sm_12") else "install a PyTorch build for your GPU (pytorch.org)"
    return (
        f"this PyTorch build (CUDA {cuda_version}, kernels for {', '.join(build_archs) or 'none'}) has no kernels "
        f"for {arch}; {fix}"
    )


def _kernel_runs() -> tuple[bool, str]:
    import torch

    try:
        x = torch.ones(64, 64, device="cuda")
        return bool(float((x @ x).sum()) == 64.0**3), ""
    except Exception as exc:  # noqa: BLE001 - "no kernel image is available" and friends
        return False, str(exc).strip().splitlines()[0][:200]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- the checks
def _script(name: str) -> str:
    """The path of one of the project's scripts (beside the package in a checkout, or installed as a module)."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"{name}.py")
    if os.path.isfile(beside):
        return beside
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name}.py is neither beside the smolppo package nor installed")
    return spec.origin


class Runner:
    """Runs each check as its own process on the chosen device, in a scratch folder."""

    def __init__(self, work: str, device: str, timeout: int):
        self.work, self.timeout = work, timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
        if device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even where a GPU exists

    def run(self, command: list[str]) -> tuple[bool, str, float]:
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=self.work,
                env=self.env,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            return False, f"no result within {self.timeout} s", time.perf_counter() - started
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        detail = "" if done.returncode == 0 else (lines[-1][:300] if lines else f"exit {done.returncode}")
        return done.returncode == 0, detail, time.perf_counter() - started

    def train(self, name: str, *flags: str, launcher: tuple[str, ...] = (), updates: int = 2) -> Check:
        out = os.path.join(self.work, name)
        ok, detail, wall = self.run(
            [*(launcher or (sys.executable,)), _script("train_ppo"), *SMOKE, "--output-dir", out, *flags]
        )
        return self.from_summary(name, out, ok, detail, wall, updates)

    @staticmethod
    def from_summary(name: str, out: str, ok: bool, detail: str, wall: float, updates: int = 2) -> Check:
        """The check of a finished run of `updates` updates, from its run_summary.json."""
        summary_path = os.path.join(out, "run_summary.json")
        if not ok or not os.path.isfile(summary_path):
            return Check(name, False, detail or "no run_summary.json written", wall_s=round(wall, 2))
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        metrics = summary.get("final_metrics", {})
        finite = all(isinstance(v, (int, float)) and v == v for k, v in metrics.items() if k != "grad_norm")
        status = summary.get("status") == "finished" and summary.get("updates") == updates and finite
        return Check(
            name,
            bool(status),
            "" if status else f"status {summary.get('status')}, {summary.get('updates')} updates, finite {finite}",
            seconds_per_update=round(metrics.get("time/update_total", float("nan")), 3),
            peak_memory_bytes=summary.get("peak_memory_bytes"),
            wall_s=round(wall, 2),
        )

    def resume(self) -> Check:
        out = os.path.join(self.work, "resume")
        first = self.train("resume", "--save-steps", "1", "--max-updates", "1", updates=1)
        if not first.ok:
            return Check("resume", False, f"first update: {first.detail}", wall_s=first.wall_s)
        ok, detail, wall = self.run(
            [sys.executable, _script("train_ppo"), *SMOKE, "--output-dir", out, "--resume-from-checkpoint", "latest"]
        )
        return self.from_summary("resume", out, ok, detail, wall + first.wall_s)

    def evaluation(self, model: str) -> Check:
        output = os.path.join(self.work, "evaluation.json")
        if not os.path.isfile(os.path.join(model, "run_summary.json")):
            return Check("evaluation", None, "no trained model to evaluate (ppo-fp32-full did not run)")
        ok, detail, wall = self.run(
            [
                sys.executable,
                _script("evaluate_generations"),
                "--model-path",
                model,
                "--num-prompts",
                "4",
                "--num-completions",
                "2",
                "--max-new-tokens",
                "8",
                "--output",
                output,
            ]
        )
        ok = ok and os.path.isfile(output)
        return Check("evaluation", ok, detail if not ok else "", wall_s=round(wall, 2))

    def two_processes(self, device_count: int, forced: bool) -> Check:
        if device_count < 2 and not forced:
            return Check("two-processes", None, "one device: needs two GPUs (or --two-processes on a CPU)")
        launcher = tuple(two_process_launcher())
        return self.train("two-processes", launcher=launcher)


def two_process_launcher() -> list[str]:
    """`accelerate launch` for two DDP processes on this machine (its torchrun launcher: accelerate's own `--cpu`
    starts one process unless MPI is installed; without CUDA the two form a gloo group on the CPU)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]


def run_checks(selected: list[str], device: str, device_count: int, work: str, timeout: int, forced: bool):
    """Yield each selected check's result as it finishes."""
    runner = Runner(work, device, timeout)
    for name in selected:
        if name in RUNS:
            yield runner.train(name, *RUNS[name])
        elif name == "ppo-bf16-vllm":
            installed = importlib.util.find_spec("vllm") is not None
            yield runner.train(name, *VLLM_RUN) if installed else Check(name, None, "vLLM not installed (README)")
        elif name == "resume":
            yield runner.resume()
        elif name == "evaluation":
            yield runner.evaluation(os.path.join(work, "ppo-fp32-full"))
        elif name == "two-processes":
            yield runner.two_processes(device_count, forced)


# ---------------------------------------------------------------------------------------------- printing
def marks() -> tuple[str, str, str]:
    """Pass, fail and skip marks this console can show (a cp1252 Windows console cannot show a check mark)."""
    try:
        "\u2714\u2718".encode(sys.stdout.encoding or "ascii")
        return "\u2714", "\u2718", "-"
    except (UnicodeEncodeError, LookupError):
        return "OK", "FAIL", "-"


def describe_environment(env: dict) -> list[str]:
    lines = [
        f"python {env['python']} on {env['platform']}",
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), transformers {env['transformers']}, accelerate "
        f"{env['accelerate']}, peft {env['peft']}, trl {env['trl']}",
    ]
    if env["device"] == "cuda":
        lines.append(
            f"device: {env['device_name']} x{env['device_count']}, compute capability {env['compute_capability']} "
            f"({env['arch']})"
        )
    else:
        lines.append(f"device: CPU ({env['device_name']})")
    lines.append(f"bf16: {'native' if env['bf16_native'] else 'not native (emulated: slower than fp32)'}")
    return lines


def check_line(check: Check, ok_mark: str, fail_mark: str, skip_mark: str) -> str:
    mark = skip_mark if check.ok is None else ok_mark if check.ok else fail_mark
    if check.ok is None:
        return f"{mark} {check.name:<14} skipped: {check.detail}"
    figures = []
    if check.seconds_per_update is not None:
        figures.append(f"{check.seconds_per_update:.2f} s/update")
    if check.peak_memory_bytes:
        figures.append(f"peak {check.peak_memory_bytes / 2**30:.2f} GiB")
    figures.append(f"{check.wall_s:.0f} s")
    text = f"{mark} {check.name:<14} " + ", ".join(figures)
    return text + (f"  ({check.detail})" if check.detail else "")


def environment_checks(env: dict) -> list[Check]:
    """The build and kernel lines (CUDA only): a build without kernels for this GPU fails every run after it."""
    if env["device"] != "cuda":
        return []
    return [
        Check("build", env["build_problem"] is None, env["build_problem"] or f"kernels for {env['arch']}"),
        Check("cuda-kernel", env["kernel_runs"], env["kernel_error"] or "a matmul ran on the GPU"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolppo.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if any")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--output", default="smolppo_selfcheck.json", help="the JSON report")
    parser.add_argument("--timeout", type=int, default=900, help="seconds each check may take")
    parser.add_argument("--two-processes", action="store_true", help="run the two-process check on one device too")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs' outputs in DIR (default: a deleted scratch)")
    args = parser.parse_args(argv)
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {','.join(CHECKS)}")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but this PyTorch ({torch.__version__}) sees no CUDA GPU; {CU128_FIX}")
    ok_mark, fail_mark, skip_mark = marks()
    report = Report(environment(device))
    print("smolppo self-check", flush=True)
    for line in describe_environment(report.environment):
        print(f"  {line}", flush=True)
    for check in environment_checks(report.environment):
        report.checks.append(check)
        print(check_line(check, ok_mark, fail_mark, skip_mark), flush=True)
    work = args.keep or tempfile.mkdtemp(prefix="smolppo-selfcheck-")
    os.makedirs(work, exist_ok=True)
    try:
        count = report.environment["device_count"]
        for check in run_checks(selected, device, count, work, args.timeout, args.two_processes):
            report.checks.append(check)
            print(check_line(check, ok_mark, fail_mark, skip_mark), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = report.as_dict()
    write_report(args.output, summary)
    print(f"report: {args.output}")
    print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped")
    return 1 if report.failed else 0


def write_report(path: str, summary: dict) -> None:
    """The JSON report, written whole or not at all."""
    from smolppo import filesystem

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    filesystem.replace(tmp, path)


def run() -> None:
    """The `smolppo-selfcheck` command after `pip install -e .`: the same as ``python -m smolppo.selfcheck``."""
    from smolppo.cli import tolerate_console_encoding

    tolerate_console_encoding()
    sys.exit(main())


if __name__ == "__main__":
    run()
