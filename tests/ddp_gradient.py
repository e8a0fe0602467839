"""One mini-batch's gradient, written to a file: run alone (the mini-batch in one piece) or under
`accelerate launch --num_processes 2` (each process half of it). `tests/test_loss_family.py` compares the two.

    python tests/ddp_gradient.py OUT_DIR LOSS_TYPE
"""

from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SEQUENCES = 4
CUTS = (3, 12, 7, 1)  # EOS positions: responses of different lengths


def main(out: str, loss_type: str) -> None:
    from smolppo.algorithm.rollout import build_rollout
    from smolppo.cli import parse_config
    from smolppo.configs import PPOConfig
    from smolppo.data import left_pad
    from smolppo.job.build import build_ppo_trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = SEQUENCES // world
    flags = [
        "--preset",
        "smoke",
        "--output-dir",
        os.path.join(out, "run"),
        "--loss-type",
        loss_type,
        "--rollout-batch-size",
        str(per_process),
        "--mini-batch-size",
        str(per_process),
        "--per-device-train-batch-size",
        "1",
        "--ppo-epochs",
        "1",
        "--kl-in-loss",
    ]
    trainer = build_ppo_trainer(parse_config(PPOConfig, flags, "train_ppo"))
    algo, acc = trainer.algorithm, trainer.accelerator
    prompts = trainer.prompts.input_ids[:SEQUENCES]
    prompt_ids, prompt_mask = left_pad(prompts, algo.tokenizer.pad_token_id)
    vocab = algo.policy.get_input_embeddings().num_embeddings
    responses = torch.randint(3, vocab, (SEQUENCES, 12), generator=torch.Generator(device="cpu").manual_seed(0))
    for row, cut in enumerate(CUTS):
        responses[row, cut - 1] = algo.eos_ids[0]
    rollout = build_rollout(prompt_ids, prompt_mask, responses, algo.eos_ids, algo.tokenizer.pad_token_id)
    rows = list(range(acc.process_index * per_process, (acc.process_index + 1) * per_process))
    mine = rollout.select(torch.tensor(rows, device="cpu")).to(acc.device)
    exp = algo.experience_from(mine, trainer.prompts, rows)
    steps = []
    algo.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append([p.grad.detach().cpu().clone() for p in algo.trainable_params])
    )
    algo.optimise(exp, 0)
    if acc.is_main_process:
        torch.save(steps, os.path.join(out, f"gradients_{world}.pt"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
