"""Renames and deletions that meet a file another program holds open.

Windows refuses to rename or delete a file that another process has open (TensorBoard reading ``logs/``, Excel
holding a CSV, an evaluation reading a checkpoint, Defender, OneDrive or the search indexer scanning a file just
written): ``PermissionError`` with winerror 32 (sharing violation), 5 (access denied) or 33 (lock violation).
Such a hold is usually brief, so each operation is retried for a few seconds; one that still fails becomes
`FileHeldOpen`, a one-line error naming the path and, where the system says, the program that holds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from smolppo.errors import UserError

T = TypeVar("T")

HELD_OPEN_WINERRORS = {5, 32, 33}  # access denied, sharing violation, lock violation
RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # 6.3 s in all: an antivirus scan of a fresh file takes about 1 s
HELD_OPEN_EXIT_CODE = 5
LIKELY_HOLDERS = "TensorBoard, Excel, an evaluation, or an antivirus, OneDrive or indexer scan"


class FileHeldOpen(UserError):
    """A rename or deletion refused because another program holds the file open, after retrying."""

    def __init__(self, path: str, holders: list[str], outcome: str = ""):
        self.path, self.holders = path, holders
        who = ", ".join(holders) if holders else f"another program ({LIKELY_HOLDERS})"
        outcome = outcome or "nothing was lost"
        super().__init__(
            f"{path!r} is held open by {who}, so it could not be renamed or deleted; {outcome}. Close that program "
            "(or wait for its scan to end) and run again",
            exit_code=HELD_OPEN_EXIT_CODE,
        )

    def with_outcome(self, outcome: str) -> FileHeldOpen:
        """The same error, saying what became of the outputs (where they were kept)."""
        return FileHeldOpen(self.path, self.holders, outcome)


def is_held_open(exc: BaseException) -> bool:
    """True for Windows' "another process has this file open" errors."""
    return isinstance(exc, OSError) and getattr(exc, "winerror", None) in HELD_OPEN_WINERRORS


def holders_of(path: str, limit: int = 3) -> list[str]:
    """``name (pid N)`` of processes the system says have `path` (or a file below it) open; best effort, empty
    where it cannot tell (another user's process, an antivirus)."""
    import psutil

    target = os.path.normcase(os.path.abspath(path))
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        if process.info["pid"] == os.getpid():
            continue
        try:
            files = process.open_files()
        except (psutil.Error, OSError):
            continue
        for opened in files:
            name = os.path.normcase(os.path.abspath(opened.path))
            if name == target or name.startswith(target.rstrip(os.sep) + os.sep):
                found.append(f"{process.info['name']} (pid {process.info['pid']})")
                break
        if len(found) >= limit:
            break
    return found


def retrying(operation: Callable[[], T], path: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `operation` (a rename or deletion of `path`); while another program holds the file open, retry after
    each of `RETRY_DELAYS_S`, then raise `FileHeldOpen`. Any other error is raised as it is."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return operation()
        except OSError as exc:
            if not is_held_open(exc):
                raise
            if delay is None:
                raise FileHeldOpen(path, holders_of(path)) from exc
            sleep(delay)
    raise AssertionError("unreachable")


def replace(src: str, dst: str) -> None:
    """`os.replace`, retried while `src` or `dst` is held open."""
    retrying(lambda: os.replace(src, dst), dst if os.path.lexists(dst) else src)


def remove(path: str) -> None:
    """`os.remove`, retried while `path` is held open."""
    retrying(lambda: os.remove(path), path)
