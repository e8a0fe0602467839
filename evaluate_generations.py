"""Generate completions for unseen prompts, score them with the reward model, rank and summarise.

    python evaluate_generations.py --model-path ./ppo_training_output
    python evaluate_generations.py --model-path ./ppo_training_output --baseline-model \
        HuggingFaceTB/smollm2-135M-SFT-Only
    python evaluate_generations.py --model-path ./ppo_out ./grpo_out --num-prompts 50
    python evaluate_generations.py --model-path ./ppo_smoke_output   # after `train_ppo.py --preset smoke`
    python evaluate_generations.py --baseline-model smoke:policy --model-path ./ppo_smoke_output \
        --report ./smoke_report   # report.md: preference adherence vs capability kept, side by side

Every field of `smolppo.configs.EvalConfig` is a flag (see --help). Writes one JSON file (layout in the README) and
prints a table. With several models, all are evaluated on the same prompts and compared with the first.
"""

from __future__ import annotations

import logging

from smolppo.cli import parse_config, run_main
from smolppo.configs import EvalConfig

logger = logging.getLogger("evaluate_generations")


def main() -> int:
    config = parse_config(EvalConfig)

    from smolppo.evaluation.evaluate import check_output_writable, default_output_path, evaluate
    from smolppo.evaluation.report import check_report_dir, format_table, write_report
    from smolppo.runs.output_dir import write_json_atomically

    if config.report:
        check_report_dir(config.report)
    output = default_output_path(config)
    check_output_writable(output)
    report = evaluate(config)
    write_json_atomically(output, report)  # a kill mid-write leaves the previous report, never an empty file
    if config.report:
        for path in write_report(config.report, report):
            logger.info("wrote %s", path)
    print(format_table(report))
    logger.info("wrote %s", output)
    return 0


def run() -> None:
    """The `smolppo-evaluate` command after `pip install -e .`: the same as this script."""
    run_main(main)


if __name__ == "__main__":
    run()
