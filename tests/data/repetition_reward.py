"""A reward function that pays for repetition, for the behaviour watch's test: token pairs of the completion that
occurred earlier in it (the smoke policy's own tokenizer re-reads the text)."""

from smolppo import smoke
from smolppo.models import load_tokenizer

_TOKENIZER = load_tokenizer(smoke.materialise("tokenizer"))


def repeated_pairs(completions, **kwargs):
    out = []
    for text in completions:
        ids = _TOKENIZER(text, add_special_tokens=False)["input_ids"]
        pairs = list(zip(ids, ids[1:]))
        out.append((len(pairs) - len(set(pairs))) / 10)
    return out
