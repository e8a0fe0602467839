"""Checkpoint directories: atomic writes, validation, discovery of the newest usable one, rotation, resume rules.

A checkpoint is written into a hidden staging directory and renamed into place only when complete, so a
crash mid-save never leaves a ``checkpoint-N`` that resume could pick. Rotation runs after the rename, only
ever removes older checkpoints, and renames each before deleting it. A damaged newest checkpoint is passed
over (saying so) for the previous complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from smolppo import filesystem
from smolppo.errors import UserError
from smolppo.files import (
    ADAPTER_WEIGHTS,
    ALGORITHM_STATE_FILE,
    CHECKPOINT_FORMAT_KEY,
    CHECKPOINT_PREFIX,
    DEEPSPEED_DIR,
    LEGACY_OPTIMIZER_FILE,
    LEGACY_RNG_FILE,
    LEGACY_SCHEDULER_FILE,
    MODEL_WEIGHTS,
    OPTIMIZER_TENSORS,
    STAGING_PREFIX,
    STATE_FILE,
    VALUE_MODEL_DIR,
)
from smolppo.filesystem import FileHeldOpen
from smolppo.models import safetensors_readable
from smolppo.runs.output_dir import keep_staging, remove_entry, write_json_atomically

logger = logging.getLogger(__name__)

OPTIMIZER_STATE_KEY = "optimizer_state"  # False in trainer_state.json: no optimizer tensors (dropped, or DeepSpeed)
DEEPSPEED_STATE_KEY = "deepspeed_state"  # {"processes", "zero_stage"}: DEEPSPEED_DIR holds the engine's state
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

# Settings renamed since a checkpoint may have been written: its recorded name -> today's.
RENAMED_SETTINGS = {"target": "kl_target", "horizon": "kl_horizon"}
# What a checkpoint written before a setting existed ran with, where the setting's default has since changed
SETTINGS_BEFORE_RECORDED = {"kl_controller": "adaptive", "min_lr_ratio": 0.0, "kl_integral_gain": 0.1}


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def staging_dir(output_dir: str, step: int) -> str:
    """Where checkpoint-<step> is written before it is renamed in (the same path on every process)."""
    return os.path.join(output_dir, f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{step}")


def fresh_staging_dir(output_dir: str, step: int) -> str:
    """An empty `staging_dir` (a leftover of an interrupted save is removed first)."""
    staging = staging_dir(output_dir, step)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish_checkpoint(output_dir: str, step: int, save_total_limit: int) -> str:
    """Rename `step`'s complete staging directory (see `fresh_staging_dir`) to ``checkpoint-<step>``, then rotate
    old checkpoints; the path. A checkpoint whose rename meets a file held open is kept to resume from."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    staging = staging_dir(output_dir, step)
    try:
        remove_entry(final)
        filesystem.replace(staging, final)
    except FileHeldOpen as held:  # the checkpoint is complete: keep it under a name no clean-up touches
        kept = keep_staging(staging, os.path.join(output_dir, f"unpublished-{CHECKPOINT_PREFIX}{step}"))
        if kept is None:
            raise held.with_outcome(f"checkpoint {step} is complete in {staging!r}: move it elsewhere") from held
        raise held.with_outcome(
            f"checkpoint {step} is complete in {kept!r}: resume with --resume-from-checkpoint {kept}"
        ) from held
    rotate_checkpoints(output_dir, save_total_limit)
    return final


def discard_staging(output_dir: str, step: int) -> None:
    """Remove `step`'s staging directory after a failed save: a partial checkpoint is never renamed in."""
    shutil.rmtree(staging_dir(output_dir, step), ignore_errors=True)


