"""Plot a run's progress (loss, learning rate, mean reward, KL; and, in a second figure, the responses' length,
truncation, diversity and repetition) and export every scalar to CSV.

    python plot_training_progress.py
    python plot_training_progress.py --log-dir ./ppo_smoke_output/logs --smooth 0.6
    python plot_training_progress.py --log-dir ./ppo_out/logs ./grpo_out/logs --output compare.png

Every field of `smolppo.configs.PlotConfig` is a flag (see --help). Several log dirs (or a directory of runs) are
overlaid with a legend. Works headless.
"""

from __future__ import annotations

import logging
import os

from smolppo.cli import parse_config, run_main
from smolppo.configs import PlotConfig
from smolppo.errors import UserError

logger = logging.getLogger("plot_training_progress")


def main() -> int:
    config = parse_config(PlotConfig)

    from smolppo import files
    from smolppo.evaluation.plotting import (
        BEHAVIOUR_PANELS,
        default_title,
        find_runs,
        has_behaviour,
        kl_targets,
        plot_progress,
        read_scalars,
        run_algorithms,
    )
    from smolppo.runs.output_dir import write_atomically

    runs = find_runs(config.log_dir)
    frame = read_scalars(runs)
    algorithms = run_algorithms(runs)
    figure, missing = plot_progress(frame, config.smooth, config.title, kl_targets(runs), algorithms)
    first = os.path.abspath(config.log_dir[0])
    base_dir = os.path.dirname(first) if os.path.basename(first) == files.LOGS_DIR else first
    output = config.output or os.path.join(base_dir, files.PROGRESS_FIGURE)
    csv = config.csv or os.path.join(os.path.dirname(os.path.abspath(output)), files.SCALARS_CSV)
    for path in (output, csv):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the directory of {path!r}: {exc.strerror}; choose another path") from exc
    extension = os.path.splitext(output)[1].lstrip(".") or "png"
    write_atomically(output, lambda tmp: figure.savefig(tmp, dpi=120, format=extension))
    write_atomically(csv, lambda tmp: frame.to_csv(tmp, index=False))
    written = [output, csv]
    if has_behaviour(frame):
        stem, ext = os.path.splitext(output)
        behaviour_path = f"{stem}_behaviour{ext or '.png'}"
        title = f"{config.title}: responses" if config.title else default_title(algorithms, "responses")
        behaviour, _ = plot_progress(frame, config.smooth, title, None, algorithms, BEHAVIOUR_PANELS)
        write_atomically(behaviour_path, lambda tmp: behaviour.savefig(tmp, dpi=120, format=extension))
        written.insert(1, behaviour_path)
    for run, panel in missing:
        logger.warning("run %s logged no scalar for the %r panel; it is not drawn there", run, panel)
    logger.info(
        "wrote %s (%d run%s, %d scalar rows)", ", ".join(written), len(runs), "" if len(runs) == 1 else "s", len(frame)
    )
    return 0


def run() -> None:
    """The `smolppo-plot` command after `pip install -e .`: the same as this script."""
    run_main(main)


if __name__ == "__main__":
    run()
