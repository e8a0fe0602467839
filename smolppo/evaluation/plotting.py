"""Read TensorBoard scalars into a long-form table and draw the training-progress figures (4 panels, and the
behaviour of the responses when the run logged it)."""

from __future__ import annotations

import logging
import os

import pandas as pd

from smolppo import files
from smolppo.errors import UserError

logger = logging.getLogger(__name__)

# Each panel takes, per run, the first of its tags that the run logged: ours first, then the names of
# transformers/trl Trainer runs (GRPO/RLOO/PPO trainers, RewardTrainer, which logs accuracy instead of a reward).
PANELS = [
    ("loss", "Training loss", ("loss", "train/loss")),
    ("learning_rate", "Learning rate", ("learning_rate", "train/learning_rate", "lr")),
    (
        "reward",
        "Mean reward per batch",
        (
            "rewards/mean",
            "train/reward",
            "reward",
            "train/objective/scores",
            "objective/scores",
            "train/accuracy",
            "eval/accuracy",
            "accuracy",
        ),
    ),
    ("kl", "KL divergence from reference", ("kl_divergence", "train/kl", "kl", "train/objective/kl", "objective/kl")),
]
# The second figure: what the responses look like (`smolppo.algorithm.behaviour`), for runs that logged them.
BEHAVIOUR_PANELS = [
    ("length", "Response length (tokens)", ("response/length_mean",)),
    ("truncated", "Share out of max_new_tokens", ("response/truncated_rate",)),
    ("diversity", "Distinct-2 over the batch", ("response/distinct_2",)),
    ("degenerate", "Share repeating a 3-gram 4+ times", ("response/degenerate_rate",)),
    ("kl_coef", "KL coefficient", ("objective/kl_coef",)),
    ("penalty", "KL penalty / score spread (above 1: it drowns the reward)", ("objective/kl_penalty_to_score",)),
]
COLUMNS = ["run", "tag", "step", "wall_time", "value"]
ALGORITHM_NAMES = {"gae": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}


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
    if os.path.basename(path) == files.LOGS_DIR:
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


def panel_tag(frame: pd.DataFrame, run: str, aliases: tuple[str, ...]) -> str | None:
    """The first of `aliases` that `run` logged, or None."""
    logged = set(frame.loc[frame["run"] == run, "tag"])
    return next((tag for tag in aliases if tag in logged), None)


def _run_config(directory: str) -> dict:
    """The config in the `run_summary.json` beside a run's logs ({} when there is none or it is unreadable)."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(directory)), files.RUN_SUMMARY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def kl_targets(runs: dict[str, str]) -> dict[str, float]:
    """The adaptive-KL target of each run whose `run_summary.json` (beside its logs) records one."""
    targets = {}
    for run, directory in runs.items():
        config = _run_config(directory)
        target = config.get("kl_target", config.get("target"))  # "target" in runs of earlier versions
        if config.get("adaptive_kl") and isinstance(target, (int, float)):
            targets[run] = float(target)
    return targets


def run_algorithms(runs: dict[str, str]) -> dict[str, str]:
    """``run -> "PPO" / "GRPO" / "RLOO" / "REINFORCE++"`` from each run's recorded advantage estimator."""
    names = {}
    for run, directory in runs.items():
        estimator = _run_config(directory).get("advantage_estimator")
        if estimator in ALGORITHM_NAMES:
            names[run] = ALGORITHM_NAMES[estimator]
    return names


def default_title(algorithms: dict[str, str], what: str = "training progress") -> str:
    """``"PPO training progress"``, ``"PPO and GRPO training progress"``; ``"Training progress"`` when unknown."""
    named = list(dict.fromkeys(algorithms.values()))
    if not named:
        return what[:1].upper() + what[1:]
    return (" and ".join(named) if len(named) <= 2 else ", ".join(named)) + " " + what


def plot_progress(
    frame: pd.DataFrame,
    weight: float = 0.0,
    title: str | None = None,
    targets=None,
    algorithms: dict[str, str] | None = None,
    panels=PANELS,
):
    """The figure of `panels`, two a row; returns ``(figure, [(run, panel title) that could not be filled])``.

    A panel whose values are one constant across every run (a constant learning rate) shows that value as a
    note instead of a flat line; `targets` (run -> KL target) adds dashed target lines to the KL panel;
    `algorithms` (run -> "PPO", "GRPO", ...) names each run's algorithm in the legend and the default title. A run
    with a single logged point is drawn as a marker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = algorithms or {}
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows))
    missing = []
    runs = list(dict.fromkeys(frame["run"]))
    for ax, (key, panel_title, aliases) in zip(axes.flat, panels):
        ax.set_title(panel_title)
        ax.set_xlabel("update / step")
        ax.grid(alpha=0.3)
        series = {}
        for run in runs:
            tag = panel_tag(frame, run, aliases)
            if tag is None:
                missing.append((run, panel_title))
                continue
            series[run] = (tag, frame[(frame["run"] == run) & (frame["tag"] == tag)])
        if not series:
            ax.text(
                0.5,
                0.5,
                f"no {' / '.join(aliases[:2])} scalar logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            continue
        ax.set_ylabel(", ".join(dict.fromkeys(tag for tag, _ in series.values())))
        values = pd.concat([data["value"] for _, data in series.values()])
        if len(values) > 1 and values.nunique() == 1:
            ax.text(
                0.5,
                0.5,
                f"constant {values.iloc[0]:.4g} in {', '.join(series)}",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            continue
        for run, (_, data) in series.items():
            label = f"{run} ({algorithms[run]})" if run in algorithms else run
            ax.plot(data["step"], smooth(data["value"], weight), label=label, marker="o" if len(data) == 1 else None)
        if key == "kl":
            for run, target in (targets or {}).items():
                if run in series:
                    ax.axhline(target, linestyle="--", linewidth=1, color="gray", label=f"target {target:g} ({run})")
        ax.legend(fontsize=8)
    title = title or default_title({run: algorithms[run] for run in runs if run in algorithms})
    fig.suptitle(f"{title}: {', '.join(runs)}" + (f" (smoothing {weight})" if weight else ""))
    fig.tight_layout()
    return fig, missing


def has_behaviour(frame: pd.DataFrame) -> bool:
    """Whether any run logged the behaviour scalars (runs from before they existed, or trl's, did not)."""
    tags = set(frame["tag"])
    return any(
        alias in tags for _, _, aliases in BEHAVIOUR_PANELS for alias in aliases if alias.startswith("response/")
    )