def rotate_checkpoints(output_dir: str, save_total_limit: int) -> None:
    """Delete the oldest complete checkpoints beyond `save_total_limit` (the newest always stays)."""
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - max(1, save_total_limit))]:
        logger.info("removing old checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        try:
            remove_entry(path)
        except FileHeldOpen as held:  # training goes on: the next rotation tries again
            logger.warning("%s; it stays until the next checkpoint's rotation", held)


def drop_optimizer_state(output_dir: str, keep: str) -> None:
    """Remove the optimizer state from every checkpoint but `keep` (the newest): marked in its state file first,
    then the file goes, so an interruption between the two leaves a checkpoint that resumes either way."""
    for _, path in list_checkpoints(output_dir):
        optimizer = os.path.join(path, OPTIMIZER_TENSORS)
        if not os.path.isfile(optimizer):
            optimizer = os.path.join(path, LEGACY_OPTIMIZER_FILE)
        engine_state = os.path.join(path, DEEPSPEED_DIR)
        if os.path.samefile(path, keep) or not (os.path.isfile(optimizer) or os.path.isdir(engine_state)):
            continue
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        state[OPTIMIZER_STATE_KEY] = False
        state.pop(DEEPSPEED_STATE_KEY, None)
        write_json_atomically(os.path.join(path, STATE_FILE), state)
        if os.path.isfile(optimizer):
            try:
                filesystem.remove(optimizer)
            except FileHeldOpen as held:  # marked as dropped already: a stray file changes nothing
                logger.warning("%s; delete it by hand to free the space", held)
        shutil.rmtree(engine_state, ignore_errors=True)
        logger.info("dropped the optimizer state of %s (--save-optimizer-state latest)", path)


def read_index(path: str) -> dict:
    """A checkpoint's index (``trainer_state.json``: counters, config, what it holds); one line when unreadable."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        int(state["update"]), int(state["episodes"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"checkpoint {path!r} is damaged ({STATE_FILE} unreadable: {type(exc).__name__}); resume from an earlier "
            "checkpoint-N"
        ) from exc


def checkpoint_problem(path: str, needs_optimizer: bool = True) -> str | None:
    """Why the PPO checkpoint at `path` cannot be resumed from, or None when it looks complete."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        int(state["update"]), state["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable"
    current = state.get(CHECKPOINT_FORMAT_KEY) is not None
    required = [ALGORITHM_STATE_FILE] if current else [LEGACY_SCHEDULER_FILE, LEGACY_RNG_FILE]
    if state["config"].get("advantage_estimator", "gae") == "gae":  # only PPO's GAE has a value model
        required.append(os.path.join(VALUE_MODEL_DIR, MODEL_WEIGHTS))
    if needs_optimizer and state.get(OPTIMIZER_STATE_KEY, True):
        required.append(OPTIMIZER_TENSORS if current else LEGACY_OPTIMIZER_FILE)
    weights = ADAPTER_WEIGHTS if state["config"].get("use_lora") else MODEL_WEIGHTS
    for name in [weights, *required]:
        if not os.path.isfile(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) == 0:
            return f"{name} is missing"
        if name.endswith(".safetensors") and not safetensors_readable(os.path.join(path, name)):
            return f"{name} is damaged"
    return None


def resolve_resume(output_dir: str, resume_from: str, needs_optimizer: bool = True) -> str:
    """The checkpoint to resume from: 'latest' = the newest usable one (damaged newer ones are named and skipped)."""
    if resume_from != "latest":
        problem = checkpoint_problem(resume_from, needs_optimizer) if os.path.isdir(resume_from) else "no such dir"
        if problem:
            raise UserError(
                f"cannot resume from {resume_from!r}: {problem}; pass another checkpoint-N directory or 'latest'"
            )
        return resume_from
    checkpoints = list_checkpoints(output_dir)
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path, needs_optimizer)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
    raise UserError(
        f"no usable checkpoint in {output_dir!r} to resume from; drop --resume-from-checkpoint to start a new run"
    )


