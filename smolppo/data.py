"""Prompt data: read ORCA-style rows (hub id or local file), render prompts with the chat template, filter by length.

The ORCA schema is ``system, question, chosen, rejected``. PPO needs only ``system`` and ``question``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from smolppo.errors import UserError
from smolppo.paths import looks_like_local_path

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PROMPT_COLUMNS = ("system", "question")
ANSWER_COLUMNS = ("chosen", "rejected")  # preference pairs: reward-model training, the start-up check, the report
PAIR_COLUMNS = PROMPT_COLUMNS + ANSWER_COLUMNS
FALLBACK_TEMPLATE = "{system}\n\nUser: {question}\nAssistant:"


def load_rows(dataset: str, split: str = "train", columns: tuple[str, ...] = PROMPT_COLUMNS) -> list[dict]:
    """All rows of `dataset` (a hub id or a local file) as dicts, after checking the required `columns`."""
    if looks_like_local_path(dataset):
        rows = _read_local(dataset)
    else:
        rows = _read_hub(dataset, split)
    if not rows:
        raise UserError(f"dataset {dataset!r} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(
            f"dataset {dataset!r} lacks column(s) {missing}; it needs {list(columns)} "
            f"(found {sorted(rows[0])}) as in Intel/orca_dpo_pairs"
        )
    return rows


def _read_local(path: str) -> list[dict]:
    import pandas as pd

    if not os.path.isfile(path):
        raise UserError(f"dataset file {path!r} does not exist; pass --dataset with a local file or a hub id")
    ext = os.path.splitext(path)[1].lower()
    kind = LOCAL_FORMATS.get(ext)
    if kind is None:
        raise UserError(f"dataset file {path!r} has unsupported type {ext!r}; use one of {sorted(LOCAL_FORMATS)}")
    try:
        if kind == "json":
            # utf-8-sig: Notepad and PowerShell 5.1 save UTF-8 with a byte-order mark
            frame = pd.read_json(path, lines=ext == ".jsonl" or _is_json_lines(path), encoding="utf-8-sig")
        elif kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, keep_default_na=False, encoding="utf-8-sig")
    except ValueError as exc:
        raise UserError(f"could not read dataset file {path!r} as {kind}: {exc}") from exc
    return frame.fillna("").to_dict(orient="records")


def _is_json_lines(path: str) -> bool:
    with open(path, encoding="utf-8-sig") as f:
        return not f.read(1).lstrip().startswith("[")


def _read_hub(dataset_id: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one actionable line
        raise UserError(
            f"could not load dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Without network, pass --dataset with a local "
            ".jsonl/.parquet/.csv file, or try --preset smoke"
        ) from exc
    return ds.to_list()


def render_prompt(tokenizer, system: str, question: str) -> str:
    """The prompt text for one row: the tokenizer's chat template if it has one, else a plain layout."""
    system = (system or "").strip()
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = FALLBACK_TEMPLATE.format(system=system, question=question)
    return text.lstrip()


def row_conversation(row: dict) -> tuple[str, str]:
    """``(system, question)`` of an ORCA row; a missing or null system prompt is empty."""
    question = row.get("question")
    return str(row.get("system") or ""), "" if question is None or question != question else str(question)


def row_prompt(tokenizer, row: dict) -> tuple[str, list[int]]:
    """Prompt text of an ORCA row (system + question) and its token ids; the template holds the special tokens."""
    text = render_prompt(tokenizer, *row_conversation(row))
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PromptSet:
    """Tokenised prompts ready for rollouts, with what filtering removed."""

    input_ids: list[list[int]]
    texts: list[str]
    conversations: list[tuple[str, str]]  # (system, question) of each prompt, for the reward model
    num_rows: int
    num_too_long: int
    rows: list[dict] = field(default_factory=list)  # each prompt's dataset row, for reward functions


def build_prompts(rows: list[dict], tokenizer, max_prompt_length: int, source: str = "dataset") -> PromptSet:
    """Render and tokenise `rows`; drop (and count) prompts longer than `max_prompt_length` tokens."""
    ids, texts, conversations, kept, too_long, empty = [], [], [], [], 0, 0
    for row in rows:
        if not row_conversation(row)[1].strip():
            empty += 1
            continue
        text, tokens = row_prompt(tokenizer, row)
        if len(tokens) > max_prompt_length:
            too_long += 1
            continue
        ids.append(tokens)
        texts.append(text)
        conversations.append(row_conversation(row))
        kept.append(row)
    if too_long:
        logger.info("dropped %d of %d prompts longer than %d tokens", too_long, len(rows), max_prompt_length)
    if empty:
        logger.warning("dropped %d of %d rows of %s whose question is empty or null", empty, len(rows), source)
    if not ids:
        if empty == len(rows):
            raise UserError(f"every question in {source} is empty or null; check the dataset's question column")
        raise UserError(
            f"no prompt of {source} fits max_prompt_length={max_prompt_length} tokens "
            f"({too_long} of {len(rows)} were longer); raise --max-prompt-length"
        )
    return PromptSet(ids, texts, conversations, len(rows), too_long, kept)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)`` so all sequences end at the same column."""
    return _pad(sequences, pad_id, left=True)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)`` so all sequences start at column 0."""
    return _pad(sequences, pad_id, left=False)


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Built on the host from Python lists; callers move the pair to their model's device in one copy each."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
    for i, seq in enumerate(sequences):
        if seq:
            columns = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[i, columns] = torch.tensor(seq, dtype=torch.long, device="cpu")
            attention_mask[i, columns] = 1
    return input_ids, attention_mask


class PromptSampler:
    """Deterministic prompt order: a fresh seeded permutation each epoch, one slice per update and process.

    The position in the stream is a function of the update index alone, so resuming needs only that index.
    """

    def __init__(self, num_prompts: int, global_batch: int, seed: int, process_index: int = 0, num_processes: int = 1):
        self.num_prompts = num_prompts
        self.global_batch = global_batch
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.updates_per_epoch = num_prompts // global_batch
        self._epoch, self._order = -1, None

    def indices(self, update: int) -> list[int]:
        """Prompt indices this process uses in update number `update` (0-based)."""
        epoch, step = divmod(update, self.updates_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator(device="cpu").manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_prompts, generator=generator, device="cpu")
            self._epoch, self._order = epoch, order.tolist()
        chunk = self._order[step * self.global_batch : (step + 1) * self.global_batch]
        per_process = self.global_batch // self.num_processes
        return chunk[self.process_index * per_process : (self.process_index + 1) * per_process]
