"""The real task with a noisy reward model: the same property, learned from preference labels partly wrong.

    python benchmarks/real_task.py --model .real_model --out .real_task                # the clean task first
    python benchmarks/noisy_task.py --task .real_task --out .noisy_task --flip 0.3      # its noisy sibling
    python benchmarks/real_learning.py --work .noisy_task --only reward                # the reward model on it
    python benchmarks/noisy_task.py --check .noisy_task/reward_model --task .real_task  # accuracy on clean pairs

Real preference data is noisy: annotators disagree on a quarter to a third of pairs. A 135M reward model trained on
such labels learns the property only partly, which is what PPO meets in practice (a strong reward model hides the
KL controller's failures). Here a seeded share (`--flip`) of the *training* rows has chosen and rejected swapped; the
held-out rows stay clean, so the reward model's held-out pairwise accuracy (``--check``, and the PPO start-up check)
measures how much of the property it captured, and runs are judged by the property itself on held-out prompts
(``real_task.property_score``), never by the reward model.

Writes ``<out>/task.jsonl`` and ``<out>/task_info.json`` (the clean task's figures plus ``label_noise`` and the
flipped rows' count).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SEED = 0


def flip_rows(rows: list[dict], train_rows: int, share: float, seed: int = SEED) -> tuple[list[dict], int]:
    """`rows` with chosen and rejected swapped on a seeded `share` of the first `train_rows` (held-out rows kept)."""
    flipped = set(random.Random(seed).sample(range(train_rows), round(share * train_rows)))
    out = [
        {**row, "chosen": row["rejected"], "rejected": row["chosen"]} if index in flipped else dict(row)
        for index, row in enumerate(rows)
    ]
    return out, len(flipped)


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build(task_dir: str, out_dir: str, share: float) -> dict:
    from smolppo.runs.output_dir import write_json_atomically

    with open(os.path.join(task_dir, "task_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    rows, flipped = flip_rows(read_rows(os.path.join(task_dir, "task.jsonl")), info["train_rows"], share)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "task.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
    info = {**info, "dataset": path, "clean_task": task_dir, "label_noise": share, "flipped_train_rows": flipped}
    write_json_atomically(os.path.join(out_dir, "task_info.json"), info)
    return info


def check(reward_dir: str, task_dir: str) -> dict:
    """The reward model's pairwise accuracy on the clean task's held-out rows (what it captured of the property)."""
    from smolppo.rewards.reader import load_reward_reader, pairwise_check

    with open(os.path.join(task_dir, "task_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    held_out = read_rows(os.path.join(task_dir, "task.jsonl"))[info["train_rows"] :]
    reader = load_reward_reader(reward_dir, None, None)
    result = pairwise_check(reader, held_out)
    return {"reward_model": reward_dir, **vars(result)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=".real_task", help="the clean task (benchmarks/real_task.py's --out)")
    parser.add_argument("--out", default=".noisy_task")
    parser.add_argument("--flip", type=float, default=0.3, help="share of training pairs with swapped labels")
    parser.add_argument("--check", metavar="REWARD_MODEL", help="only measure this reward model on clean pairs")
    args = parser.parse_args()
    result = check(args.check, args.task) if args.check else build(args.task, args.out, args.flip)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
