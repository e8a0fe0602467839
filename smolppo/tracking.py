"""TensorBoard scalars and text samples, memory readings and the package versions of a run."""

from __future__ import annotations

import platform
import sys
import time
from contextlib import contextmanager

import torch


class MetricsWriter:
    """Scalars by name and samples as a markdown table, to TensorBoard and/or wandb / trackio (`report_to`).

    wandb and trackio are driven through their own ``init`` / ``log`` / ``finish``; the config check has already
    made sure they are installed."""

    def __init__(
        self,
        log_dir: str,
        purge_step: int | None = None,
        report_to=("tensorboard",),
        run_name=None,
        run_config: dict | None = None,
    ):
        import importlib

        self._writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
        self._trackers = []
        for name in ("wandb", "trackio"):
            if name in report_to:
                module = importlib.import_module(name)
                module.init(project="smolppo", name=run_name, config=run_config)
                self._trackers.append(module)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self._trackers:
            tracker.log(dict(metrics), step=step)
        if self._writer is None:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def samples(self, samples: list[dict], step: int) -> None:
        if not samples or self._writer is None:
            return
        rows = ["| prompt | response | reward |", "|---|---|---|"]
        for s in samples:
            cells = [_cell(s["prompt"]), _cell(s["response"]), f"{s['reward']:.4f}"]
            rows.append("| " + " | ".join(cells) + " |")
        self._writer.add_text("samples", "\n".join(rows), step)
        self._writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for tracker in self._trackers:
            tracker.finish()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak GPU allocator memory on CUDA, else the process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return int(info.peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_environment() -> dict:
    import accelerate
    import peft
    import transformers
    import trl

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    return env


class StageTimer:
    """Wall time per named stage, summed until `pop`; waits for the GPU so asynchronous work is counted."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """``{"time/<stage>": seconds}`` for every stage since the last pop, plus their sum."""
        out = {f"time/{name}": seconds for name, seconds in self.totals.items()}
        out["time/update_total"] = sum(self.totals.values())
        self.totals = {}
        return out
