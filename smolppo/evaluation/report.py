"""`evaluate_generations.py --report DIR`: the preference-adherence vs capability report of several models.

Input is the evaluation dict of `smolppo.evaluation.evaluate.evaluate` (every number is in it; the script writes it as
``report.json``). This module computes the report's statistics and renders ``report.md`` and three PNG figures.
Every file is written atomically, and only these file names are touched in DIR.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from smolppo.errors import UserError
from smolppo.files import REPORT_FILES
from smolppo.runs.output_dir import write_atomically

logger = logging.getLogger(__name__)

BEHAVIOUR_COLUMNS = [
    ("response_length_mean", "length"),
    ("eos_rate", "EOS rate"),
    ("truncated_rate", "truncated"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repeated_3gram_share", "repeated 3-grams"),
    ("degenerate_rate", "degenerate"),
]


# ---------------------------------------------------------------------- pure statistics
def rank_labels(rewards: list[float]) -> list[str]:
    """BEST for the highest reward, WORST for the lowest, MEDIUM in between. Equal rewards share a label, and
    when every completion of a prompt has the same reward they are all TIE."""
    high, low = max(rewards), min(rewards)
    if high == low:
        return ["TIE"] * len(rewards)
    return ["BEST" if r == high else "WORST" if r == low else "MEDIUM" for r in rewards]


def summarise(rewards: np.ndarray, lengths: np.ndarray, ended: np.ndarray, resampled: np.ndarray) -> dict:
    """Statistics of a ``[prompts, completions]`` reward matrix and its response lengths / EOS flags; the reward
    mean's interval resamples prompts with the ``[samples, prompts]`` indices `resampled`."""
    flat = rewards.ravel()
    return {
        "reward_mean": float(flat.mean()),
        "reward_mean_ci95": bootstrap_ci(rewards.mean(1), resampled),
        "reward_std": float(flat.std(ddof=1)) if flat.size > 1 else 0.0,
        "reward_median": float(np.median(flat)),
        "reward_min": float(flat.min()),
        "reward_max": float(flat.max()),
        "per_prompt_spread_mean": float((rewards.max(1) - rewards.min(1)).mean()),
        "response_length_mean": float(lengths.mean()),
        "eos_rate": float(ended.mean()),
        "num_completions": int(flat.size),
    }


def compare(rewards: np.ndarray, baseline: np.ndarray, resampled: np.ndarray) -> dict:
    """Model vs baseline on the same prompts (``[prompts, completions]`` each).

    A prompt is won when the model's mean reward over its completions is higher than the baseline's; ties
    are counted apart. The mean reward difference and the win rate get bootstrap 95 % intervals over prompts.
    """
    per_prompt = rewards.mean(1) - baseline.mean(1)
    wins, ties = int((per_prompt > 0).sum()), int((per_prompt == 0).sum())
    return {
        "wins": wins,
        "ties": ties,
        "losses": len(per_prompt) - wins - ties,
        "win_rate": wins / len(per_prompt),
        "win_rate_ci95": bootstrap_ci(per_prompt > 0, resampled),
        "tie_rate": ties / len(per_prompt),
        "mean_reward_difference": float(rewards.mean() - baseline.mean()),
        "ci95": bootstrap_ci(per_prompt, resampled),
    }


def bootstrap_ci(values: np.ndarray, resampled: np.ndarray) -> list[float]:
    """95 % percentile interval of the mean of `values` over the index matrix `resampled` ``[samples, n]``."""
    means = np.asarray(values, dtype=float)[resampled].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def resample_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """The bootstrap's ``[samples, n]`` draws over `n` prompts; one seed gives every model the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


# ---------------------------------------------------------------------- writing
def check_report_dir(directory: str) -> None:
    """One line before any generation when the report could not be written at the end."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"--report {directory!r} is a file; give a directory for report.md and its figures")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the --report directory {directory!r}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK):
        raise UserError(f"--report directory {directory!r} is not writable; choose another")


