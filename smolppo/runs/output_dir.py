"""The output directory is shared with the user: we delete or replace only what our scripts wrote.

* **Ownership.** An entry is ours when the run manifest (``.smolppo-manifest.json``) lists it, or when its name
  is one only our scripts use (``checkpoint-N``, ``logs``, ``run_summary.json``, ...). Final models are written
  into a staging directory and moved in entry by entry; each name moved in is recorded in the manifest.
  Directories written by an older version (a run summary but no manifest) also own the standard model and
  tokenizer file names.
* **Overwrite** (``--overwrite-output-dir``) removes our entries only, and is refused when the directory holds
  anything else, is the current directory or a parent of it, is a git work tree, or is (or holds) an input.
* **One run per directory.** A lock file (PID, host, process start time) is taken before anything is loaded;
  a second run is refused at once, naming the live one. A lock left by a dead process is taken over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager

from smolppo import filesystem
from smolppo.errors import UserError
from smolppo.files import (
    CHECKPOINT_PREFIX,
    EVALUATION_FILE,
    LOCK,
    LOGS_DIR,
    MANIFEST,
    PROGRESS_FIGURE,
    REWARD_SUMMARY_FILE,
    RUN_SUMMARY_FILE,
    SCALARS_CSV,
    STAGING_PREFIX,
    TRASH_PREFIX,
    VALUE_MODEL_DIR,
)
from smolppo.filesystem import FileHeldOpen

logger = logging.getLogger(__name__)

# Names only this project's scripts write.
OWN_NAMES = {
    MANIFEST,
    LOCK,
    LOGS_DIR,
    VALUE_MODEL_DIR,
    RUN_SUMMARY_FILE,
    REWARD_SUMMARY_FILE,
    EVALUATION_FILE,
    PROGRESS_FIGURE,
    SCALARS_CSV,
}
OWN_DIRS = {LOGS_DIR, VALUE_MODEL_DIR}  # ours only when they are directories
LEFTOVER_PATTERN = re.compile(rf"^({re.escape(STAGING_PREFIX)}[\w.-]+|{re.escape(TRASH_PREFIX)}.+-\d+-\d+)$")
OWN_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}\d+$|{LEFTOVER_PATTERN.pattern}")
# What `save_pretrained` writes for a model, adapter or tokenizer: ours in a legacy run directory only.
MODEL_FILE_PATTERN = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"adapter_config\.json|adapter_model\.safetensors|README\.md|tokenizer(_config)?\.json|tokenizer\.model|"
    r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\.json|merges\.txt|"
    r"training_args\.bin)$"
)
LEGACY_MARKERS = (RUN_SUMMARY_FILE, REWARD_SUMMARY_FILE)


# ---------------------------------------------------------------------- ownership
def read_manifest(output_dir: str) -> set[str]:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            return set(json.load(f).get("entries", []))
    except (OSError, ValueError, AttributeError):
        logger.warning("%s is unreadable; only entries with smolppo's own names count as ours", path)
        return set()


def record(output_dir: str, names) -> None:
    """Add top-level `names` to the manifest (written atomically)."""
    entries = read_manifest(output_dir) | set(names)
    write_json_atomically(os.path.join(output_dir, MANIFEST), {"entries": sorted(entries)})


def foreign_entries(output_dir: str) -> list[str]:
    """Entries of `output_dir` that our scripts did not write."""
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    manifest = read_manifest(output_dir)
    legacy = not os.path.isfile(os.path.join(output_dir, MANIFEST)) and any(m in names for m in LEGACY_MARKERS)

    def ours(name: str) -> bool:
        if name in OWN_DIRS or name.startswith(CHECKPOINT_PREFIX):
            return os.path.isdir(os.path.join(output_dir, name)) and not os.path.islink(os.path.join(output_dir, name))
        return (
            name in manifest
            or name in OWN_NAMES
            or bool(OWN_PATTERN.match(name))
            or bool(legacy and MODEL_FILE_PATTERN.match(name))
        )

    return sorted(n for n in names if not ours(n))


def remove_entry(path: str) -> None:
    """Rename to a hidden trash name first, so a crash never leaves a half-deleted entry under its own name. The
    rename is retried while another program holds the entry open (`FileHeldOpen` if it stays held); a trash entry
    that cannot be deleted yet is left for the next run's clean-up."""
    if not os.path.lexists(path):
        return
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{os.getpid()}-{time.time_ns()}")
    filesystem.replace(path, trash)
    _delete(trash)


def remove_leftovers(output_dir: str) -> None:
    """Remove staging and trash entries left by a crash (one still held open stays for a later run)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if LEFTOVER_PATTERN.match(name):
            _delete(os.path.join(output_dir, name))


def _delete(path: str) -> None:
    """Delete a trash or staging entry; what another program still holds open stays (its name marks it ours)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.remove(path)
    except OSError as exc:
        if not filesystem.is_held_open(exc):
            raise
        logger.info("%s is held open by another program: it is removed by a later run", path)


