"""Read TensorBoard scalars into a long-form table and draw the 4-panel training-progress figure."""

from __future__ import annotations

import logging
import os

import pandas as pd

from smolppo.errors import UserError

logger = logging.getLogger(__name__)

PANELS = [
    ("loss", "Training loss", "loss"),
    ("learning_rate", "Learning rate", "learning rate"),
    ("rewards/mean", "Mean reward per batch", "reward"),
    ("kl_divergence", "KL divergence from reference", "KL (nats)"),
]
COLUMNS = ["run", "tag", "step", "wall_time", "value"]


def _has_events(directory: str) -> bool:
    return any(name.startswith("events.out.tfevents") for name in os.listdir(directory))


def find_runs(log_dirs: list[str]) -> dict[str, str]:
    """Map run name -> directory holding event files. A directory without events is searched for runs below it."""
    runs: dict[str, str] = {}
    for log_dir in log_dirs:
        if not os.path.isdir(log_dir):
            raise UserError(f"log directory {log_dir!r} does not exist; pass --log-dir <output_dir>/logs")
        found = [root for root, _, _ in sorted(os.walk(log_dir)) if _has_events(root)]
        if not found:
            raise UserError(f"no TensorBoard event files under {log_dir!r}; pass --log-dir <output_dir>/logs")
        for directory in found:
            runs[_run_name(log_dir, directory, multiple=len(found) > 1)] = directory
    return runs


def _run_name(log_dir: str, directory: str, multiple: bool) -> str:
    if multiple:
        return os.path.relpath(directory, log_dir)
    path = os.path.abspath(directory)
    if os.path.basename(path) == "logs":
        path = os.path.dirname(path)
    return os.path.basename(path)


def read_scalars(runs: dict[str, str]) -> pd.DataFrame:
    """Every scalar of every run in long form: run, tag, step, wall_time, value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = []
    for run, directory in runs.items():
        acc = EventAccumulator(directory, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            records.extend((run, tag, e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    if frame.empty:
        raise UserError(f"the event files in {sorted(runs.values())} hold no scalars; nothing to plot")
    return frame.sort_values(["run", "tag", "step"], kind="stable").reset_index(drop=True)


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard-style exponential moving average (bias-corrected); weight 0 returns the values."""
    if weight <= 0:
        return values
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return pd.Series(out, index=values.index)


def plot_progress(frame: pd.DataFrame, weight: float = 0.0, title: str = "PPO training progress"):
    """The 4-panel figure; returns ``(figure, names of empty panels)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    empty = []
    runs = list(dict.fromkeys(frame["run"]))
    for ax, (tag, panel_title, ylabel) in zip(axes.flat, PANELS):
        subset = frame[frame["tag"] == tag]
        ax.set_title(panel_title)
        ax.set_xlabel("PPO update")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if subset.empty:
            empty.append(tag)
            ax.text(0.5, 0.5, f"no '{tag}' scalar logged", ha="center", va="center", transform=ax.transAxes)
            continue
        for run in runs:
            data = subset[subset["run"] == run]
            if not data.empty:
                ax.plot(data["step"], smooth(data["value"], weight), label=run)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title + (f" (smoothing {weight})" if weight else ""))
    fig.tight_layout()
    return fig, empty
