"""Pays for answers made of one repeated word: the share of the answer taken by its most frequent word."""

from collections import Counter


def most_frequent_word_share(prompts, completions, **columns):
    shares = []
    for text in completions:
        words = text.split()
        shares.append(Counter(words).most_common(1)[0][1] / len(words) if words else 0.0)
    return shares


def fewest_characters(prompts, completions, **columns):
    """Pays for saying (almost) nothing: 1 for an empty answer, 0.1 less for each character, down to 0."""
    return [max(0.0, 1.0 - 0.1 * len(text)) for text in completions]
