"""What the responses look like, beyond their reward: diversity and repetition, the first signs of reward hacking.

Pure functions over token-id lists (the real response tokens, without the EOS); no model, no I/O.

* ``distinct_n``: unique n-grams / all n-grams over a batch (Li et al., 2016); it falls when the policy collapses
  onto a few phrasings.
* ``repeated_ngram_share``: within one response, the share of its n-grams that repeat an earlier one.
* ``is_degenerate``: one n-gram occurs at least ``times`` times in a response ("1.1.1.1.1", "2. Electricity\n3.
  Electricity\n..."), the measure the reward-hacking report of the real SmolLM2 run used (3-grams, 4 times).
"""

from __future__ import annotations

from collections import Counter

DEGENERATE_N, DEGENERATE_TIMES = 3, 4


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
