"""Reading a reward model exactly as it was trained. PPO, evaluation and reward-model training all use this.

A response is scored as text, not as the policy's token ids: the conversation
``[system (if any), user = question, assistant = response]`` is rendered with the *reward model's* tokenizer
and chat template, exactly as trl's `RewardTrainer` renders conversational training pairs, tokenised by that
tokenizer, right-padded with the reward model's own pad id, and passed through the model's own forward, so the
score comes from the model's own pooling (the last token that is not ``config.pad_token_id``). A reward model
with a different tokenizer, vocabulary or chat template than the policy therefore works unchanged.

Reward models trained on other layouts are read with ``reward_template``:

* ``chat`` (default): the reward tokenizer's own chat template;
* ``plain``: the prompt text (rendered as PPO shows it) followed by the response and the EOS token, tokenised
  as `RewardTrainer` tokenises non-conversational text;
* anything else: a Jinja chat template, given inline or as the path of a file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from smolppo.data import render_prompt, right_pad, row_conversation
from smolppo.errors import UserError
from smolppo.files import REWARD_SUMMARY_FILE
from smolppo.models import check_embeddings, load_sequence_classifier, resolve_model_path

logger = logging.getLogger(__name__)

CHAT, PLAIN = "chat", "plain"
TEMPLATE_FIX = "pass --reward-template plain (prompt + response + EOS) or --reward-template FILE.jinja"


def conversation(system: str, question: str, response: str) -> list[dict]:
    """The messages a reward model reads for one response (the system turn only when there is one)."""
    system = (system or "").strip()
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def recorded_template(path: str) -> str | None:
    """The ``reward_template`` that train_reward_model.py trained the model at `path` with, if it says so."""
    import json

    for directory in (path, os.path.dirname(os.path.abspath(path))):
        summary = os.path.join(directory, REWARD_SUMMARY_FILE)
        if os.path.isfile(summary):
            try:
                with open(summary, encoding="utf-8") as f:
                    return json.load(f).get("reward_template")
            except (OSError, ValueError, AttributeError):
                return None
    return None


def resolve_template(template: str | None, tokenizer, model_name: str) -> str | None:
    """The Jinja template to render with (None for ``plain``), failing with one line when there is none."""
    template = template or CHAT
    if template == PLAIN:
        return None
    if template == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"reward model {model_name!r} has no chat template to render the conversation with; {TEMPLATE_FIX}"
            )
        return tokenizer.chat_template
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            text = f.read()
        check_jinja(text, f"--reward-template file {template!r}")
        return text
    if "{" not in template:
        raise UserError(f"--reward-template {template!r} is not chat, plain, a Jinja template or an existing file")
    check_jinja(template, "--reward-template")
    return template


def check_jinja(template: str, what: str) -> None:
    """One line for a template Jinja cannot parse (before any model reads through it)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{what} is not a valid Jinja template (line {exc.lineno}: {exc.message}); fix it") from exc


