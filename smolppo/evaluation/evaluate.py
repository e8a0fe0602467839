"""Sample completions for unseen prompts, score them with the reward model, rank, summarise and compare models.

Generation and scoring reuse the trainer's code (`smolppo.algorithm.rollout`, `smolppo.rewards.reader`), so a
reward here means exactly what `rewards/mean` meant during training: the reward model's own reading of the
conversation.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from smolppo import files
from smolppo.algorithm.behaviour import behaviour_metrics
from smolppo.algorithm.rollout import generate_rollout, response_texts, response_tokens, sampling_config
from smolppo.configs import DEFAULT_DATASET, DEFAULT_NUM_SAMPLES, DEFAULT_REWARD_MODEL
from smolppo.configs.ppo_fields import names_a_reward_model
from smolppo.data import load_rows, row_conversation, row_prompt
from smolppo.errors import UserError
from smolppo.evaluation import capability
from smolppo.evaluation.report import compare, rank_labels, resample_indices, summarise
from smolppo.files import RUN_SUMMARY_FILE, STATE_FILE
from smolppo.models import eos_token_ids, load_causal_lm, load_tokenizer, resolve_model_path
from smolppo.paths import looks_like_local_path
from smolppo.rewards.reader import load_reward_reader
from smolppo.rewards.sources import CombinedReward, RewardBatch, build_reward
from smolppo.runtime import set_attention, store_body_linears_in_bf16

logger = logging.getLogger(__name__)


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
    adapter_config = os.path.join(path, files.ADAPTER_CONFIG)
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
    `smolppo.runtime.attention_for` does not apply); body weights stored in bf16 under bf16 (bit-identical under
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
    """Completions, rewards and ranks for every prompt, with each model's rollouts kept for the report's KL."""
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
    tokens: list[list[list[int]]] = [[] for _ in prompts]
    parts: dict[str, np.ndarray] = {name: np.zeros((len(prompts), n)) for name in reward.names}
    rollouts, order = [], []  # order: (prompt, completion) of each rollout row
    torch.manual_seed(cfg.seed)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not progress)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # less left padding per batch
    for start in range(0, len(prompts), per_batch):
        group = by_length[start : start + per_batch]
        batch = [prompt_ids[i] for i in group for _ in range(n)]
        rollout = generate_rollout(model, batch, tokenizer, eos_ids, gen_config)
        rollouts.append(rollout)
        order.extend((i, j) for i in group for j in range(n))
        responses = response_texts(tokenizer, rollout)
        response_ids = response_tokens(rollout)
        batch_rewards = RewardBatch(
            conversations=[row_conversation(prompt_rows[i][1]) for i in group for _ in range(n)],
            prompts=[prompts[i] for i in group for _ in range(n)],
            completions=responses,
            rows=[prompt_rows[i][1] for i in group for _ in range(n)],
        )
        total, by_source = reward.score(batch_rewards, "cpu")  # read per completion below: one copy to the host
        scores = total.float().numpy()
        response_lengths, ended_with_eos = rollout.response_lengths.tolist(), rollout.ended_with_eos.tolist()
        for k, i in enumerate(group):
            for j in range(n):
                row = k * n + j
                rewards[i, j], lengths[i, j] = scores[row], response_lengths[row]
                ended[i, j] = ended_with_eos[row]
                texts[i].append(responses[row])
                tokens[i].append(response_ids[row])
                for name, values in by_source.items():
                    parts[name][i, j] = float(values[row])
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
                    **(
                        {"rewards_by_source": {k: _number(v[i, j]) for k, v in parts.items()}}
                        if len(parts) > 1
                        else {}
                    ),
                }
            )
    behaviour = behaviour_metrics([t for per_prompt in tokens for t in per_prompt], (~ended.ravel()).tolist())
    return {
        "prompts": prompts,
        "completions": completions,
        "rewards": rewards,
        "lengths": lengths,
        "ended": ended,
        "source_means": {name: _nanmean(values) for name, values in parts.items()},
        "behaviour": {key.split("/", 1)[1]: value for key, value in behaviour.items()},
        "tokens": tokens,
        "rollouts": rollouts,
        "order": order,
    }


def evaluate(cfg) -> dict:
    """Run the whole evaluation described by an `EvalConfig`; returns the JSON-ready report."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = ([cfg.baseline_model] if cfg.baseline_model else []) + list(cfg.model_path)
    first_local = next((n for n in cfg.model_path if looks_like_local_path(n)), None)
    training = training_config_for(first_local) if first_local else None
    plan = resolve_plan(cfg, training)
    reward = prompt_rows = references = baseline = None
    results = []
    for index, name in enumerate(names):
        model, tokenizer, path = load_policy_for_eval(name, device)
        if reward is None:
            reward = load_eval_reward(plan, tokenizer, cfg.batch_size, device)
            prepare_for_inference(reward.reader.model if reward.reader else None, device, cfg.bf16)
        prepare_for_inference(model, device, cfg.bf16)
        if prompt_rows is None:
            prompt_rows = select_prompt_rows(cfg, plan, tokenizer)
            if cfg.report:
                rows = [row for _, row in prompt_rows]
                references = capability.reference_sequences(
                    tokenizer, rows, tokenizer.eos_token_id, cfg.reference_max_tokens
                )
        logger.info("evaluating %s on %d prompts x %d completions", name, len(prompt_rows), cfg.num_completions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            result = generate_and_score(cfg, model, tokenizer, reward, prompt_rows, device)
            if cfg.report:
                result["capability"] = _capability(cfg, model, baseline, tokenizer.pad_token_id, references, result)
        del result["rollouts"], result["order"]  # only the KL above reads them
        results.append({"name": name, "path": path, **result})
        if cfg.report and index == 0 and len(names) > 1:
            baseline = model  # kept for the KL of every other model
        del model
    return _assemble(cfg, plan, reward, prompt_rows, results)


def _capability(cfg, model, baseline, pad_id: int, references, result) -> dict:
    """Reference-answer likelihood and, for every model after the first, KL to the first on its completions."""
    logprobs = capability.reference_logprobs(model, references, pad_id, max(1, cfg.batch_size // 4))
    out = capability.likelihood_summary(logprobs, references)
    out["reference_logprobs"] = logprobs
    if baseline is None:
        return out
    if not capability.same_vocabulary(model, baseline):
        logger.warning("the model's vocabulary differs from the baseline's; no KL to the baseline")
        return out
    per_row = capability.kl_to_baseline(model, baseline, result["rollouts"], cfg.temperature)
    kl = np.zeros(result["rewards"].shape)
    for (i, j), value in zip(result["order"], per_row):
        kl[i, j] = value
    per_token = float(kl.sum() / max(result["lengths"].sum(), 1))
    out.update(kl_to_baseline=kl, kl_to_baseline_mean=float(kl.mean()), kl_to_baseline_per_token=per_token)
    return out


def _assemble(cfg, plan, reward, prompt_rows, results) -> dict:
    """The JSON-ready evaluation: settings, prompts, each model's summary and completions, comparisons."""
    from dataclasses import asdict

    resampled = resample_indices(len(prompt_rows), cfg.bootstrap_samples, cfg.seed)
    base = results[0]
    models = []
    for r in results:
        summary = {
            **summarise(r["rewards"], r["lengths"], r["ended"], resampled),
            **r["behaviour"],
            "reward_source_means": r["source_means"],
        }
        capability_kept = r.get("capability", {})
        summary.update({k: v for k, v in capability_kept.items() if not isinstance(v, (list, np.ndarray))})
        completions = r["completions"]
        if cfg.report:
            kl = capability_kept.get("kl_to_baseline")
            for c in completions:
                i, j = c["prompt_index"], c["completion_index"]
                c["token_ids"] = r["tokens"][i][j]
                if kl is not None:
                    c["kl_to_baseline"] = float(kl[i, j])
        models.append({"name": r["name"], "path": r["path"], "summary": summary, "completions": completions})
        if cfg.report:
            models[-1]["reference_logprobs"] = capability_kept.get("reference_logprobs")
    comparisons = [
        {"model": r["name"], "baseline": base["name"], **compare(r["rewards"], base["rewards"], resampled)}
        for r in results[1:]
    ]
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
            {"prompt_index": i, "dataset_row": row_index, "text": text, "question": row_conversation(row)[1]}
            for i, ((row_index, row), text) in enumerate(zip(prompt_rows, results[0]["prompts"]))
        ],
        "models": models,
        "comparisons": comparisons,
    }


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _nanmean(values: np.ndarray) -> float | None:
    """Mean over the completions a reward source applies to (it returned None for the others)."""
    applies = ~np.isnan(values)
    return float(values[applies].mean()) if applies.any() else None


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
    if cfg.report:
        from smolppo.files import REPORT_FILES

        return os.path.join(cfg.report, REPORT_FILES["json"])
    first = cfg.model_path[0]
    if os.path.isdir(first):
        return os.path.join(first, files.EVALUATION_FILE)
    return files.EVALUATION_FILE
