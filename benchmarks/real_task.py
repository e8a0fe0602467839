"""A preference task on the real SmolLM2-135M, built by the project from nothing but the model.

    python -m smolppo.real_model .real_model
    python benchmarks/real_task.py --model .real_model --out .real_task --bf16

1. **Prompts**, generated programmatically: six kinds of request (capitals, explanations, tips, lists, how-tos,
   word meanings) x 30 subjects = 180 prompts, shuffled with a fixed seed. The first `TRAIN_PROMPTS` rows are for
   training (reward model and policy); the rest are held out and never trained on.
2. **Responses**: the real model samples `SAMPLES` responses per prompt (`TEMPERATURE`, `MAX_NEW_TOKENS` tokens).
3. **The property: a concise, complete answer.** A response is *complete* when it ends with EOS within the budget
   and has at least `MIN_WORDS` words. ``chosen`` = the shortest complete response, ``rejected`` = the longest
   truncated one (or, when none was truncated, the longest, if it has `MIN_GAP` more words). Prompts without such
   a pair are dropped. `property_score` measures the same thing on any set of completions (share complete, words).

Writes ``<out>/task.jsonl`` (ORCA columns system, question, chosen, rejected; training rows first) and
``<out>/task_info.json`` (row counts, the split, the property's figures on the sampled responses).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_PROMPTS = 128
SAMPLES = 4
MAX_NEW_TOKENS = 64
MIN_WORDS = 3
TEMPERATURE = 0.7  # the PPO runs' sampling temperature
MIN_GAP = 5
SEED = 0

KINDS = {
    "What is the capital of {}?": [
        "France",
        "Germany",
        "Italy",
        "Spain",
        "Portugal",
        "Japan",
        "China",
        "India",
        "Brazil",
        "Canada",
        "Mexico",
        "Egypt",
        "Kenya",
        "Australia",
        "Norway",
        "Sweden",
        "Finland",
        "Poland",
        "Greece",
        "Turkey",
        "Argentina",
        "Chile",
        "Peru",
        "Thailand",
        "Vietnam",
        "Ireland",
        "Austria",
        "Hungary",
        "Morocco",
        "Nigeria",
    ],
    "Explain what {} is.": [
        "photosynthesis",
        "gravity",
        "a black hole",
        "democracy",
        "inflation",
        "a vaccine",
        "an atom",
        "a volcano",
        "the internet",
        "a rainbow",
        "evolution",
        "electricity",
        "a computer program",
        "an ecosystem",
        "a comet",
        "friction",
        "a glacier",
        "an earthquake",
        "a tide",
        "a battery",
        "recycling",
        "a budget",
        "a museum",
        "a cloud",
        "a magnet",
        "a microscope",
        "a library",
        "an orchestra",
        "a calendar",
        "a bridge",
    ],
    "Give me one tip for {}.": [
        "sleeping better",
        "learning a language",
        "saving money",
        "running faster",
        "studying for exams",
        "cooking rice",
        "staying focused",
        "writing an essay",
        "making friends",
        "keeping plants alive",
        "public speaking",
        "drinking more water",
        "reading more books",
        "packing a suitcase",
        "staying warm",
        "waking up early",
        "taking photos",
        "learning to swim",
        "cleaning a kitchen",
        "painting a room",
        "a job interview",
        "riding a bike",
        "planning a trip",
        "learning guitar",
        "drawing faces",
        "remembering names",
        "baking bread",
        "walking a dog",
        "saving energy",
        "growing tomatoes",
    ],
    "Name three {}.": [
        "fruits",
        "colors",
        "planets",
        "musical instruments",
        "birds",
        "oceans",
        "vegetables",
        "sports",
        "metals",
        "insects",
        "trees",
        "flowers",
        "mammals",
        "rivers",
        "languages",
        "shapes",
        "tools",
        "fish",
        "board games",
        "desserts",
        "clouds types",
        "gemstones",
        "spices",
        "dog breeds",
        "breakfast foods",
        "kitchen utensils",
        "farm animals",
        "seasons",
        "cheeses",
        "dances",
    ],
    "How do I {}?": [
        "boil an egg",
        "tie a tie",
        "plant a seed",
        "make tea",
        "change a light bulb",
        "write a letter",
        "fold a shirt",
        "clean my glasses",
        "start a journal",
        "make a paper plane",
        "wash my hands",
        "set an alarm",
        "sharpen a pencil",
        "make a sandwich",
        "water a cactus",
        "peel an orange",
        "brush my teeth",
        "open a jar",
        "make lemonade",
        "feed a cat",
        "iron a shirt",
        "pick a ripe melon",
        "make toast",
        "sew a button",
        "stretch my back",
        "cool down a room",
        "make popcorn",
        "wrap a gift",
        "clean a window",
        "cut an onion",
    ],
    "What does the word '{}' mean?": [
        "happy",
        "ancient",
        "brave",
        "curious",
        "enormous",
        "fragile",
        "generous",
        "humble",
        "invisible",
        "journey",
        "kind",
        "loyal",
        "mysterious",
        "narrow",
        "ordinary",
        "patient",
        "quiet",
        "rapid",
        "sincere",
        "tiny",
        "urgent",
        "vivid",
        "wise",
        "young",
        "zealous",
        "bold",
        "calm",
        "eager",
        "fierce",
        "gentle",
    ],
}


def task_prompts() -> list[str]:
    prompts = [template.format(subject) for template, subjects in KINDS.items() for subject in subjects]
    random.Random(SEED).shuffle(prompts)
    return prompts


def words(text: str) -> int:
    return len(text.split())


def is_complete(text: str, ended_with_eos: bool) -> bool:
    return ended_with_eos and words(text) >= MIN_WORDS


def property_score(texts: list[str], ended: list[bool]) -> dict:
    """The task's textual property on a set of completions: share complete, and mean words."""
    complete = [is_complete(t, e) for t, e in zip(texts, ended)]
    return {
        "complete_rate": sum(complete) / max(1, len(texts)),
        "mean_words": sum(words(t) for t in texts) / max(1, len(texts)),
        "too_short_rate": sum(words(t) < MIN_WORDS for t in texts) / max(1, len(texts)),
    }


