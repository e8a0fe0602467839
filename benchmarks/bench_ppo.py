"""Benchmark a fixed amount of PPO work on a chosen model shape and device; print a table (and JSON).

    python benchmarks/bench_ppo.py                                   # tiny shape, CPU, seconds
    python benchmarks/bench_ppo.py --shape smollm2-135m --device cuda --rollout-batch-size 64 \
        --mini-batch-size 16 --per-device-train-batch-size 16 --prompt-length 512 --response-length 128 --bf16
    python benchmarks/bench_ppo.py --shape smollm2-135m --device cuda --use-lora ...

Models are built with random weights from the shape alone (no download); prompts are random token ids
with lengths drawn in [prompt_length / 2, prompt_length]; responses run to `response_length` tokens (EOS
suppressed) so every run does the same work. The same seed gives the same prompts and samples. Warm-up
updates are excluded; figures are medians over the timed updates. It runs the real `Algorithm` and `Trainer`.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smolppo.smoke import POLICY_SHAPE  # noqa: E402

SHAPES = {
    "tiny": POLICY_SHAPE,
    "tiny32": dict(POLICY_SHAPE, num_attention_heads=2, num_key_value_heads=2),  # heads of 32: vLLM's CPU minimum
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
    ),
}


@dataclass
class BenchConfig:
    shape: str = field(default="tiny", metadata={"help": f"Model shape: {', '.join(SHAPES)}."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the policy (reference = adapters off)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing."})
    generation_cache: str = field(
        default="dynamic",
        metadata={
            "help": "KV cache for generation: dynamic (the engine's) or static (on CUDA, transformers then compiles "
            "the decoding step; compile time falls in the warm-up updates where the shapes repeat)."
        },
    )
    generation_backend: str = field(
        default="hf", metadata={"help": "Who samples: hf (transformers' generate) or vllm (colocated engine)."}
    )
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per PPO update."})
    mini_batch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per forward/backward."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs per update."})
    advantage_estimator: str = field(
        default="gae", metadata={"help": "gae (with a value model), grpo, rloo or reinforce_pp (no value model)."}
    )
    samples_per_prompt: int = field(
        default=1, metadata={"help": "Responses per prompt (grpo/rloo: at least 2; default 4 for them)."}
    )
    prompt_length: int = field(default=64, metadata={"help": "Longest prompt, in tokens."})
    response_length: int = field(default=32, metadata={"help": "Tokens generated per response."})
    warmup_updates: int = field(default=1, metadata={"help": "Updates run before timing starts."})
    timed_updates: int = field(default=3, metadata={"help": "Updates timed (median reported)."})
    seed: int = field(default=0, metadata={"help": "Seed for weights, prompts and sampling."})
    output: Optional[str] = field(default=None, metadata={"help": "Write the results as JSON here too."})

    def __post_init__(self):
        if self.advantage_estimator in ("grpo", "rloo") and self.samples_per_prompt == 1:
            self.samples_per_prompt = 4
        if self.generation_backend not in ("hf", "vllm"):
            raise ValueError(f"generation_backend must be hf or vllm, got {self.generation_backend!r}")
        if self.generation_cache not in ("dynamic", "static"):
            raise ValueError(f"generation_cache must be dynamic or static, got {self.generation_cache!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {self.shape!r}")


def build_trainer(bench: BenchConfig, output_dir: str):
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, set_seed

    from smolppo import smoke
    from smolppo.algorithm.ppo import Algorithm
    from smolppo.configs import PPOConfig
    from smolppo.data import PromptSet
    from smolppo.job.trainer import Trainer
    from smolppo.models import apply_lora, load_tokenizer
    from smolppo.rewards.reader import RewardReader
    from smolppo.rewards.sources import CombinedReward, RewardModelSource

    device = torch.device(bench.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(smoke.TOKENIZER_DIR)
    total = bench.warmup_updates + bench.timed_updates
    config = PPOConfig(
        policy_model="bench",
        reward_model="bench",
        output_dir=output_dir,
        seed=bench.seed,
        rollout_batch_size=bench.rollout_batch_size,
        mini_batch_size=bench.mini_batch_size,
        per_device_train_batch_size=bench.per_device_train_batch_size,
        ppo_epochs=bench.ppo_epochs,
        advantage_estimator=bench.advantage_estimator,
        samples_per_prompt=bench.samples_per_prompt,
        max_new_tokens=bench.response_length,
        max_prompt_length=bench.prompt_length,
        max_updates=total,
        num_train_epochs=total,
        use_lora=bench.use_lora,
        bf16=bench.bf16,
        gradient_checkpointing=bench.gradient_checkpointing,
        learning_rate=1e-5,
        num_logged_samples=0,
        temperature=1.0,
    )
    set_seed(bench.seed)
    shape = dict(
        SHAPES[bench.shape],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    policy = LlamaForCausalLM(LlamaConfig(**shape))
    reward = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    value = copy.deepcopy(reward).to(device) if config.uses_value_model else None
    ref = None if bench.use_lora else copy.deepcopy(policy)
    if bench.generation_backend == "vllm":  # vLLM reads the architecture (and first weights) from a folder
        policy.save_pretrained(os.path.join(output_dir, "bench_policy"))
        tokenizer.save_pretrained(os.path.join(output_dir, "bench_policy"))
    if bench.use_lora:
        policy = apply_lora(policy, config)
    generator = torch.Generator().manual_seed(bench.seed)
    prompts = []
    for _ in range(bench.rollout_batch_size * total):
        length = int(torch.randint(bench.prompt_length // 2, bench.prompt_length + 1, (1,), generator=generator))
        prompts.append(torch.randint(3, shape["vocab_size"], (length,), generator=generator).tolist())
    texts = tokenizer.batch_decode(prompts)
    prompt_set = PromptSet(prompts, texts, [("", text) for text in texts], len(prompts), 0)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if bench.bf16 else "no",
        gradient_accumulation_steps=config.accumulation_steps,
    )
    reader = RewardReader(reward.to(device), tokenizer, batch_size=config.effective_inference_batch_size)
    reward_sources = CombinedReward([RewardModelSource(reader)])
    algorithm = Algorithm(
        config.algorithm_settings(),
        config.schedule(len(prompts)),
        tokenizer,
        policy.to(device),
        reward_sources,
        accelerator,
        ref_policy=ref,
        value_model=value,
        sampler=vllm_sampler(bench, config, tokenizer, device, os.path.join(output_dir, "bench_policy")),
    )
    algorithm.generation_config.min_new_tokens = bench.response_length  # same work every run
    if bench.generation_cache == "static":
        algorithm.generation_config.cache_implementation = "static"
    trainer = Trainer(config, algorithm, prompt_set, reward_sources)
    return trainer, device


def vllm_sampler(bench: BenchConfig, config, tokenizer, device, path: str):
    """With ``--generation-backend vllm``: an engine on the benchmark's policy (saved in `path`), forced to
    `response_length` tokens like `generate`; else None (transformers' `generate`)."""
    if bench.generation_backend == "hf":
        return None
    import torch

    from smolppo.algorithm.samplers import VLLMSampler
    from smolppo.configs.ppo_fields import GenerationFields, SamplingFields

    return VLLMSampler(
        path,
        [tokenizer.eos_token_id],
        tokenizer.pad_token_id,
        config.group(SamplingFields),
        config.group(GenerationFields),
        dtype=torch.bfloat16 if bench.bf16 else torch.float32,
        device=device,
        seed=bench.seed,
        max_model_len=bench.prompt_length + bench.response_length,
        min_new_tokens=bench.response_length,
    )


def run(bench: BenchConfig) -> dict:
    import torch

    from smolppo.tracking import peak_memory_bytes, run_environment

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, device = build_trainer(bench, output_dir)
        for _ in range(bench.warmup_updates):
            trainer.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = [trainer.step() for _ in range(bench.timed_updates)]
        trainer.algorithm.close()
    stages = [k for k in timed[0] if k.startswith("time/")]
    median = {k.removeprefix("time/"): statistics.median(m[k] for m in timed) for k in stages}
    total = median["update_total"]
    episodes = bench.rollout_batch_size * bench.samples_per_prompt
    length = statistics.median(m["response/length_mean"] for m in timed)  # measured, not assumed
    tokens = episodes * length
    return {
        "config": asdict(bench),
        "device": str(device),
        "environment": run_environment(),
        "episodes_per_s": episodes / total,
        "generated_tokens_per_s": tokens / median["rollout"],
        "seconds_per_update": total,
        "response_length_measured": length,
        "stage_seconds": median,
        "stage_share": {k: v / total for k, v in median.items() if k != "update_total"},
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "GPU allocator peak" if device.type == "cuda" else "process peak RSS",
        "fingerprint": {
            "rewards/mean": timed[-1]["rewards/mean"],
            "loss": timed[-1]["loss"],
            "kl_divergence": timed[-1]["kl_divergence"],
        },
        "sampler_logprob_diff_max": timed[-1].get("sampler/logprob_diff_max"),
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    rows = [
        f"shape {cfg['shape']}  device {result['device']}  lora {cfg['use_lora']}  "
        f"estimator {cfg['advantage_estimator']} x{cfg['samples_per_prompt']}  bf16 {cfg['bf16']}  "
        f"backend {cfg['generation_backend']}  cache {cfg['generation_cache']}  rollout {cfg['rollout_batch_size']}  "
        f"prompt<={cfg['prompt_length']}  response {cfg['response_length']}",
        f"{'episodes/s':<28}{result['episodes_per_s']:>12.2f}",
        f"{'generated tokens/s':<28}{result['generated_tokens_per_s']:>12.1f}",
        f"{'seconds per update':<28}{result['seconds_per_update']:>12.3f}",
    ]
    for stage, seconds in result["stage_seconds"].items():
        if stage != "update_total":
            rows.append(f"  {stage:<26}{seconds:>12.3f}  {100 * result['stage_share'][stage]:5.1f}%")
    rows.append(
        f"{'peak memory (' + result['peak_memory_kind'] + ')':<28}{result['peak_memory_bytes'] / 2**30:>11.2f}G"
    )
    return "\n".join(rows)


def main() -> int:
    from smolppo.cli import parse_config

    bench = parse_config(BenchConfig)
    result = run(bench)
    print(format_table(result))
    if bench.output:
        with open(bench.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from smolppo.cli import run_main

    run_main(main)
