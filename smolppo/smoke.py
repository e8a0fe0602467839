"""Everything the offline smoke preset needs, built locally: tokenizer, tiny policy, tiny reward model, prompts.

* ``smoke:tokenizer`` - a byte-level BPE tokenizer trained on the shipped rows, committed under ``assets/``
  (ChatML template; pad == EOS == ``<|im_end|>`` as in SmolLM2, so the pad/EOS handling is exercised).
* ``smoke:orca`` - ``assets/orca_smoke.jsonl``: 128 rows written for this project in the ORCA schema.
* ``smoke:policy`` - a randomly initialised 2-layer Llama causal LM (untied output head).
* ``smoke:reward`` - a 1-layer Llama sequence classifier whose weights are set by hand so that its score is
  an average "preference" of the tokens it reads: tokens that occur mostly in the shipped ``chosen`` answers
  score +1, those mostly in ``rejected`` ones -1. A policy can learn to raise it within a few dozen updates.

Models are written once to a cache directory (``SMOLPPO_SMOKE_DIR``, default ``<repo>/.smoke_models``),
atomically, and rebuilt when `SMOKE_VERSION` changes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections import Counter

import torch

from smolppo.errors import UserError
from smolppo.paths import ASSETS_DIR, REPO_DIR

logger = logging.getLogger(__name__)

SMOKE_VERSION = "3"
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tiny_tokenizer")
SMOKE_DATA = os.path.join(ASSETS_DIR, "orca_smoke.jsonl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


SMOKE_PREFIX = "smoke:"


ASSETS = ("tokenizer", "orca", "policy", "policy32", "reward")


def resolve(name: str) -> str:
    """Map ``smoke:<what>`` to the local file or directory the smoke preset uses; other names pass through."""
    if not name.startswith(SMOKE_PREFIX):
        return name
    what = name[len(SMOKE_PREFIX) :]
    if what not in ASSETS:
        raise UserError(
            f"unknown smoke name {name!r}; the smoke preset has {', '.join(SMOKE_PREFIX + a for a in ASSETS)}"
        )
    return materialise(what)


def resolve_config(config):
    """`config` with every ``smoke:`` name replaced by its local path (models built on first use). The one place
    the smoke preset's names are read: `smolppo.cli.parse_config` calls it, so nothing after parsing sees them."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and value.startswith(SMOKE_PREFIX):
            changes[f.name] = resolve(value)
        elif isinstance(value, list) and any(isinstance(v, str) and v.startswith(SMOKE_PREFIX) for v in value):
            changes[f.name] = [resolve(v) if isinstance(v, str) else v for v in value]
    return dataclasses.replace(config, **changes) if changes else config


def cache_dir() -> str:
    return os.environ.get("SMOLPPO_SMOKE_DIR", os.path.join(REPO_DIR, ".smoke_models"))


def materialise(what: str) -> str:
    """Local path for ``smoke:<what>``, building the model on first use."""
    if what == "tokenizer":
        return TOKENIZER_DIR
    if what == "orca":
        return SMOKE_DATA
    builders = {"policy": _build_policy, "policy32": _build_policy32, "reward": _build_reward}
    if what not in builders:
        raise ValueError(f"unknown smoke asset {what!r}; expected one of {', '.join(ASSETS)}")
    target = os.path.join(cache_dir(), what)
    if _built(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{what}-", dir=cache_dir())
    with torch.random.fork_rng(devices=[]):  # building must not change the caller's random stream
        builders[what](staging)
    with open(os.path.join(staging, "smoke_version.txt"), "w", encoding="utf-8") as f:
        f.write(SMOKE_VERSION)
    if os.path.isdir(target) and not _built(target):  # an older version: out of the way first
        stale = f"{staging}-stale"
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process (a rank of the same launch) finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
        if not _built(target):
            raise
    logger.info("built smoke %s model in %s", what, target)
    return target


def _built(target: str) -> bool:
    marker = os.path.join(target, "smoke_version.txt")
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        return f.read().strip() == SMOKE_VERSION


def load_smoke_rows() -> list[dict]:
    with open(SMOKE_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(out_dir: str, vocab_size: int = 320, chat_template: str = CHATML_TEMPLATE) -> None:
    """Train the committed byte-level BPE tokenizer on the shipped rows (run once; output is in git).

    Tests build variants of it (another size, another chat template) the same way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [row[k] for row in load_smoke_rows() for k in ("system", "question", "chosen", "rejected")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out_dir)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# The smoke policy's Llama shape (the benchmark's "tiny" shape too).
POLICY_SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    base = dict(
        POLICY_SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def _build_policy(out_dir: str, **shape) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    # Untied output head: on a 64-wide random model, LoRA on attention alone barely moves the logits (their
    # range is bounded by the tiny embedding norm after the final RMSNorm), so the LoRA smoke run adapts lm_head.
    model = LlamaForCausalLM(_llama_config(tokenizer, tie_word_embeddings=False, **shape))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_policy32(out_dir: str) -> None:
    """The smoke policy with 2 heads of 32 (not 4 of 16): vLLM's CPU attention needs heads of 32 or wider."""
    _build_policy(out_dir, num_attention_heads=2, num_key_value_heads=2)


def token_preferences(tokenizer) -> torch.Tensor:
    """+1 for tokens seen mostly in chosen answers, -1 for those seen mostly in rejected ones, else 0."""
    chosen, rejected = Counter(), Counter()
    for row in load_smoke_rows():
        chosen.update(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"])
        rejected.update(tokenizer(row["rejected"], add_special_tokens=False)["input_ids"])
    prefs = torch.zeros(len(tokenizer), device="cpu")  # written into a model saved to disk
    for token in set(chosen) | set(rejected):
        if chosen[token] >= 2 * rejected[token] + 3:
            prefs[token] = 1.0
        elif rejected[token] >= 2 * chosen[token] + 1:
            prefs[token] = -1.0
    return prefs


def _build_reward(out_dir: str) -> None:
    """A 1-layer Llama classifier wired so that score ~ pref(last token) + mean pref of all tokens read.

    Channel 0 of each embedding carries the token's preference and channel 1 a constant, so RMS norms act
    almost linearly. Zero query/key weights give uniform causal attention, which averages channel 0 over
    the sequence; value/output projections route that average back into channel 0; the MLP is off.
    """
    from transformers import LlamaForSequenceClassification

    tokenizer = _tokenizer()
    config = _llama_config(tokenizer, num_hidden_layers=1, num_labels=1, hidden_size=32, intermediate_size=64)
    model = LlamaForSequenceClassification(config)
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[:, 0] = token_preferences(tokenizer)
        embed[:, 1] = 8.0
        layer = model.model.layers[0]
        layer.self_attn.v_proj.weight[0, 0] = 1.0
        layer.self_attn.o_proj.weight[0, 0] = 1.0
        assert head_dim > 0
        model.score.weight[0, 0] = 30.0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
