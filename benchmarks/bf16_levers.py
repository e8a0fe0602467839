"""Measure the bf16 levers of the speed issue on the real SmolLM2-135M, one at a time (CPU or GPU).

    python benchmarks/bf16_levers.py [--model .real_model] [--device cpu] [--output levers.json]

1. the machine's limit: matmul GFLOP/s in fp32 and bf16 at the body's and the LM head's shapes;
2. log-prob precision on sampled responses, against an all-fp32 pass: bf16 body + fp32 LM head (ours), bf16 body +
   bf16 head (trl, OpenRLHF), and the log-probs `generate` computed while sampling (KV cache, bf16 head);
3. the first PPO ratio each choice gives: the training forward (micro-batches of 4) against the rollout pass
   (chunks of 8), both in the same precision;
4. time of each choice: the scoring pass with an fp32 or a bf16 head, and generation with the dynamic or a static
   KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis briefly.",
    "How do I boil an egg?",
    "What does 'ephemeral' mean?",
    "List three primary colors.",
    "Why is the sky blue?",
    "Name a large mammal.",
]


def seconds(fn, repeat: int = 3, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat


def matmul_rates(device) -> dict:
    """GFLOP/s of ``[rows, k] @ [k, n]`` for the shapes one micro-batch (4 x ~120 tokens) puts through the model."""
    shapes = {
        "mlp_up": (480, 576, 1536),
        "mlp_down": (480, 1536, 576),
        "attn_qo": (480, 576, 576),
        "lm_head": (128, 576, 49152),
    }
    rates = {}
    for name, (m, k, n) in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            rates[f"{name}_{str(dtype).removeprefix('torch.')}"] = 2 * m * k * n / seconds(a.matmul, 10, b) / 1e9
    return rates


def logprobs_with(model, rollout, bf16_body: bool, bf16_head: bool, chunk: int) -> torch.Tensor:
    from smolppo.algorithm.rollout import response_logits, selective_log_softmax, trim_padding

    out = []
    for start in range(0, len(rollout), chunk):
        part = trim_padding(rollout.select(slice(start, start + chunk)))
        with torch.no_grad(), torch.autocast(part.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16_body):
            if bf16_head:
                full = model(
                    input_ids=part.input_ids,
                    attention_mask=part.attention_mask,
                    position_ids=part.position_ids,
                    use_cache=False,
                ).logits
                logits = full[:, part.context_length - 1 : -1].float()
            else:
                logits = response_logits(model, part)
        lp = selective_log_softmax(logits / 0.7, part.responses) * part.response_mask
        out.append(torch.nn.functional.pad(lp, (0, rollout.responses.shape[1] - lp.shape[1])))
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO, ".real_model"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None)
    opts = parser.parse_args()
    from smolppo.algorithm.rollout import generate_rollout, sampling_config
    from smolppo.data import render_prompt
    from smolppo.models import eos_token_ids, load_causal_lm, load_tokenizer
    from smolppo.runtime import set_attention

    device = torch.device(opts.device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "matmul_gflops": matmul_rates(device)}
    tokenizer = load_tokenizer(opts.model)
    model = load_causal_lm(opts.model).to(device).eval()
    set_attention("eager" if device.type == "cpu" else None, model)  # as measured in docs/PERFORMANCE.md
    prompts = [tokenizer(render_prompt(tokenizer, "", q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    eos = eos_token_ids(tokenizer, model)
    config = sampling_config(tokenizer, eos, 32, 0.7)
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        config.output_logits, config.return_dict_in_generate = True, True
        from smolppo.algorithm.rollout import sample
        from smolppo.data import left_pad

        ids, mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_token_id))
        torch.manual_seed(0)
        generated = sample(model, ids, mask, config)
    # log-probs generate computed while sampling, for the tokens it sampled (same seed: the same tokens)
    steps = torch.stack(generated.logits, 1).float() / 0.7
    sampled = generated.sequences[:, ids.shape[1] :]
    from smolppo.algorithm.rollout import build_rollout, selective_log_softmax

    gen_rollout = build_rollout(ids, mask, sampled, eos, tokenizer.pad_token_id)
    from_generate = selective_log_softmax(steps, sampled) * gen_rollout.response_mask
    real = gen_rollout.response_mask.bool()
    fp32 = logprobs_with(model, gen_rollout, False, False, 8)
    ours = logprobs_with(model, gen_rollout, True, False, 8)
    bf16_head = logprobs_with(model, gen_rollout, True, True, 8)

    def error(x):
        d = (x - fp32)[real].abs()
        return {
            "max": float(d.max()),
            "mean": float(d.mean()),
            "sequence_mean": float(((x - fp32) * real).sum(1).abs().mean()),
        }

    result["logprob_error_vs_fp32"] = {
        "bf16_body_fp32_head (ours)": error(ours),
        "bf16_body_bf16_head": error(bf16_head),
        "from_generate (kv cache, bf16 head)": error(from_generate),
        "from_generate_vs_bf16_head_full_pass_max": float((from_generate - bf16_head)[real].abs().max()),
    }

    def first_ratio(bf16_head_: bool, old: torch.Tensor) -> float:
        new = logprobs_with(model, gen_rollout, True, bf16_head_, 4)  # the update's micro-batches
        return float((new - old)[real].exp().sub(1).abs().max())

    result["first_ratio_deviation"] = {
        "bf16_body_fp32_head (ours)": first_ratio(False, ours),
        "bf16_body_bf16_head": first_ratio(True, bf16_head),
        "old_from_generate": first_ratio(False, from_generate),
    }
    result["scoring_pass_seconds"] = {
        "fp32_head": seconds(lambda: logprobs_with(model, gen_rollout, True, False, 8)),
        "bf16_head": seconds(lambda: logprobs_with(model, gen_rollout, True, True, 8)),
    }
    timings = {}
    for cache in ("dynamic", "static"):
        config = sampling_config(tokenizer, eos, 32, 0.7)
        config.min_new_tokens = 32
        if cache == "static":
            config.cache_implementation = "static"

        def run(config):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                generate_rollout(model, prompts, tokenizer, eos, config)

        timings[cache] = seconds(run, 2, config)
    result["generation_seconds_8x32"] = timings
    print(json.dumps(result, indent=2))
    if opts.output:
        with open(opts.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
