"""Checkpoint directories: atomic writes, discovery of the newest complete one, rotation.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so
a crash mid-save never leaves a ``checkpoint-N`` that resume could pick. Rotation runs after the rename and
only ever removes older checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
RUN_SUMMARY_FILE = "run_summary.json"  # written by a PPO run when it ends (finished or interrupted)
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


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


def save_checkpoint(output_dir: str, step: int, write: Callable[[str], None], save_total_limit: int) -> str:
    """Call ``write(tmp_dir)``, then rename it to ``checkpoint-<step>`` and rotate old checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    staging = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write(staging)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    rotate_checkpoints(output_dir, save_total_limit)
    return final


def rotate_checkpoints(output_dir: str, save_total_limit: int) -> None:
    """Delete the oldest complete checkpoints beyond `save_total_limit` (the newest always stays)."""
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - max(1, save_total_limit))]:
        logger.info("removing old checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(output_dir: str) -> None:
    """Remove half-written checkpoint directories left by a crash."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".tmp-{CHECKPOINT_PREFIX}"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def check_output_dir(output_dir: str, overwrite: bool, resume_from: str | None, summary_file: str) -> str | None:
    """Check `output_dir` before anything is loaded, changing nothing; return the checkpoint to resume from.

    A finished or interrupted run is never replaced unless the user asks (``--overwrite-output-dir``).
    """
    from smolppo.errors import UserError

    if resume_from:
        path = latest_checkpoint(output_dir) if resume_from == "latest" else resume_from
        if path is None:
            raise UserError(
                f"no complete checkpoint in {output_dir!r} to resume from; drop "
                "--resume-from-checkpoint to start a new run"
            )
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise UserError(
                f"{path!r} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N directory or 'latest'"
            )
        return path
    if overwrite:
        return None
    summary = os.path.join(output_dir, summary_file)
    finished = False
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            finished = json.load(f).get("status") == "finished"
    if finished:
        raise UserError(
            f"{output_dir!r} already holds a finished run; pass --overwrite-output-dir to replace it "
            "or choose another --output-dir"
        )
    checkpoints = list_checkpoints(output_dir)
    if checkpoints or os.path.isfile(summary):
        where = os.path.basename(checkpoints[-1][1]) if checkpoints else "no checkpoint yet"
        raise UserError(
            f"{output_dir!r} holds an unfinished run ({where}); continue it with --resume-from-checkpoint latest, "
            "or pass --overwrite-output-dir to start over"
        )
    return None


def clear_output_dir(output_dir: str) -> None:
    """Remove a previous run's files, for ``--overwrite-output-dir`` (called only once loading has succeeded)."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    logger.warning("--overwrite-output-dir: removing the previous run's files in %s", output_dir)
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
