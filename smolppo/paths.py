"""Where the project lives, and telling local paths from hub ids (no project imports: a leaf module)."""

from __future__ import annotations

import os
import re

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")
REPO_DIR = os.path.dirname(PACKAGE_DIR)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def looks_like_local_path(name: str) -> bool:
    """True for anything that exists on disk or is written like a path rather than an ``org/name`` hub id."""
    if os.path.exists(name):
        return True
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    if os.path.splitext(name)[1].lower() in (".json", ".jsonl", ".parquet", ".csv"):
        return True
    return not _HUB_ID.match(name) or name.count("/") > 1


def reward_function_file(target: str) -> str | None:
    """The absolute path a ``--reward-funcs`` target names when it is a file (``x.py`` or a path), else None (a
    module name)."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        return os.path.abspath(os.path.expanduser(target))
    return None
