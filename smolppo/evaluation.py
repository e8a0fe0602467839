"""Sample completions for unseen prompts, score them with the reward model, rank, summarise and compare models.

Generation and scoring reuse the trainer's code (`smolppo.rollout`, `smolppo.rewards`), so a reward here means
exactly what `rewards/mean` meant during training: the reward model's own reading of the conversation.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from smolppo.checkpointing import RUN_SUMMARY_FILE, STATE_FILE
from smolppo.configs import DEFAULT_DATASET, DEFAULT_NUM_SAMPLES, DEFAULT_REWARD_MODEL
from smolppo.configs.ppo import names_a_reward_model
from smolppo.data import load_rows, row_conversation, row_prompt
from smolppo.errors import UserError
from smolppo.models import (
    eos_token_ids,
    load_causal_lm,
    load_reward_reader,
    load_tokenizer,
    resolve_model_path,
    set_attention,
    store_body_linears_in_bf16,
)
from smolppo.paths import looks_like_local_path
from smolppo.reward_sources import CombinedReward, RewardBatch, build_reward
from smolppo.rollout import generate_rollout, response_texts, sampling_config

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- pure statistics
def rank_labels(rewards: list[float]) -> list[str]:
    """BEST for the highest reward, WORST for the lowest, MEDIUM in between. Equal rewards share a label, and
    when every completion of a prompt has the same reward they are all TIE."""
    high, low = max(rewards), min(rewards)
    if high == low:
        return ["TIE"] * len(rewards)
    return ["BEST" if r == high else "WORST" if r == low else "MEDIUM" for r in rewards]


def summarise(rewards: np.ndarray, lengths: np.ndarray, ended: np.ndarray) -> dict:
    """Statistics of a ``[prompts, completions]`` reward matrix and its response lengths / EOS flags."""
    flat = rewards.ravel()
    return {
        "reward_mean": float(flat.mean()),
        "reward_std": float(flat.std(ddof=1)) if flat.size > 1 else 0.0,
        "reward_median": float(np.median(flat)),
        "reward_min": float(flat.min()),
        "reward_max": float(flat.max()),
        "per_prompt_spread_mean": float((rewards.max(1) - rewards.min(1)).mean()),
        "response_length_mean": float(lengths.mean()),
        "eos_rate": float(ended.mean()),
        "num_completions": int(flat.size),
    }


def compare(rewards: np.ndarray, baseline: np.ndarray, bootstrap_samples: int, seed: int) -> dict:
    """Model vs baseline on the same prompts (``[prompts, completions]`` each).

    A prompt is won when the model's mean reward over its completions is higher than the baseline's; ties
    are counted apart. The mean reward difference gets a bootstrap 95% interval over prompts.
    """
    per_prompt = rewards.mean(1) - baseline.mean(1)
    wins, ties = int((per_prompt > 0).sum()), int((per_prompt == 0).sum())
    rng = np.random.default_rng(seed)
    resampled = rng.integers(0, len(per_prompt), size=(bootstrap_samples, len(per_prompt)))
    boot = per_prompt[resampled].mean(1)
    return {
        "wins": wins,
        "ties": ties,
        "losses": len(per_prompt) - wins - ties,
        "win_rate": wins / len(per_prompt),
        "tie_rate": ties / len(per_prompt),
        "mean_reward_difference": float(rewards.mean() - baseline.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
    }


# ---------------------------------------------------------------------- training run context
def training_config_for(model_path: str) -> dict | None:
    """The config a training run recorded beside `model_path` (run summary or checkpoint state), if any."""
    if not os.path.isdir(model_path):
        return None
    candidates = [
        os.path.join(model_path, RUN_SUMMARY_FILE),
        os.path.join(model_path, STATE_FILE),
        os.path.join(os.path.dirname(os.path.abspath(model_path)), RUN_SUMMARY_FILE),
    ]
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    recorded = json.load(f)
                config = recorded.get("config")
            except (OSError, ValueError, AttributeError):
                logger.warning("%s is unreadable; not using it to find the run's reward model and data", path)
                continue
            if config:
                reward_path = recorded.get("resolved_paths", {}).get("reward_model")
                if reward_path and os.path.isdir(reward_path):
                    config = {**config, "reward_model": reward_path}
                return config
    return None


@dataclass
class EvalPlan:
    reward_model: str
    reward_template: str | None
    dataset: str
    skip_rows: int
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)


def resolve_plan(cfg, training: dict | None) -> EvalPlan:
    """Reward model, dataset and rows to skip: explicit flags, else the training run's, else the defaults."""
    training = training or {}
    reward_model = cfg.reward_model or training.get("reward_model") or DEFAULT_REWARD_MODEL
    dataset = cfg.dataset or training.get("dataset") or DEFAULT_DATASET
    if cfg.skip_rows is not None:
        skip = cfg.skip_rows
    elif training and dataset == training.get("dataset"):
        skip = int(training.get("num_samples", 0))
    elif dataset == DEFAULT_DATASET:
        skip = DEFAULT_NUM_SAMPLES
    else:
        skip = 0
    reward_template = cfg.reward_template or (training.get("reward_template") if not cfg.reward_model else None)
    if cfg.reward_model:  # an explicit reward model replaces the run's whole reward (functions only if given)
        funcs, weights = cfg.reward_funcs or [], cfg.reward_weights or []
    else:
        funcs = cfg.reward_funcs if cfg.reward_funcs is not None else training.get("reward_funcs") or []
        weights = cfg.reward_weights if cfg.reward_weights is not None else training.get("reward_weights") or []
    return EvalPlan(reward_model, reward_template, dataset, skip, list(funcs), list(weights))


