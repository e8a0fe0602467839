"""plot_training_progress.py from a real run's event files and from hand-written partial logs."""

import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from smolppo.evaluation.plotting import (
    BEHAVIOUR_PANELS,
    default_title,
    find_runs,
    has_behaviour,
    kl_targets,
    plot_progress,
    read_scalars,
    run_algorithms,
    smooth,
)
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
    runs = find_runs([str(smoke_run / "logs")])
    figure, missing = plot_progress(read_scalars(runs), targets=kl_targets(runs))
    assert len(figure.axes) == 4 and missing == []
    loss, lr, reward, kl = figure.axes
    assert len(loss.lines) == 1 and len(reward.lines) == 1
    assert not lr.lines and "constant 0.003 in out" in lr.texts[0].get_text()  # the smoke LR is constant
    assert len(kl.lines) == 2 and kl.lines[1].get_ydata()[0] == 10.0  # the KL target (10 here), from run_summary.json
    assert "out" in figure._suptitle.get_text()


def test_partial_logs_and_several_runs(tmp_path):
    for run, tags in (("ppo", ["loss", "rewards/mean"]), ("grpo", ["rewards/mean", "other"])):
        writer = SummaryWriter(str(tmp_path / "runs" / run))
        for step in range(5):
            for tag in tags:
                writer.add_scalar(tag, step * 0.5, step)
        writer.close()
    frame = read_scalars(find_runs([str(tmp_path / "runs")]))
    assert sorted(frame["run"].unique()) == ["grpo", "ppo"] and len(frame) == 20
    figure, missing = plot_progress(frame)
    assert len(figure.axes) == 4
    assert missing == [
        ("grpo", "Training loss"),
        ("grpo", "Learning rate"),
        ("ppo", "Learning rate"),
        ("grpo", "KL divergence from reference"),
        ("ppo", "KL divergence from reference"),
    ]
    reward_axis = figure.axes[2]
    assert len(reward_axis.lines) == 2 and reward_axis.get_legend() is not None
    result = run_script(
        "plot_training_progress.py", "--log-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "o.png")
    )
    assert result.returncode == 0 and (tmp_path / "o.png").exists() and (tmp_path / "training_scalars.csv").exists()
    assert "run grpo logged no scalar for the 'Training loss' panel" in result.stderr


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


def _trainer_style_run(directory, tags):
    writer = SummaryWriter(str(directory))
    for step in range(1, 6):
        for tag in tags:
            writer.add_scalar(tag, 1.0 / step if tag != "train/learning_rate" else 1e-5 * (6 - step), step)
    writer.close()


def test_trl_trainer_runs_fill_the_panels_alone_and_beside_a_ppo_run(smoke_run, tmp_path):
    grpo = tmp_path / "grpo_out" / "logs"
    _trainer_style_run(grpo, ["train/loss", "train/reward", "train/kl", "train/learning_rate"])
    figure, missing = plot_progress(read_scalars(find_runs([str(grpo)])))
    assert missing == []
    for ax in figure.axes:  # a line, or the note of a constant (no response of the smoke run degenerates)
        assert len(ax.lines) == 1 or ax.texts[0].get_text().startswith("constant 0 in out"), ax.get_title()
    assert len(figure.axes[2].lines) == 1  # distinct-2 moves
    both = find_runs([str(smoke_run / "logs"), str(grpo)])
    figure, missing = plot_progress(read_scalars(both))
    assert missing == [] and all(len(ax.lines) == 2 for ax in figure.axes)
    assert [line.get_label() for line in figure.axes[2].lines] == ["grpo_out", "out"]


def test_a_reward_trainer_run_plots_accuracy_and_warns_for_kl(tmp_path):
    rm = tmp_path / "rm" / "logs"
    _trainer_style_run(rm, ["train/loss", "train/accuracy", "train/learning_rate"])
    result = run_script("plot_training_progress.py", "--log-dir", str(rm), "--output", str(tmp_path / "rm.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run rm logged no scalar for the 'KL divergence from reference' panel" in result.stderr
    figure, missing = plot_progress(read_scalars(find_runs([str(rm)])))
    assert figure.axes[2].get_ylabel() == "train/accuracy" and len(figure.axes[2].lines) == 1


def test_titles_and_legends_name_the_algorithm_and_a_single_point_shows(tmp_path):
    """A GRPO run is not titled 'PPO training progress'; a run with one logged update is still visible."""
    import json

    for run, estimator, steps in (("a", "grpo", 1), ("b", "gae", 3)):
        out = tmp_path / "runs" / run
        writer = SummaryWriter(str(out / "logs"))
        for step in range(1, steps + 1):
            for tag in ("loss", "rewards/mean", "response/distinct_2", "response/length_mean"):
                writer.add_scalar(tag, 0.1 * step, step)
        writer.close()
        (out / "run_summary.json").write_text(json.dumps({"config": {"advantage_estimator": estimator}}))
    single = {"a": str(tmp_path / "runs" / "a" / "logs")}
    figure, _ = plot_progress(read_scalars(single), algorithms=run_algorithms(single))
    assert figure._suptitle.get_text().startswith("GRPO training progress")
    reward = figure.axes[2]
    assert reward.lines[0].get_marker() == "o" and len(reward.lines[0].get_xdata()) == 1
    assert reward.get_legend().get_texts()[0].get_text() == "a (GRPO)"
    result = run_script(
        "plot_training_progress.py",
        "--log-dir",
        single["a"],
        str(tmp_path / "runs" / "b" / "logs"),
        "--output",
        str(tmp_path / "both.png"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "both_behaviour.png").read_bytes()[:4] == b"\x89PNG"
    assert "both_behaviour.png" in result.stderr
    both = {"a": single["a"], "b": str(tmp_path / "runs" / "b" / "logs")}
    assert default_title(run_algorithms(both)) == "GRPO and PPO training progress"
    assert default_title({}) == "Training progress" and default_title({}, "responses") == "Responses"


def test_behaviour_figure_of_a_real_smoke_run(smoke_run):
    runs = find_runs([str(smoke_run / "logs")])
    frame = read_scalars(runs)
    assert has_behaviour(frame)
    figure, missing = plot_progress(frame, algorithms=run_algorithms(runs), panels=BEHAVIOUR_PANELS)
    assert missing == []
    for ax in figure.axes:  # a line, or the note of a constant (no response of the smoke run degenerates)
        assert len(ax.lines) == 1 or ax.texts[0].get_text().startswith("constant 0 in out"), ax.get_title()
    assert len(figure.axes[2].lines) == 1  # distinct-2 moves
    assert figure._suptitle.get_text().startswith("PPO training progress")
    assert not has_behaviour(frame[~frame["tag"].str.startswith("response/")])