def write_report(directory: str, report: dict) -> list[str]:
    """report.md and the figures in `directory` (the JSON is written by the caller); returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    path = {key: os.path.join(directory, name) for key, name in REPORT_FILES.items()}
    figures = _write_figures(path, report)
    text = render_markdown(report, {key: os.path.basename(p) for key, p in figures.items()})
    write_atomically(path["markdown"], lambda tmp: _write_text(tmp, text))
    return [path["markdown"], *figures.values()]


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_figures(path: dict, report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    written = {}
    for key, x_key, x_label in (
        ("reward_vs_kl", "kl_to_baseline_mean", "KL to the baseline (nats per completion)"),
        ("reward_vs_perplexity", "reference_perplexity", "perplexity of held-out reference answers"),
    ):
        points = [(m, m["summary"].get(x_key)) for m in models]
        if x_key == "kl_to_baseline_mean" and len(models) > 1:
            points[0] = (models[0], 0.0)  # the baseline is at KL 0 from itself
        points = [(m, x) for m, x in points if x is not None and math.isfinite(x)]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m, x in points:
            s = m["summary"]
            low, high = s["reward_mean_ci95"]
            ax.errorbar(
                [x],
                [s["reward_mean"]],
                yerr=[[s["reward_mean"] - low], [high - s["reward_mean"]]],
                fmt="o",
                capsize=4,
                label=_label(m["name"]),
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel("reward (mean, 95 % CI over prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, path[key])
        written[key] = path[key]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    max_new = report["settings"]["max_new_tokens"]
    bins = np.arange(0, max_new + 2) - 0.5 if max_new <= 64 else np.linspace(0, max_new + 1, 33)
    for m in models:
        ax.hist(
            [c["length"] for c in m["completions"]], bins=bins, histtype="step", linewidth=1.5, label=_label(m["name"])
        )
    ax.axvline(max_new, color="grey", linestyle="--", linewidth=1, label="max_new_tokens")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("completions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path["lengths"])
    written["lengths"] = path["lengths"]
    plt.close("all")
    return written


def _save(fig, path: str) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _label(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


# ---------------------------------------------------------------------- markdown
def render_markdown(report: dict, figures: dict[str, str]) -> str:
    settings, models = report["settings"], report["models"]
    baseline = models[0]["name"]
    lines = [
        "# Preference adherence vs capability kept",
        "",
        f"{len(report['prompts'])} held-out prompts from `{settings['resolved_dataset']}` (rows from "
        f"{settings['skipped_rows']} on), {settings['num_completions']} completions each, temperature "
        f"{settings['temperature']}, top-p {settings['top_p']}, at most {settings['max_new_tokens']} new tokens, "
        f"seed {settings['seed']}. Reward: {_sources(settings)}. Baseline: `{baseline}`.",
        "",
        "## Preference adherence",
        "",
        "Reward: mean over all completions, 95 % bootstrap interval over prompts. A prompt is won when the model's "
        "mean reward over its completions beats the baseline's.",
        "",
        _table(
            ["model", "reward", "95 % CI", "win rate", "win-rate CI", "W/T/L", "vs baseline", *_source_names(models)],
            [_adherence_row(m, report) for m in models],
        ),
        "",
        "## Capability kept",
        "",
        "Reference answers: the held-out rows' `chosen` answers, scored token by token under each model (temperature "
        "1); lower perplexity means the model still finds good answers likely. KL to the baseline: the exact "
        "per-token KL over the whole vocabulary at the sampling temperature, summed over each of the model's own "
        "completions and averaged.",
        "",
        _table(
            ["model", "log-likelihood / token", "perplexity", "references", "KL to baseline", "KL / token"],
            [_capability_row(m) for m in models],
        ),
        "",
        "## Behaviour",
        "",
        "Truncated: ran out of `max_new_tokens`. Distinct-n: unique n-grams over all n-grams of the model's "
        "completions. Repeated 3-grams: share of a completion's 3-grams seen earlier in it (mean). Degenerate: a "
        "3-gram repeated 4 or more times in one completion, the first sign of reward hacking by repetition.",
        "",
        _table(
            ["model", *[label for _, label in BEHAVIOUR_COLUMNS]],
            [[f"`{_label(m['name'])}`", *[_fmt(_behaviour(m, key)) for key, _ in BEHAVIOUR_COLUMNS]] for m in models],
        ),
        "",
    ]
    lines += _trade_off(models, figures)
    lines += _side_by_side(report, settings.get("report_examples", 3))
    return "\n".join(lines) + "\n"


def _sources(settings: dict) -> str:
    parts = [f"`{s['name']}` x {s['weight']:g}" for s in settings["reward_sources"]]
    template = settings.get("resolved_reward_template")
    return ", ".join(parts) + (f" (reward model read with the `{template}` template)" if template else "")


def _source_names(models: list[dict]) -> list[str]:
    names = list(models[0]["summary"].get("reward_source_means", {}))
    return [f"`{n}` mean" for n in names] if len(names) > 1 else []


def _adherence_row(model: dict, report: dict) -> list[str]:
    s = model["summary"]
    row = [f"`{_label(model['name'])}`", _fmt(s["reward_mean"]), _interval(s["reward_mean_ci95"])]
    comparison = next((c for c in report["comparisons"] if c["model"] == model["name"]), None)
    if comparison is None:
        row += ["baseline", "", "", ""]
    else:
        row += [
            _fmt(comparison["win_rate"]),
            _interval(comparison["win_rate_ci95"]),
            f"{comparison['wins']}/{comparison['ties']}/{comparison['losses']}",
            f"{comparison['mean_reward_difference']:+.3f} {_interval(comparison['ci95'], signed=True)}",
        ]
    means = s.get("reward_source_means", {})
    return row + ([_fmt(v) for v in means.values()] if len(means) > 1 else [])


def _capability_row(model: dict) -> list[str]:
    s = model["summary"]
    return [
        f"`{_label(model['name'])}`",
        _fmt(s.get("reference_logprob_per_token")),
        _fmt(s.get("reference_perplexity")),
        str(s.get("num_references", "")),
        _fmt(s.get("kl_to_baseline_mean")),
        _fmt(s.get("kl_to_baseline_per_token")),
    ]


def _behaviour(model: dict, key: str):
    return model["summary"].get(key)


def _trade_off(models: list[dict], figures: dict[str, str]) -> list[str]:
    lines = ["## Trade-off", ""]
    base = models[0]["summary"]
    for m in models[1:]:
        s = m["summary"]
        said = [f"reward {s['reward_mean'] - base['reward_mean']:+.3f} over the baseline"]
        if s.get("kl_to_baseline_mean") is not None:
            said.append(f"at KL {s['kl_to_baseline_mean']:.2f} nats per completion")
        ppl, ppl0 = s.get("reference_perplexity"), base.get("reference_perplexity")
        if ppl and ppl0 and math.isfinite(ppl) and math.isfinite(ppl0):
            said.append(f"reference perplexity x{ppl / ppl0:.3f}")
        shift = _behaviour(m, "degenerate_rate"), _behaviour(models[0], "degenerate_rate")
        if None not in shift:
            said.append(f"degenerate completions {shift[1]:.0%} -> {shift[0]:.0%}")
        lines.append(f"- `{_label(m['name'])}`: " + ", ".join(said) + ".")
    if len(models) == 1:
        lines.append("One model only: pass a --baseline-model (e.g. the SFT model) to compare against it.")
    lines.append("")
    for key, caption in (
        ("reward_vs_kl", "Reward against KL to the baseline"),
        ("reward_vs_perplexity", "Reward against perplexity of the reference answers"),
        ("lengths", "Response lengths"),
    ):
        if key in figures:
            lines += [f"![{caption}]({figures[key]})", ""]
    return lines


def _side_by_side(report: dict, examples: int) -> list[str]:
    lines = [
        "## Completions side by side",
        "",
        "The best and the worst completion of each model on the same prompts.",
        "",
    ]
    for prompt in report["prompts"][:examples]:
        lines += [
            f"### Prompt {prompt['prompt_index']} (dataset row {prompt['dataset_row']})",
            "",
            _quote(prompt.get("question") or prompt["text"]),
            "",
        ]
        for m in report["models"]:
            own = [c for c in m["completions"] if c["prompt_index"] == prompt["prompt_index"]]
            best, worst = max(own, key=lambda c: c["reward"]), min(own, key=lambda c: c["reward"])
            lines.append(f"**`{_label(m['name'])}`**")
            lines.append("")
            for tag, c in (("best", best), ("worst", worst)):
                lines += [f"*{tag}, reward {c['reward']:.3f}, {c['length']} tokens*", "", _quote(c["text"]), ""]
    return lines


def _quote(text: str) -> str:
    text = text.strip() or "(empty)"
    return "\n".join("> " + line.replace("|", "\\|") for line in text.splitlines())


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(ci: list[float], signed: bool = False) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


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
