"""The model card written beside a finished run's model, and pushing the run to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import os

from smolppo.errors import UserError

logger = logging.getLogger(__name__)

CARD_METRICS = ("rewards/mean", "kl_divergence", "loss", "objective/kl_coef", "response/length_mean")
CARD_SETTINGS = (
    "advantage_estimator",
    "samples_per_prompt",
    "use_lora",
    "learning_rate",
    "rollout_batch_size",
    "mini_batch_size",
    "ppo_epochs",
    "init_kl_coef",
    "kl_target",
    "temperature",
    "max_new_tokens",
    "num_samples",
    "seed",
)


def model_card(summary: dict) -> str:
    """Markdown describing a finished run: what was trained from what, against which reward, and how it ended."""
    config = summary["config"]
    lora = config.get("use_lora")
    sources = ", ".join(f"{s['name']} x {s['weight']:g}" for s in summary.get("reward_sources", [])) or "-"
    check = summary.get("reward_model_check") or {}
    lines = [
        "---",
        f"base_model: {config['policy_model']}",
        f"library_name: {'peft' if lora else 'transformers'}",
        "tags: [smolppo, rlhf, "
        + ("ppo" if config["advantage_estimator"] == "gae" else config["advantage_estimator"])
        + "]",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(config['output_dir']))}",
        "",
        f"{'A LoRA adapter for' if lora else 'A fine-tune of'} `{config['policy_model']}` trained with smolppo "
        f"(advantage estimator `{config['advantage_estimator']}`) on prompts from `{config['dataset']}` for "
        f"{summary['updates']} updates ({summary['episodes']} responses).",
        "",
        f"- reward model: `{config['reward_model']}` (read with the `{summary.get('reward_template')}` template)",
        f"- reward sources and weights: {sources}",
    ]
    if check:
        lines.append(
            f"- reward model check before training: pairwise accuracy {check['pairwise_accuracy']:.3f} on "
            f"{check['num_pairs']} held-out pairs"
        )
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    metrics = summary.get("final_metrics", {})
    lines += [f"| `{k}` | {metrics[k]:.4g} |" for k in CARD_METRICS if k in metrics]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {config[k]} |" for k in CARD_SETTINGS if k in config]
    full = json.dumps(config, indent=2, sort_keys=True, default=str)
    lines += ["", "<details><summary>Full configuration</summary>", "", "```json", full, "```", "", "</details>", ""]
    return "\n".join(lines)


def push_to_hub(output_dir: str, repo_id: str | None, private: bool) -> str:
    """Upload the final model, tokenizer, card and summary (no checkpoints or logs); one line when it fails."""
    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=output_dir,
            ignore_patterns=["checkpoint-*", "logs/*", ".*", "unpublished-*", "*.lock"],
        )
    except Exception as exc:  # noqa: BLE001 - offline, no token, no permission: all end the same way
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"could not push {output_dir!r} to the hub as {repo_id!r} ({type(exc).__name__}: {first_line}); the "
            f"local outputs are complete and untouched: push them later with `hf upload {repo_id} "
            f"{output_dir}`"
        ) from exc
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, url.repo_id)
    return url.repo_id