# ---------------------------------------------------------------------- checks before any work
def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, directory: str) -> bool:
    """True when `path` is `directory` or lies below it."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_writable(output_dir: str) -> None:
    """One line, before any work, when `output_dir` cannot be a directory we write to."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir!r} is a file, not a directory; choose another --output-dir")
    probe = output_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK | os.X_OK) or _real(probe).startswith(("/proc", "/sys")):
        raise UserError(f"--output-dir {output_dir!r} is not writable (at {probe!r}); choose another --output-dir")


def check_collisions(output_dir: str) -> None:
    """Refuse at the start, not after training, when a user's file has a name our final outputs will take."""
    in_the_way = [n for n in foreign_entries(output_dir) if n in OWN_DIRS or MODEL_FILE_PATTERN.match(n)]
    if in_the_way:
        raise UserError(
            f"{', '.join(in_the_way)} in {output_dir!r} is not smolppo's and would be overwritten by the run's "
            "outputs; move it away or choose another --output-dir"
        )


def check_overwrite(output_dir: str, inputs: dict[str, str]) -> None:
    """Refuse ``--overwrite-output-dir`` where removing our files could touch anything of the user's."""
    target = _real(output_dir)
    if not os.path.isdir(target):
        return
    if _inside(_real(os.getcwd()), target):
        raise UserError(
            f"--overwrite-output-dir refused: {output_dir!r} is the current directory or a parent of it; "
            "choose a dedicated --output-dir"
        )
    if os.path.exists(os.path.join(target, ".git")):
        raise UserError(f"--overwrite-output-dir refused: {output_dir!r} is a git work tree; choose another one")
    for flag, value in inputs.items():
        if value and os.path.exists(os.path.expanduser(value)):
            path = _real(value)
            if _inside(path, target) or _inside(target, path):
                raise UserError(
                    f"--overwrite-output-dir refused: --output-dir {output_dir!r} overlaps --{flag} {value!r}; "
                    "write the new run elsewhere"
                )
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--overwrite-output-dir refused: {output_dir!r} holds files smolppo did not write ({shown}); "
            "move them away or choose another --output-dir"
        )


def clear(output_dir: str) -> None:
    """Remove our entries (never the lock of the running process); call only after loading succeeded."""
    if not os.path.isdir(output_dir):
        return
    foreign = set(foreign_entries(output_dir))
    ours = [n for n in os.listdir(output_dir) if n not in foreign and n not in (LOCK, MANIFEST)]
    if ours:
        logger.warning("--overwrite-output-dir: removing the previous run's files in %s", output_dir)
    for name in ours:
        remove_entry(os.path.join(output_dir, name))
    if os.path.isfile(os.path.join(output_dir, MANIFEST)):
        filesystem.remove(os.path.join(output_dir, MANIFEST))


# ---------------------------------------------------------------------- disk space
DISK_FULL_WINERRORS = {39, 112}  # ERROR_HANDLE_DISK_FULL, ERROR_DISK_FULL
DISK_FULL_MESSAGES = (
    "No space left on device",  # Linux, macOS (ENOSPC)
    "Disk quota exceeded",  # EDQUOT
    "There is not enough space on the disk",  # Windows (error 112), as Rust-based writers like safetensors say it
    "os error 112",
)


