"""Example reward functions for `train_ppo.py --reward-funcs examples/reward_functions.py:NAME`.

Each takes trl's arguments - ``prompts`` (the prompt texts the policy saw), ``completions`` (the decoded responses)
and every dataset column as a keyword list (``system``, ``question``, ...) - and returns one float per completion,
or None where it does not apply. Accept ``**kwargs`` so columns you do not use are ignored.
"""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text.lower())


def readable_text(completions: list[str], **kwargs) -> list[float]:
    """Share of characters that are letters, digits, spaces or common punctuation (a format reward)."""
    return [sum(ch.isalnum() or ch in " .,;:!?'-" for ch in c) / len(c) if c else 0.0 for c in completions]


def length_reward(completions: list[str], target_words: int = 8, **kwargs) -> list[float]:
    """0 at exactly `target_words` words, falling by 1 per `target_words` words away from it."""
    return [-abs(len(words(c)) - target_words) / target_words for c in completions]


def distinct_words(completions: list[str], **kwargs) -> list[float | None]:
    """Share of distinct words (penalises repetition); None for a completion without words."""
    return [len(set(w)) / len(w) if (w := words(c)) else None for c in completions]


def question_overlap(completions: list[str], question: list[str], **kwargs) -> list[float]:
    """Share of the question's words (longer than 3 letters) that the completion uses."""
    scores = []
    for completion, asked in zip(completions, question):
        wanted = {w for w in words(asked or "") if len(w) > 3}
        scores.append(len(wanted & set(words(completion))) / len(wanted) if wanted else 0.0)
    return scores