def select_prompt_rows(cfg, plan: EvalPlan, tokenizer) -> list[tuple[int, dict]]:
    """``(row index, row)`` of `num_prompts` random unseen rows whose prompts fit `max_prompt_length`."""
    rows = load_rows(plan.dataset, cfg.dataset_split)
    if len(rows) <= plan.skip_rows:
        raise UserError(
            f"dataset {plan.dataset!r} has {len(rows)} rows, all within the {plan.skip_rows} used for training; "
            "pass --dataset with held-out prompts or lower --skip-rows"
        )
    fitting = [
        (i, row)
        for i, row in enumerate(rows)
        if i >= plan.skip_rows and len(row_prompt(tokenizer, row)[1]) <= cfg.max_prompt_length
    ]
    if not fitting:
        raise UserError(f"no unseen prompt fits --max-prompt-length {cfg.max_prompt_length}; raise it")
    if len(fitting) < cfg.num_prompts:
        logger.warning("only %d unseen prompts available; evaluating all of them", len(fitting))
    chosen = random.Random(cfg.seed).sample(range(len(fitting)), min(cfg.num_prompts, len(fitting)))
    return [fitting[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------- models
def load_policy_for_eval(name: str, device: torch.device):
    """``(model, tokenizer, resolved path)`` for a full model dir, a LoRA adapter dir, a checkpoint or a hub id."""
    path = resolve_model_path(name, "model-path")
    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        return _load_adapter(path, adapter_config, device)
    model = load_causal_lm(path, "model-path").to(device).eval()
    return model, load_tokenizer(path, "model-path"), path


def _load_adapter(path: str, adapter_config: str, device: torch.device):
    from peft import PeftModel

    with open(adapter_config, encoding="utf-8") as f:
        base_name = json.load(f).get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"adapter {path!r} does not name its base model (base_model_name_or_path)")
    base_path = resolve_model_path(base_name, "model-path")
    base = load_causal_lm(base_path, "model-path")
    model = PeftModel.from_pretrained(base, path).merge_and_unload().to(device).eval()
    tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base_path
    return model, load_tokenizer(tokenizer_dir, "model-path"), path


def prepare_for_inference(model, device, bf16: bool) -> None:
    """Eager attention on CPU (faster there; evaluation trains nothing, so the learning caveat of
    `smolppo.models.attention_for` does not apply); body weights stored in bf16 under bf16 (bit-identical under
    autocast, see `store_body_linears_in_bf16`; evaluation never saves a model). The LM head keeps requiring
    grad, so autocast casts it once per generation instead of once per token."""
    if model is None:
        return
    set_attention("eager" if torch.device(device).type == "cpu" else None, model)
    if bf16:
        store_body_linears_in_bf16(model)


# ---------------------------------------------------------------------- generation and scoring
def load_eval_reward(plan: EvalPlan, tokenizer, batch_size: int, device) -> CombinedReward:
    """The reward model (unless 'none') and the reward functions of the plan, weighted as in training."""
    reader = None
    if names_a_reward_model(plan.reward_model):
        reader = load_reward_reader(plan.reward_model, plan.reward_template, tokenizer, batch_size)
        reader.model.to(device)
    elif not plan.reward_funcs:
        raise UserError("the reward model is 'none' and no --reward-funcs are given; evaluation needs a reward")
    return build_reward(reader, plan.reward_funcs, plan.reward_weights)


@torch.no_grad()
def generate_and_score(cfg, model, tokenizer, reward, prompt_rows, device, progress=True) -> dict:
    """Completions, rewards and ranks for every prompt; returns a JSON-ready dict for one model."""
    from tqdm.auto import tqdm

    eos_ids = eos_token_ids(tokenizer, model)
    gen_config = sampling_config(tokenizer, eos_ids, cfg.max_new_tokens, cfg.temperature, top_p=cfg.top_p)
    prompts, prompt_ids = zip(*(row_prompt(tokenizer, row) for _, row in prompt_rows))
    per_batch = max(1, cfg.batch_size // cfg.num_completions)
    n = cfg.num_completions
    rewards = np.zeros((len(prompts), n))
    lengths = np.zeros((len(prompts), n))
    ended = np.zeros((len(prompts), n), dtype=bool)
    texts: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(cfg.seed)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not progress)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # less left padding per batch
    for start in range(0, len(prompts), per_batch):
        group = by_length[start : start + per_batch]
        batch = [prompt_ids[i] for i in group for _ in range(n)]
        rollout = generate_rollout(model, batch, tokenizer, eos_ids, gen_config)
        responses = response_texts(tokenizer, rollout)
        batch_rewards = RewardBatch(
            conversations=[row_conversation(prompt_rows[i][1]) for i in group for _ in range(n)],
            prompts=[prompts[i] for i in group for _ in range(n)],
            completions=responses,
            rows=[prompt_rows[i][1] for i in group for _ in range(n)],
        )
        scores = reward.score(batch_rewards)[0].float().numpy()
        for k, i in enumerate(group):
            for j in range(n):
                row = k * n + j
                rewards[i, j], lengths[i, j] = scores[row], int(rollout.response_lengths[row])
                ended[i, j] = bool(rollout.ended_with_eos[row])
                texts[i].append(responses[row])
        bar.update(len(group))
    bar.close()
    completions = []
    for i, (row_index, _) in enumerate(prompt_rows):
        prompt_rewards = rewards[i].tolist()
        for j, rank in enumerate(rank_labels(prompt_rewards)):
            completions.append(
                {
                    "tied": prompt_rewards.count(prompt_rewards[j]) > 1,
                    "prompt_index": i,
                    "dataset_row": row_index,
                    "completion_index": j,
                    "text": texts[i][j],
                    "reward": float(rewards[i, j]),
                    "rank": rank,
                    "length": int(lengths[i, j]),
                    "ended_with_eos": bool(ended[i, j]),
                }
            )
    return {
        "prompts": prompts,
        "completions": completions,
        "summary": summarise(rewards, lengths, ended),
        "rewards": rewards,
    }


def evaluate(cfg) -> dict:
    """Run the whole evaluation described by an `EvalConfig`; returns the JSON-ready report."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = ([cfg.baseline_model] if cfg.baseline_model else []) + list(cfg.model_path)
    first_local = next((n for n in cfg.model_path if looks_like_local_path(n)), None)
    training = training_config_for(first_local) if first_local else None
    plan = resolve_plan(cfg, training)
    reward = None
    prompt_rows = None
    results = []
    for name in names:
        model, tokenizer, path = load_policy_for_eval(name, device)
        if reward is None:
            reward = load_eval_reward(plan, tokenizer, cfg.batch_size, device)
            prepare_for_inference(reward.reader.model if reward.reader else None, device, cfg.bf16)
        prepare_for_inference(model, device, cfg.bf16)
        if prompt_rows is None:
            prompt_rows = select_prompt_rows(cfg, plan, tokenizer)
        logger.info("evaluating %s on %d prompts x %d completions", name, len(prompt_rows), cfg.num_completions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            result = generate_and_score(cfg, model, tokenizer, reward, prompt_rows, device)
        results.append({"name": name, "path": path, **result})
        del model
    base = results[0]
    comparisons = [
        {
            "model": r["name"],
            "baseline": base["name"],
            **compare(r["rewards"], base["rewards"], cfg.bootstrap_samples, cfg.seed),
        }
        for r in results[1:]
    ]
    from dataclasses import asdict

    return {
        "settings": {
            **asdict(cfg),
            "resolved_reward_model": reward.reader.model.name_or_path if reward.reader else None,
            "resolved_reward_template": reward.reader.template_name if reward.reader else None,
            "reward_sources": [{"name": n, "weight": w} for n, w in zip(reward.names, reward.weights)],
            "resolved_dataset": plan.dataset,
            "skipped_rows": plan.skip_rows,
        },
        "prompts": [
            {"prompt_index": i, "dataset_row": row_index, "text": text}
            for i, ((row_index, _), text) in enumerate(zip(prompt_rows, results[0]["prompts"]))
        ],
        "models": [
            {"name": r["name"], "path": r["path"], "summary": r["summary"], "completions": r["completions"]}
            for r in results
        ],
        "comparisons": comparisons,
    }


def check_output_writable(path: str) -> None:
    """One line before any generation when the JSON report could not be written at the end."""
    if os.path.isdir(path):
        raise UserError(f"--output {path!r} is a directory; give a file name such as {path}/evaluation.json")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the directory of --output {path!r}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--output {path!r} is not writable; choose another path")


def default_output_path(cfg) -> str:
    if cfg.output:
        return cfg.output
    first = cfg.model_path[0]
    if os.path.isdir(first):
        return os.path.join(first, "evaluation.json")
    return "evaluation.json"


def format_table(report: dict) -> str:
    """A compact console table of per-model summaries and comparisons."""
    lines = [
        f"{'model':<40} {'mean':>8} {'std':>7} {'median':>8} {'min':>8} {'max':>8} {'spread':>7} {'len':>6} {'eos':>5}"
    ]
    for model in report["models"]:
        s = model["summary"]
        lines.append(
            f"{_short(model['name']):<40} {s['reward_mean']:>8.4f} {s['reward_std']:>7.4f} {s['reward_median']:>8.4f} "
            f"{s['reward_min']:>8.4f} {s['reward_max']:>8.4f} {s['per_prompt_spread_mean']:>7.4f} "
            f"{s['response_length_mean']:>6.1f} {s['eos_rate']:>5.2f}"
        )
    for c in report["comparisons"]:
        lo, hi = c["ci95"]
        lines.append(
            f"{_short(c['model'])} vs {_short(c['baseline'])}: win {c['win_rate']:.2f} (W/T/L {c['wins']}/"
            f"{c['ties']}/{c['losses']}), mean reward diff {c['mean_reward_difference']:+.4f} "
            f"[95% CI {lo:+.4f}, {hi:+.4f}]"
        )
    return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