def pick_pair(samples: list[tuple[str, bool]]) -> tuple[str, str] | None:
    """``(chosen, rejected)`` among one prompt's samples by the property, or None when no clear pair exists."""
    complete = [t for t, e in samples if is_complete(t, e)]
    if not complete:
        return None
    chosen = min(complete, key=words)
    truncated = [t for t, e in samples if not e]
    if truncated:
        return chosen, max(truncated, key=words)
    longest = max((t for t, _ in samples), key=words)
    return (chosen, longest) if words(longest) >= words(chosen) + MIN_GAP else None


def sample_responses(model_dir: str, prompts: list[str], bf16: bool, batch_size: int) -> list[list[tuple[str, bool]]]:
    import torch

    from smolppo.algorithm.rollout import generate_rollout, response_texts, sampling_config
    from smolppo.data import row_prompt
    from smolppo.models import eos_token_ids, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    eos = eos_token_ids(tokenizer, model)
    config = sampling_config(tokenizer, eos, MAX_NEW_TOKENS, temperature=TEMPERATURE)
    ids = [row_prompt(tokenizer, {"system": "", "question": p})[1] for p in prompts]
    torch.manual_seed(SEED)
    out: list[list[tuple[str, bool]]] = []
    per_batch = max(1, batch_size // SAMPLES)
    for start in range(0, len(ids), per_batch):
        batch = [i for i in ids[start : start + per_batch] for _ in range(SAMPLES)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rollout = generate_rollout(model, batch, tokenizer, eos, config)
        texts = response_texts(tokenizer, rollout)
        ended = rollout.ended_with_eos.tolist()
        for k in range(0, len(batch), SAMPLES):
            out.append(list(zip(texts[k : k + SAMPLES], ended[k : k + SAMPLES])))
        print(f"sampled {len(out)}/{len(ids)} prompts", file=sys.stderr, flush=True)
    return out


def build(model_dir: str, out_dir: str, bf16: bool, batch_size: int) -> dict:
    from smolppo.runs.output_dir import write_json_atomically

    started = time.time()
    prompts = task_prompts()
    samples = sample_responses(model_dir, prompts, bf16, batch_size)
    train, held_out, dropped = [], [], 0
    for index, (prompt, responses) in enumerate(zip(prompts, samples)):
        pair = pick_pair(responses)
        if pair is None:
            dropped += 1
            continue
        row = {"system": "", "question": prompt, "chosen": pair[0], "rejected": pair[1]}
        (train if index < TRAIN_PROMPTS else held_out).append(row)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "task.jsonl")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        for row in train + held_out:
            f.write(json.dumps(row) + "\n")
    os.replace(staging, path)
    flat = [r for responses in samples for r in responses]
    info = {
        "dataset": path,
        "train_rows": len(train),
        "held_out_rows": len(held_out),
        "prompts_without_a_pair": dropped,
        "samples_per_prompt": SAMPLES,
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": TEMPERATURE,
        "base_model_property": property_score([t for t, _ in flat], [e for _, e in flat]),
        "wall_s": round(time.time() - started, 1),
    }
    write_json_atomically(os.path.join(out_dir, "task_info.json"), info)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".real_model", help="converted real model (python -m smolppo.real_model)")
    parser.add_argument("--out", default=".real_task")
    parser.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (fast on AMX CPUs)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences generated at a time")
    args = parser.parse_args()
    print(json.dumps(build(args.model, args.out, args.bf16, args.batch_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
