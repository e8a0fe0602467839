"""Our loss family against trl's own GRPO loss code, on the same inputs; records trl's numbers for the tests.

    python benchmarks/trl_loss_parity.py --output tests/data/trl_loss_parity.json

Runs `trl.GRPOTrainer._compute_loss` (the installed trl) on fixed inputs: per-token log-probs (the leaf whose
gradient is recorded), the rollout policy's and the reference's log-probs, one advantage per sequence and
responses of different lengths. A stand-in trainer carries only the settings the loss reads (loss type, clip
ranges, importance-sampling level, beta, max completion length), in evaluation mode, on one process, so no
gradient-accumulation scaling applies. For each case the loss and its gradient are written with the inputs and the
trl version; `tests/test_loss_family.py` computes ours from the same inputs and compares. Nothing of trl's is copied:
its code is run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, loss_type, importance_sampling_level, epsilon, epsilon_high, beta)
CASES = [
    ("grpo", "grpo", "token", 0.2, 0.2, 0.0),
    ("grpo_kl", "grpo", "token", 0.2, 0.2, 0.04),
    ("gspo", "grpo", "sequence", 0.2, 0.2, 0.0),
    ("dapo", "dapo", "token", 0.2, 0.2, 0.0),
    ("dapo_clip_higher", "dapo", "token", 0.2, 0.28, 0.0),
    ("dapo_kl", "dapo", "token", 0.2, 0.28, 0.04),
    ("dr_grpo", "dr_grpo", "token", 0.2, 0.2, 0.0),
    ("bnpo", "bnpo", "token", 0.2, 0.2, 0.0),
]
BATCH, LENGTH = 4, 6
LENGTHS = (6, 2, 4, 1)


def fixed_inputs() -> dict[str, torch.Tensor]:
    """Log-probs whose ratios to the rollout policy reach beyond both clip ranges, and masks of four lengths."""
    generator = torch.Generator(device="cpu").manual_seed(7)
    old = -torch.rand(BATCH, LENGTH, generator=generator, device="cpu") * 3
    new = old + torch.randn(BATCH, LENGTH, generator=generator, device="cpu") * 0.3
    ref = old + torch.randn(BATCH, LENGTH, generator=generator, device="cpu") * 0.2
    mask = (torch.arange(LENGTH, device="cpu")[None] < torch.tensor(LENGTHS, device="cpu")[:, None]).float()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5], device="cpu")
    return {"logprobs": new, "old_logprobs": old, "ref_logprobs": ref, "mask": mask, "advantages": advantages}


def trl_loss(
    inputs: dict[str, torch.Tensor],
    loss_type: str,
    level: str,
    epsilon: float,
    epsilon_high: float,
    beta: float,
    accelerator,
) -> tuple[float, list]:
    """trl's loss and its gradient with respect to the per-token log-probs."""
    from trl import GRPOTrainer

    logprobs = inputs["logprobs"].clone().requires_grad_(True)
    entropies = torch.zeros_like(logprobs)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, entropies, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        max_completion_length=LENGTH,
    )
    mask = inputs["mask"]
    batch = {
        "prompt_ids": torch.zeros(BATCH, 1, dtype=torch.long, device="cpu"),
        "prompt_mask": torch.ones(BATCH, 1, dtype=torch.long, device="cpu"),
        "completion_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long, device="cpu"),
        "completion_mask": mask,
        "advantages": inputs["advantages"],
        "old_per_token_logps": inputs["old_logprobs"],
        "ref_per_token_logps": inputs["ref_logprobs"],
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, batch)
    loss.backward()
    return float(loss.detach()), logprobs.grad.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "tests", "data", "trl_loss_parity.json"))
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    inputs = fixed_inputs()
    cases = []
    for name, loss_type, level, epsilon, epsilon_high, beta in CASES:
        loss, gradient = trl_loss(inputs, loss_type, level, epsilon, epsilon_high, beta, accelerator)
        cases.append(
            {
                "name": name,
                "loss_type": loss_type,
                "importance_sampling_level": level,
                "epsilon": epsilon,
                "epsilon_high": epsilon_high,
                "beta": beta,
                "loss": loss,
                "gradient": gradient,
            }
        )
        print(f"{name:<18} trl loss {loss:+.6f}")
    record = {
        "command": "python benchmarks/trl_loss_parity.py --output tests/data/trl_loss_parity.json",
        "trl": importlib.metadata.version("trl"),
        "torch": torch.__version__,
        "max_completion_length": LENGTH,
        "inputs": {key: value.tolist() for key, value in inputs.items()},
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
