"""A reward of 0 or 1 (odd number of characters): groups of responses often tie, which dynamic sampling drops."""


def odd_length(prompts, completions, **columns):
    return [float(len(text) % 2) for text in completions]
