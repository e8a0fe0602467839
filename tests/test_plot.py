"""plot_training_progress.py from a real run's event files and from hand-written partial logs."""

import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from smolppo.plotting import find_runs, plot_progress, read_scalars, smooth
from tests.conftest import run_script


def test_plots_a_real_smoke_run(smoke_run, tmp_path):
    png, csv = tmp_path / "p.png", tmp_path / "s.csv"
    result = run_script(
        "plot_training_progress.py",
        "--log-dir",
        str(smoke_run / "logs"),
        "--output",
        str(png),
        "--csv",
        str(csv),
        "--smooth",
        "0.6",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["run", "tag", "step", "wall_time", "value"]
    assert len(frame[frame["tag"] == "rewards/mean"]) == 40
    assert frame["run"].unique().tolist() == ["out"]
    figure, empty = plot_progress(read_scalars(find_runs([str(smoke_run / "logs")])))
    assert len(figure.axes) == 4 and empty == []
    assert all(len(ax.lines) == 1 for ax in figure.axes)


def test_partial_logs_and_several_runs(tmp_path):
    for run, tags in (("ppo", ["loss", "rewards/mean"]), ("grpo", ["rewards/mean", "other"])):
        writer = SummaryWriter(str(tmp_path / "runs" / run))
        for step in range(5):
            for tag in tags:
                writer.add_scalar(tag, step * 0.5, step)
        writer.close()
    frame = read_scalars(find_runs([str(tmp_path / "runs")]))
    assert sorted(frame["run"].unique()) == ["grpo", "ppo"] and len(frame) == 20
    figure, empty = plot_progress(frame)
    assert len(figure.axes) == 4 and empty == ["learning_rate", "kl_divergence"]
    reward_axis = figure.axes[2]
    assert len(reward_axis.lines) == 2 and reward_axis.get_legend() is not None
    result = run_script(
        "plot_training_progress.py", "--log-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "o.png")
    )
    assert result.returncode == 0 and (tmp_path / "o.png").exists() and (tmp_path / "training_scalars.csv").exists()
    assert "no 'kl_divergence' scalar" in result.stderr


def test_no_event_files_is_one_clear_line(tmp_path):
    result = run_script("plot_training_progress.py", "--log-dir", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no TensorBoard event files" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_smoothing_is_a_bias_corrected_ema():
    values = pd.Series([1.0, 3.0])
    assert smooth(values, 0.0).tolist() == [1.0, 3.0]
    # second value: (0.5*0.5*1 + 0.5*3) / (0.5*0.5 + 0.5) = 1.75 / 0.75
    assert smooth(values, 0.5).tolist() == pytest.approx([1.0, 1.75 / 0.75])
