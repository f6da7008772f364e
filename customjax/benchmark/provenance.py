"""Where a benchmark result came from: the git commit of the checkout and whether it had uncommitted
changes (:func:`git_state`), for the JSON every benchmark writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the checkout holding the customjax package


def git_state(root: str | os.PathLike | None = None) -> dict:
    """``{"commit": HEAD's hash, "dirty": tracked files differ from it}`` of the git checkout at
    ``root`` (default: the one holding this package); both None when git or the checkout is missing."""
    root = Path(root) if root is not None else ROOT

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return dict(commit=None, dirty=None)
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return dict(commit=head.stdout.strip(), dirty=dirty)
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, dirty=None)
