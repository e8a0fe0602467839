"""What the responses look like, beyond their reward: diversity and repetition, the first signs of reward hacking.

Pure functions over token-id lists (the real response tokens, without the EOS); no model, no I/O.

* ``distinct_n``: unique n-grams / all n-grams over a batch (Li et al., 2016); it falls when the policy collapses
  onto a few phrasings.
* ``repeated_ngram_share``: within one response, the share of its n-grams that repeat an earlier one.
* ``is_degenerate``: one n-gram occurs at least ``times`` times in a response ("1.1.1.1.1", "2. Electricity\n3.
  Electricity\n..."), the measure the reward-hacking report of the real SmolLM2 run used (3-grams, 4 times).
"""

from __future__ import annotations

import math
from collections import Counter

DEGENERATE_N, DEGENERATE_TIMES = 3, 4
HELD_TARGET_BAND = (0.75, 1.25)  # a KL within this share of its target is held there (the penalty report's kinds)


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of the batch; 0.0 when no response has n tokens."""
    grams = [gram for tokens in responses for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(tokens: list[int], n: int = DEGENERATE_N) -> float:
    """Share of the response's n-grams that repeat one seen earlier in it (0.0 for a response shorter than n)."""
    grams = ngrams(tokens, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def is_degenerate(tokens: list[int], n: int = DEGENERATE_N, times: int = DEGENERATE_TIMES) -> bool:
    """Some n-gram occurs at least `times` times in the response."""
    counts = Counter(ngrams(tokens, n))
    return bool(counts) and max(counts.values()) >= times


def behaviour_metrics(responses: list[list[int]], truncated: list[bool]) -> dict[str, float]:
    """The batch's behaviour scalars (``response/...``) from its response tokens and which ran out of tokens."""
    count = max(len(responses), 1)
    return {
        "response/truncated_rate": sum(truncated) / count,
        "response/distinct_1": distinct_n(responses, 1),
        "response/distinct_2": distinct_n(responses, 2),
        "response/repeated_3gram_share": sum(map(repeated_ngram_share, responses)) / count,
        "response/degenerate_rate": sum(map(is_degenerate, responses)) / count,
    }


class BehaviourWatch:
    """Watches the behaviour scalars for the signs of reward hacking and says so once per kind.

    From ``2 * window`` updates on, the mean of the last `window` updates is compared with the first `window`:

    * ``diversity``: the reward rose while distinct-1 or distinct-2 fell below `diversity_fraction` of its start;
    * ``degenerate``: at least `degenerate_rate` of the responses repeat a 3-gram 4+ times, up from the start;
    * ``length``: at least `truncated_rate` of the responses run out of tokens, where fewer did at the start;
    * ``dominant_source``: with several reward sources, one brings at least `dominant_share` of the (weighted)
      reward gain;
    * ``length_collapse``: the mean response length fell below `length_fraction` of its start and below
      `collapsed_length` tokens (answers of a word, or none; a task that pays for concise answers shortens them
      from 40 to 11.5 tokens, which is not flagged);
    * ``saturated``: the reward's spread over the batch fell below `saturation_fraction` of its start: every
      response scores the same, nothing is left to learn (often the reward's maximum, reached by a collapse);

    `penalty_report` says, at the end of a run, whether the KL penalty came to outweigh the score (a run-level
    finding, not a sign of hacking: issue 32's stalled run, 3.6x with the RLHF reward -0.47 -> -5.1), and whether
    the penalty drowned the reward or holds the KL at its target. `observe` returns the new warnings; `warnings`
    keeps them all; `state_dict` / `load_state_dict` carry the watch across a resume.
    """

    WATCHED = (
        "rewards/mean",
        "response/distinct_1",
        "response/distinct_2",
        "response/degenerate_rate",
        "response/truncated_rate",
        "response/length_mean",
        "rewards/std",
        "objective/kl_penalty_to_score",
        "objective/rlhf_reward",
        "kl_divergence",
    )

    def __init__(
        self,
        reward_weights: dict[str, float],
        window: int = 3,
        diversity_fraction: float = 0.5,
        degenerate_rate: float = 0.1,
        truncated_rate: float = 0.9,
        dominant_share: float = 0.9,
        length_fraction: float = 0.3,
        collapsed_length: float = 4.0,
        saturation_fraction: float = 0.05,
        penalty_ratio: float = 2.0,
    ):
        self.length_fraction, self.saturation_fraction = length_fraction, saturation_fraction
        self.collapsed_length = collapsed_length
        self.penalty_ratio = penalty_ratio
        self.reward_weights = dict(reward_weights)
        self.window, self.diversity_fraction = window, diversity_fraction
        self.degenerate_rate, self.truncated_rate, self.dominant_share = (
            degenerate_rate,
            truncated_rate,
            dominant_share,
        )
        self.history: list[dict[str, float]] = []
        self.warnings: list[dict] = []

    def observe(self, metrics: dict[str, float], update: int) -> list[dict]:
        keys = self.WATCHED + tuple(f"rewards/{name}" for name in self.reward_weights)
        self.history.append({k: float(metrics[k]) for k in keys if k in metrics})
        if len(self.history) < 2 * self.window:
            return []
        start, now = self._mean(self.history[: self.window]), self._mean(self.history[-self.window :])
        fired = {w["kind"] for w in self.warnings}
        new = [
            {"kind": kind, "update": update, "message": message}
            for kind, message in self._findings(start, now)
            if kind not in fired
        ]
        self.warnings.extend(new)
        return new

    def _findings(self, start: dict, now: dict):
        reward_gain = now["rewards/mean"] - start["rewards/mean"]
        for n in (1, 2):  # fewer distinct tokens, or fewer distinct token pairs: either is a collapse
            key = f"response/distinct_{n}"
            d_start, d_now = start.get(key, 0.0), now.get(key, 0.0)
            if reward_gain > 0 and d_start > 0 and d_now < self.diversity_fraction * d_start:
                message = (
                    f"responses lost diversity while the reward rose (distinct-{n} {d_now:.2f}, from {d_start:.2f}; "
                    f"reward {reward_gain:+.2f}): the policy may be exploiting the reward; raise --init-kl-coef or "
                    "lower --kl-target, and read the logged samples"
                )
                yield "diversity", message
                break
        degenerate, degenerate_start = (
            now.get("response/degenerate_rate", 0.0),
            start.get("response/degenerate_rate", 0.0),
        )
        if degenerate >= self.degenerate_rate and degenerate > degenerate_start:
            message = (
                f"{degenerate:.0%} of responses repeat a 3-gram 4+ times (from {degenerate_start:.0%}): degenerate "
                "text the reward pays for; lower --kl-target (KL), raise --init-kl-coef, or add a repetition penalty "
                "with --reward-funcs / --reward-weights"
            )
            yield "degenerate", message
        truncated, truncated_start = now.get("response/truncated_rate", 0.0), start.get("response/truncated_rate", 1.0)
        if truncated >= self.truncated_rate > truncated_start:
            message = (
                f"{truncated:.0%} of responses now run out of --max-new-tokens (from {truncated_start:.0%}): the "
                "reward may pay for length; set --missing-eos-score (or --missing-eos-penalty) so that an unfinished "
                "answer scores low"
            )
            yield "length", message
        gains = {
            name: weight * (now.get(f"rewards/{name}", 0.0) - start.get(f"rewards/{name}", 0.0))
            for name, weight in self.reward_weights.items()
        }
        total = sum(gains.values())
        if len(gains) > 1 and total > 0:
            name, gain = max(gains.items(), key=lambda item: item[1])
            if gain >= self.dominant_share * total:
                message = (
                    f"reward source {name!r} brings {gain / total:.0%} of the reward gain, the others barely move: "
                    "check its scale and --reward-weights"
                )
                yield "dominant_source", message

        yield from self._collapse_findings(start, now)

    def _collapse_findings(self, start: dict, now: dict):
        length, length_start = now.get("response/length_mean"), start.get("response/length_mean")
        shrunk = length is not None and length_start and length < self.length_fraction * length_start
        if shrunk and length < self.collapsed_length:
            message = (
                f"responses collapsed to {length:.1f} tokens (from {length_start:.1f}): the reward may pay for saying "
                "little or one repeated word; read the logged samples, raise --init-kl-coef, or add a length or "
                "content term with --reward-funcs"
            )
            yield "length_collapse", message
        spread, spread_start = now.get("rewards/std"), start.get("rewards/std")
        if spread is not None and spread_start and spread < self.saturation_fraction * spread_start:
            message = (
                f"the reward has no spread left (std {spread:.3g}, from {spread_start:.3g}): every response scores "
                "the same, so there is nothing left to learn; if the samples are degenerate the reward was hacked, "
                "otherwise stop here or use a harder reward"
            )
            yield "saturated", message

    def penalty_report(self, kl_target: float | None = None) -> dict | None:
        """At the end of a run: whether the KL penalty came to outweigh the score (`kl_penalty_to_score` above
        `penalty_ratio` in the last window, from below 1 in the first) while the RLHF reward (score - penalty) fell
        below its start; ``None`` when it did not. The run summary says so, with what to do, which depends on where
        the KL ended against the controller's `kl_target` (``None``: a fixed coefficient):

        * ``holding_target``: the KL ran within 0.75-1.25x its target. The penalty is what holds the policy at the
          target against a reward that pulls further (a strong reward model needs a coefficient several times its
          start to hold it: measured on the real task, 2.0-2.9x the score's spread while the runs learned fully);
          more updates at this target gain little: raise --kl-target to let the policy go further.
        * ``over_target``: the KL stayed above 1.25x its target although the penalty outweighs the score: the
          policy moves faster than the coefficient pulls it back (GRPO on the noisy real task, its coefficient at
          the bound); a lower learning rate lets the controller keep up.
        * ``drowned``: the KL fell well under its target (or no controller steers it) and the penalty still
          outweighs the score: the coefficient outlived its overshoot (issue 32's stall: the KL at 0.7x its target
          with the coefficient at 25x its start); lower --init-kl-coef or slow the controller.

        The score over the same windows is quoted; whether it still rose did not tell the two apart on the
        real-model runs (a window's mean moves by about its noise in both)."""
        if len(self.history) < 2 * self.window:
            return None
        start, now = self._mean(self.history[: self.window]), self._mean(self.history[-self.window :])
        ratio, ratio_start = now.get("objective/kl_penalty_to_score"), start.get("objective/kl_penalty_to_score")
        objective, objective_start = now.get("objective/rlhf_reward"), start.get("objective/rlhf_reward")
        if None in (ratio, ratio_start, objective, objective_start):
            return None
        if not (ratio > self.penalty_ratio and ratio_start < 1.0 and objective < objective_start):
            return None
        score, score_start = now.get("rewards/mean"), start.get("rewards/mean")
        scored = "" if None in (score, score_start) else f", the score from {score_start:.2f} to {score:.2f}"
        kl = now.get("kl_divergence")
        kl_to_target = kl / kl_target if kl is not None and kl_target else None
        figures = (
            f"the KL penalty per response ended at {ratio:.1f}x the spread of the score and the RLHF reward (score "
            f"- penalty) fell from {objective_start:.2f} to {objective:.2f}{scored}"
        )
        low, high = HELD_TARGET_BAND
        if kl_to_target is not None and kl_to_target > high:
            kind = "over_target"
            message = (
                f"{figures}, and the KL still ran at {kl_to_target:.2f}x its target: the policy moves faster than the "
                "penalty pulls it back; lower --learning-rate so that the controller keeps up, or raise --kl-target"
            )
        elif kl_to_target is not None and kl_to_target >= low:
            kind = "holding_target"
            message = (
                f"{figures}, with the KL at {kl_to_target:.2f}x its target: the penalty is what holds the policy at "
                "the target against a reward that pulls further, so more updates at this target gain little; raise "
                "--kl-target to let the policy move further"
            )
        else:
            kind = "drowned"
            where = "" if kl_to_target is None else f", with the KL down to {kl_to_target:.2f}x its target"
            message = (
                f"{figures}{where}: the penalty drowned the reward signal; lower --init-kl-coef, raise --kl-target, "
                "or slow the controller with a larger --kl-horizon"
            )
        return {
            "kind": kind,
            "penalty_to_score": ratio,
            "rlhf_reward_start": objective_start,
            "rlhf_reward_end": objective,
            "score_start": score_start,
            "score_end": score,
            "kl_to_target": kl_to_target,
            "message": message,
        }

    @staticmethod
    def _mean(rows: list[dict]) -> dict[str, float]:
        """Each figure's mean over the updates where it is defined (a ratio is nan, or null once resumed, in an
        update whose score had no spread); a figure defined in none of them is left out."""
        means = {}
        for key in set().union(*rows):
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values:
                means[key] = sum(values) / len(values)
        return means

    def state_dict(self) -> dict:
        return {"history": self.history, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.warnings = list(state.get("warnings", []))