def newer_checkpoints(output_dir: str, path: str) -> list[str]:
    """Checkpoints in `output_dir` after the one at `path` (a branch point when resuming from `path`)."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not match or os.path.realpath(os.path.dirname(os.path.normpath(path))) != os.path.realpath(output_dir):
        return []
    step = int(match.group(1))
    return [p for s, p in list_checkpoints(output_dir) if s > step]


def recorded_config(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)["config"]


def _comparable(key: str, value):
    """A setting as compared on resume: reward-function files by absolute path (a relative and an absolute path to
    the same file are the same setting)."""
    if key == "reward_funcs" and isinstance(value, list):
        from smolppo.paths import reward_function_file

        out = []
        for spec in value:
            target, sep, name = str(spec).rpartition(":")
            path = reward_function_file(target)
            out.append(f"{path}{sep}{name}" if path else spec)
        return out
    return value


def config_changes(old: dict, new: dict, free: frozenset[str]) -> list[tuple[str, object, object]]:
    """``(field, old, new)`` for every setting outside `free` that differs between a checkpoint and now."""
    old = {**SETTINGS_BEFORE_RECORDED, **{RENAMED_SETTINGS.get(key, key): value for key, value in old.items()}}
    return [
        (key, old.get(key), value)
        for key, value in sorted(new.items())
        if key not in free and key in old and _comparable(key, old[key]) != _comparable(key, value)
    ]


def check_resume_config(
    path: str, config: dict, rules: tuple[frozenset[str], frozenset[str]], allow_changes: bool
) -> list[tuple[str, object, object]]:
    """Refuse a resume whose settings differ from the checkpoint's, unless `allow_changes`; return the changes.
    `rules`: the settings free to change and those the saved weights fix (`smolppo.configs.parts.resume_rules`)."""
    free, fixed_settings = rules
    changes = config_changes(recorded_config(path), config, free)
    described = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    fixed = [k for k, _, _ in changes if k in fixed_settings]
    estimators = [(old, new) for k, old, new in changes if k == "advantage_estimator"]
    if estimators and (estimators[0][0] == "gae") != (estimators[0][1] == "gae"):
        old, new = estimators[0]
        raise UserError(
            f"cannot resume {path!r} (advantage_estimator {old}) as {new}: only gae trains a value model, so the "
            "checkpoint and the run hold different models (the checkpoint itself is fine); resume with "
            f"--advantage-estimator {old}, or start a new run from its weights with --policy-model {path}"
        )
    if fixed:
        raise UserError(
            f"cannot resume {path!r} with other {', '.join(fixed)} ({described}): its saved weights have another "
            "shape; resume with the checkpoint's settings"
        )
    if changes and not allow_changes:
        raise UserError(
            f"resuming {path!r} with changed settings ({described}); resume with the checkpoint's settings, or pass "
            "--allow-config-change to apply the new ones (recorded in run_summary.json)"
        )
    for key, old, new in changes:
        logger.warning("resume applies a changed setting: %s %r -> %r", key, old, new)
    return changes


def read_summary(output_dir: str, summary_file: str) -> dict | None:
    path = os.path.join(output_dir, summary_file)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError("not an object")
        return summary
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path!r} is unreadable ({exc}); move it away to start over, or resume with --resume-from-checkpoint"
        ) from exc


def check_output_dir(output_dir: str, overwrite: bool, resume_from: str | None, summary_file: str) -> str | None:
    """Check `output_dir` before anything is loaded, changing nothing; return the checkpoint to resume from.

    A finished or interrupted run is never replaced unless the user asks (``--overwrite-output-dir``).
    """
    from smolppo.runs.output_dir import check_collisions, check_writable

    check_writable(output_dir)
    if not overwrite or resume_from:
        check_collisions(output_dir)
    if resume_from:
        if resume_from == "latest" and not list_checkpoints(output_dir):
            raise UserError(
                f"no complete checkpoint in {output_dir!r} to resume from; drop "
                "--resume-from-checkpoint to start a new run"
            )
        return resume_from
    if overwrite:
        return None
    summary = read_summary(output_dir, summary_file)
    if summary is not None and summary.get("status") == "finished":
        raise UserError(
            f"{output_dir!r} already holds a finished run; pass --overwrite-output-dir to replace it "
            "or choose another --output-dir"
        )
    checkpoints = list_checkpoints(output_dir)
    if checkpoints or summary is not None:
        where = os.path.basename(checkpoints[-1][1]) if checkpoints else "no checkpoint yet"
        raise UserError(
            f"{output_dir!r} holds an unfinished run ({where}); continue it with --resume-from-checkpoint latest, "
            "or pass --overwrite-output-dir to start over"
        )
    return None