def is_disk_full(exc: BaseException) -> bool:
    """True for an error that says the device is full: OSError ENOSPC/EDQUOT or Windows error 112/39, or the
    message a library (safetensors) gives for either."""
    import errno

    while exc is not None:
        if isinstance(exc, OSError) and (
            exc.errno in (errno.ENOSPC, errno.EDQUOT) or getattr(exc, "winerror", None) in DISK_FULL_WINERRORS
        ):
            return True
        if any(message in str(exc) for message in DISK_FULL_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(directory: str) -> int:
    probe = directory
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def human_bytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def disk_full_error(
    directory: str, what: str, needed: int, last_checkpoint: str | None, final_model_saved: bool = False
) -> UserError:
    """A full disk, said in one line: what is safe (the final model, the last checkpoint, or nothing) and what next."""
    if final_model_saved:
        kept = "the final model is saved there, the last checkpoint (to train on from) is not"
        advice = "Free some space before training further"
    elif last_checkpoint:
        kept = f"the last checkpoint ({os.path.basename(last_checkpoint)}) is intact"
        advice = "Free some space, then resume with --resume-from-checkpoint latest"
    else:
        kept = "no checkpoint had been written yet, so this run's updates are lost"
        advice = "Free some space, then run again (--save-steps N writes a checkpoint every N updates)"
    return UserError(
        f"no space left on the device of {directory!r} while writing {what}: it needs about {human_bytes(needed)} "
        f"free, {human_bytes(free_bytes(directory))} are; {kept}. {advice}",
        exit_code=4,
    )


# ---------------------------------------------------------------------- final outputs
def write_atomically(path: str, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, then rename it over `path`: a kill at any moment
    leaves the previous file or the new one, never a half-written one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    written = False
    try:
        write(tmp)
        written = True
        filesystem.replace(tmp, path)
    except FileHeldOpen as held:
        if not written:
            raise
        kept = f"the new {os.path.basename(path)} was kept as {tmp!r}, the previous one is unchanged"
        raise held.with_outcome(kept) from held
    except BaseException:
        if os.path.lexists(tmp):
            _delete(tmp)
        raise


def write_json_atomically(path: str, data) -> None:
    """`data` as strict JSON: a nan or infinite figure (undefined in its update) is written as null, which every
    JSON reader accepts (Python's NaN is not JSON)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(finite_or_null(data), f, indent=2, allow_nan=False)

    write_atomically(path, write)


def finite_or_null(data):
    """`data` with every nan or infinite float replaced by None, through dicts, lists and tuples."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


@contextmanager
def publishing(output_dir: str, label: str = "final"):
    """Yield a staging directory; on success move each entry into `output_dir` and record it in the manifest.

    An entry already in `output_dir` is replaced only when it is ours; anything else in the way stops with one
    line before anything is moved, and the staged outputs stay where they were written (nothing is lost)."""
    os.makedirs(output_dir, exist_ok=True)
    staging = os.path.join(output_dir, f"{STAGING_PREFIX}{label}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    yield staging
    names = sorted(os.listdir(staging))
    foreign = set(foreign_entries(output_dir))
    blocked = [n for n in names if os.path.lexists(os.path.join(output_dir, n)) and n in foreign]
    if blocked:
        raise UserError(
            f"{', '.join(blocked)} in {output_dir!r} is not smolppo's and is in the way of the {label} outputs; "
            f"{keep_unpublished(staging, output_dir, label)}: move them by hand"
        )
    record(output_dir, names)
    try:
        for name in names:
            target = os.path.join(output_dir, name)
            remove_entry(target)
            filesystem.replace(os.path.join(staging, name), target)
    except FileHeldOpen as held:
        raise held.with_outcome(keep_unpublished(staging, output_dir, label)) from held
    os.rmdir(staging)


def keep_unpublished(staging: str, output_dir: str, label: str) -> str:
    """Move a staging directory whose outputs could not all be moved in to a name no clean-up touches
    (``unpublished-<label>-<time>``); returns what became of them, for the error line."""
    kept = keep_staging(staging, os.path.join(output_dir, f"unpublished-{label}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if kept is None:
        return f"the {label} outputs not yet moved in are in {staging!r}: copy them elsewhere before the next run"
    return f"the {label} outputs not yet moved in were kept in {kept!r}"


def keep_staging(staging: str, kept: str) -> str | None:
    """Rename a staging directory to `kept` (an ``unpublished-*`` name, which no clean-up removes): `kept`, or None
    when it cannot be renamed either (then it stays where it is, under its staging name)."""
    try:
        filesystem.replace(staging, kept)
    except OSError:
        return None
    return kept


# ---------------------------------------------------------------------- one run per directory
def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _lock_is_live(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot check another machine: assume it runs
    started = _process_started(int(info.get("pid", -1)))
    return started is not None and abs(started - float(info.get("process_started", started))) < 1.0


@contextmanager
def run_lock(output_dir: str, enabled: bool = True):
    """Hold `output_dir`'s lock for the duration; refuse at once when another live run holds it."""
    if not enabled:
        yield
        return
    created_dir = not os.path.exists(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output-dir {output_dir!r}: {exc.strerror}; choose another one") from exc
    path = os.path.join(output_dir, LOCK)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_started": _process_started(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except PermissionError as exc:
            raise UserError(f"--output-dir {output_dir!r} is not writable; choose another --output-dir") from exc
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}
            if held and _lock_is_live(held):
                raise UserError(
                    f"{output_dir!r} is in use by another run (pid {held.get('pid')} on {held.get('host')}, started "
                    f"{held.get('started')}); wait for it or choose another --output-dir (delete {LOCK} only if "
                    "that run is dead)"
                ) from None
            logger.warning("taking over the lock of a run that is no longer alive in %s", output_dir)
            filesystem.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        break
    try:
        yield
    finally:
        if os.path.isfile(path):
            try:
                filesystem.remove(path)
            except FileHeldOpen:
                logger.warning("%s is held open by another program; delete it once the program ends", path)
        if created_dir and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
