"""Where rewards come from: the reward model, Python functions, or both, combined with weights.

A reward function has trl's signature: ``fn(prompts, completions, **columns) -> list[float | None]`` where
``prompts`` are the rendered prompt texts, ``completions`` the decoded responses and ``columns`` every dataset
column of each sample's row (``system``, ``question``, ...) as lists. ``None`` means "this function does not
apply to this sample"; the total is the weighted sum of the sources that apply (0 where none does).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import math
import numbers
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from smolppo.errors import UserError
from smolppo.paths import reward_function_file
from smolppo.rewards.reader import RewardReader

logger = logging.getLogger(__name__)

REWARD_MODEL_SOURCE = "reward_model"


@dataclass
class RewardBatch:
    """Everything a reward source may read about a batch of sampled responses (one entry per response)."""

    conversations: list[tuple[str, str]]  # (system, question)
    prompts: list[str]  # the prompt text the policy saw
    completions: list[str]  # decoded responses, without the EOS
    rows: list[dict]  # the dataset row each prompt came from


class RewardModelSource:
    """The reward model, read as it was trained (see `smolppo.rewards.reader`)."""

    def __init__(self, reader: RewardReader):
        self.reader = reader
        self.name = REWARD_MODEL_SOURCE

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return self.reader.score(batch.conversations, batch.completions)


class RewardFunctionSource:
    """A Python reward function; its output is checked (length, numbers) on every call."""

    def __init__(self, function, spec: str):
        self.function = function
        self.spec = spec
        self.name = getattr(function, "__name__", spec.rsplit(":", 1)[-1])

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        keys = dict.fromkeys(key for row in batch.rows for key in row if key not in ("prompts", "completions"))
        columns = copy.deepcopy({key: [row.get(key) for row in batch.rows] for key in keys})
        try:  # copies: what one function changes in its inputs never reaches the next one or the run
            values = self.function(prompts=list(batch.prompts), completions=list(batch.completions), **columns)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure in user code stops the run with its name
            first_line = (str(exc).splitlines() or [""])[0]
            raise UserError(
                f"reward function {self.spec} raised {type(exc).__name__}: {first_line}; fix it or drop it from "
                "--reward-funcs"
            ) from exc
        return self._checked(values, len(batch.completions))

    def _checked(self, values, expected: int) -> torch.Tensor:
        if isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim == 1:
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != expected:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise UserError(
                f"reward function {self.spec} returned {got} for {expected} completions; return a list with one "
                "number (or None) per completion"
            )
        out = []
        for value in values:
            if value is None:
                out.append(math.nan)
                continue
            number = real_number(value)
            if number is None:
                raise UserError(
                    f"reward function {self.spec} returned {value!r} ({type(value).__name__}); each reward must be "
                    "an int or float (not bool or str), or None"
                )
            if not math.isfinite(number):
                raise UserError(f"reward function {self.spec} returned {number}; rewards must be finite (or None)")
            out.append(number)
        return torch.tensor(out, dtype=torch.float32, device="cpu")  # built on the host; `score` moves it


def real_number(value) -> float | None:
    """`value` as a float when it is a real number (int, float, numpy or 0-d tensor number); None for bool, str,
    containers and anything else, which `float()` would accept or convert silently."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def load_reward_function(spec: str):
    """The callable named by ``path/to/file.py:name`` or ``package.module:name`` (one line when missing)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(
            f"--reward-funcs {spec!r} must name a file or module and a function: file.py:name or module:name"
        )
    path = reward_function_file(target)
    if path:
        if not os.path.isfile(path):
            raise UserError(
                f"reward function file {target!r} does not exist; pass --reward-funcs path/to/file.py:name"
            )
        module_name = f"smolppo_reward_{abs(hash(path))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken file is one line naming it
            raise UserError(f"could not import reward function file {target!r}: {type(exc).__name__}: {exc}") from exc
    else:
        if target.startswith("."):
            raise UserError(
                f"--reward-funcs {spec!r}: a relative module cannot be imported; give its full name "
                f"({target.lstrip('.')}:{name}) or a file path (path/to/file.py:{name})"
            )
        try:
            module = importlib.import_module(target)
        except (ImportError, SystemExit) as exc:
            raise UserError(f"could not import module {target!r} for --reward-funcs {spec}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(
            f"{target!r} has no function {name!r}; --reward-funcs takes file.py:function or module:function"
        )
    return function


class CombinedReward:
    """The weighted sum of several reward sources; also reports each source's mean."""

    def __init__(self, sources: list, weights: list[float] | None = None):
        if weights and len(weights) != len(sources):
            raise UserError(
                f"--reward-weights has {len(weights)} values for {len(sources)} reward sources (the reward model "
                "first, if used, then each reward function)"
            )
        self.sources = sources
        self.weights = list(weights) if weights else [1.0] * len(sources)
        names = [s.name for s in sources]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self._warned_none = False

    @property
    def reader(self) -> RewardReader | None:
        """The reward model's reader, when a reward model is one of the sources."""
        return next((s.reader for s in self.sources if isinstance(s, RewardModelSource)), None)

    def score(self, batch: RewardBatch, device: torch.device | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total [B], {source name: rewards [B]})``, all on `device`; a function's None entries do not count."""
        parts = {name: source(batch).to(device) for name, source in zip(self.names, self.sources)}
        # None (NaN) from a function means "does not apply"; a reward model's NaN is an error and stays NaN.
        applies = torch.stack(
            [
                ~parts[n].isnan()
                if isinstance(s, RewardFunctionSource)
                else torch.ones_like(parts[n], dtype=torch.bool)
                for n, s in zip(self.names, self.sources)
            ]
        )
        weighted = torch.stack([w * parts[n] for n, w in zip(self.names, self.weights)])
        total = torch.where(applies, weighted, torch.zeros_like(weighted)).sum(0)
        if not bool(applies.any(0).all()) and not self._warned_none:
            logger.warning(
                "every reward source returned None for %d responses: their reward is 0", int((~applies.any(0)).sum())
            )
            self._warned_none = True
        return total, parts


def build_reward(
    reader: RewardReader | None, function_specs: list[str], weights: list[float] | None
) -> CombinedReward:
    """The reward of a run: the reward model (when given) first, then each function, in the order given."""
    sources = [RewardModelSource(reader)] if reader is not None else []
    sources += [RewardFunctionSource(load_reward_function(spec), spec) for spec in function_specs]
    return CombinedReward(sources, weights)
