"""How much the smoke task's learning gain varies from run to run, and whether a setting moves it beyond that.

    python benchmarks/smoke_seed_spread.py --variants sdpa eager sdpa+1e-6 --seeds 42 1 2 3 4 5 6 7 8 9 10 11

Each variant trains the smoke preset (40 updates, in-process, as `tests/test_trainer.py` does) once per seed and
measures the learning test's gain: the policy's mean reward on every training prompt under a fixed sampling seed,
after training minus before. A variant is an attention kernel (``sdpa``, ``eager``), optionally with ``+EPS``: the
policy's weights multiplied by ``1 + EPS * N(0, 1)`` before training (fixed noise seed), a numerical perturbation of
the size two kernels' rounding differences make; and optionally ``@CONTROLLER``, a ``--kl-controller``
(``sdpa@adaptive``, ``sdpa@pid``). Paired differences between variants over the same seeds are
printed with their t-statistic; ``--output`` writes every run as JSON lines.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class SpreadConfig:
    variants: list[str] = field(default_factory=lambda: ["sdpa", "eager", "sdpa+1e-6"], metadata={"help": "Variants."})
    seeds: list[int] = field(default_factory=lambda: [42, 1, 2, 3, 4, 5], metadata={"help": "Training seeds."})
    output: Optional[str] = field(default=None, metadata={"help": "Write every run here as JSON lines."})


def parse_variant(variant: str) -> tuple[str, float]:
    attention, _, eps = variant.split("@")[0].partition("+")
    return attention, float(eps) if eps else 0.0


def controller_flags(variant: str) -> list[str]:
    """``["--kl-controller", NAME]`` for a variant ``...@NAME``, else nothing (the default controller)."""
    _, at, controller = variant.partition("@")
    return ["--kl-controller", controller] if at else []


def train_once(variant: str, seed: int) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from tests.conftest import make_smoke_trainer, policy_rewards

    attention, eps = parse_variant(variant)
    AcceleratorState._reset_state(reset_partial_state=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_smoke_trainer(
            os.path.join(tmp, "out"),
            "--seed",
            str(seed),
            "--attn-implementation",
            attention,
            *controller_flags(variant),
        )
        if eps:
            noise = torch.Generator().manual_seed(99)
            with torch.no_grad():
                for param in trainer.algorithm.policy.parameters():
                    param.mul_(1 + eps * torch.randn(param.shape, generator=noise))
        before = policy_rewards(trainer)
        history = [trainer.step() for _ in range(trainer.schedule.total_updates)]
        gain = policy_rewards(trainer) - before
    kls = [m["kl_divergence"] for m in history]
    return {
        "variant": variant,
        "seed": seed,
        "gain": float(gain.mean()),
        "paired_t": float(gain.mean() / (gain.std() / len(gain) ** 0.5)),
        "second_half_kl": statistics.mean(kls[len(kls) // 2 :]),
        "final_kl_coef": history[-1]["objective/kl_coef"],
    }


def summary(runs: list[dict], variants: list[str], seeds: list[int]) -> str:
    gains = {v: {r["seed"]: r["gain"] for r in runs if r["variant"] == v} for v in variants}
    lines = [f"{'variant':<14}{'mean gain':>10}{'median':>8}{'min':>8}{'< 0.15':>8}   gains by seed {seeds}"]
    for v in variants:
        g = [gains[v][s] for s in seeds]
        below = sum(x < 0.15 for x in g)
        row = f"{v:<14}{statistics.mean(g):>10.3f}{statistics.median(g):>8.3f}{min(g):>8.3f}{below:>8}   "
        lines.append(row + " ".join(f"{x:.2f}" for x in g))
    for i, a in enumerate(variants):
        for b in variants[i + 1 :]:
            diff = [gains[b][s] - gains[a][s] for s in seeds]
            t = statistics.mean(diff) / (statistics.stdev(diff) / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
            wins = sum(d > 0 for d in diff)
            lines.append(f"{b} - {a}: mean {statistics.mean(diff):+.3f}, {wins}/{len(diff)} higher, paired t {t:+.2f}")
    return "\n".join(lines)


def main() -> int:
    from smolppo.cli import parse_config

    config = parse_config(SpreadConfig)
    runs = []
    for variant in config.variants:
        for seed in config.seeds:
            runs.append(train_once(variant, seed))
            print(json.dumps(runs[-1]), flush=True)
            if config.output:
                with open(config.output, "a", encoding="utf-8") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    print(summary(runs, config.variants, config.seeds))
    return 0


if __name__ == "__main__":
    from smolppo.cli import run_main

    run_main(main)