class RewardReader:
    """Scores ``(system, question, response text)`` triples with a sequence classifier, as it was trained."""

    def __init__(self, model, tokenizer, template: str | None = None, batch_size: int = 16, name: str = "reward"):
        self.model = model
        self.tokenizer = tokenizer
        self.template_name = template or CHAT
        self.template = resolve_template(template, tokenizer, name)
        self.batch_size = batch_size
        self.pad_id = model.config.pad_token_id
        if self.pad_id is None and tokenizer.pad_token_id is not None:
            logger.warning("reward model %s has no pad_token_id: sequences are scored one at a time", name)

    def render(self, system: str, question: str, response: str) -> list[int]:
        """Token ids of one conversation, as `RewardTrainer` tokenises a training pair."""
        if self.template is None:
            text = render_prompt(self.tokenizer, system, question) + response
            if not text.endswith(self.tokenizer.eos_token):
                text += self.tokenizer.eos_token
            return self.tokenizer(text)["input_ids"]
        messages = conversation(system, question, response)
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"the reward template renders a conversation as nothing; {TEMPLATE_FIX}")
        return ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """The model's own output for each token sequence, ``[N]`` float32 on the model's device."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batch_size = self.batch_size if self.pad_id is not None else 1
        scores = torch.empty(len(sequences), dtype=torch.float32, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask = right_pad([sequences[i] for i in chunk], self.pad_id if self.pad_id is not None else 0)
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                scores[torch.tensor(chunk, device=device)] = logits[:, 0].float()
        finally:
            self.model.train(was_training)
        return scores

    def score(self, prompts: list[tuple[str, str]], responses: list[str]) -> torch.Tensor:
        """Scores ``[N]`` of each ``(system, question)`` prompt with its response text."""
        return self.score_ids([self.render(s, q, r) for (s, q), r in zip(prompts, responses)])


@dataclass
class PairwiseCheck:
    pairwise_accuracy: float
    margin: float
    num_pairs: int


def pairwise_check(reader: RewardReader, rows: list[dict], gather=None) -> PairwiseCheck:
    """Share of ORCA rows whose ``chosen`` answer the reward model scores above ``rejected``, and the mean margin.
    Under several processes each scores its share of `rows` and `gather` (accelerate's `gather_object`) joins the
    margins, so every process gets the same result."""
    prompts = [row_conversation(row) for row in rows]
    chosen = reader.score(prompts, [str(row["chosen"]) for row in rows])
    rejected = reader.score(prompts, [str(row["rejected"]) for row in rows])
    margin = chosen - rejected
    if gather is not None:
        margin = torch.tensor(gather(margin.tolist()), dtype=torch.float32, device="cpu")
    return PairwiseCheck(float((margin > 0).float().mean()), float(margin.mean()), len(margin))


def check_reward_model(
    reader: RewardReader, rows: list[dict], min_accuracy: float | None, gather=None
) -> PairwiseCheck | None:
    """Start-up check on held-out chosen/rejected rows: log it, warn below 0.6, refuse below `min_accuracy`.
    `rows` are this process's share when `gather` joins the shares (see `pairwise_check`)."""
    check = pairwise_check(reader, rows, gather) if rows or gather is not None else None  # every process gathers
    if check is None or check.num_pairs == 0:
        if min_accuracy is not None:
            raise UserError(
                f"--min-reward-accuracy {min_accuracy} cannot be checked: no held-out rows with chosen/rejected "
                "answers fit (rows after --num-samples, texts within --max-prompt-length); use a dataset with such "
                "rows or drop --min-reward-accuracy"
            )
        logger.info("reward-model check skipped: no held-out rows with chosen/rejected answers")
        return None
    logger.info(
        "reward-model check: chosen beats rejected on %.1f%% of %d held-out pairs, mean margin %+.3f",
        100 * check.pairwise_accuracy,
        check.num_pairs,
        check.margin,
    )
    if check.pairwise_accuracy < 0.6:
        logger.warning(
            "the reward model ranks chosen above rejected on only %.0f%% of %d held-out pairs: it is probably not "
            "being read as it was trained (conversation format %r, or the token it pools at). If it was trained on "
            "another layout, %s; if it is simply weak, expect PPO to optimise noise",
            100 * check.pairwise_accuracy,
            check.num_pairs,
            reader.template_name,
            TEMPLATE_FIX,
        )
    if min_accuracy is not None and check.pairwise_accuracy < min_accuracy:
        raise UserError(
            f"reward model pairwise accuracy {check.pairwise_accuracy:.3f} on {check.num_pairs} held-out pairs is "
            f"below --min-reward-accuracy {min_accuracy}; fix --reward-template or --reward-model, or lower the bar"
        )
    return check


def load_reward_tokenizer(path: str, fallback):
    """The reward model's own tokenizer (RewardTrainer saves it beside the weights), else `fallback`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found with reward model %s; reading it with the policy's tokenizer", path)
        return fallback
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_reader(name: str, template: str | None, fallback_tokenizer, batch_size: int = 16) -> RewardReader:
    """The reward model with its own tokenizer, read as it was trained (see `smolppo.rewards.reader`)."""
    path = resolve_model_path(name, "reward-model")
    model = load_sequence_classifier(path, "reward-model")
    tokenizer = load_reward_tokenizer(path, fallback_tokenizer)
    check_embeddings(model, tokenizer, f"reward model {path!r}", "save the tokenizer it was trained with beside it")
    return RewardReader(model, tokenizer, template or recorded_template(path), batch_size=batch_size, name=path)
