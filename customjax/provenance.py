"""What a benchmark records beside its figures: where the result came from (the git commit of the
checkout and whether it had uncommitted changes, :func:`git_state`) and how many times a jitted function
compiled (:class:`CompileCounter`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the checkout holding the customjax package


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


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"   # jax's event around every XLA compilation


class CompileCounter:
    """Counts XLA compilations of the jitted function ``name`` while active (a ``jax.monitoring``
    listener of :data:`COMPILE_EVENT`; a persistent-cache hit counts too: a new executable)."""

    def __init__(self, name: str):
        self.names, self.count = {name, f"jit({name})"}, 0

    def __call__(self, event: str, duration: float, **kw) -> None:
        if event == COMPILE_EVENT and kw.get("fun_name") in self.names:
            self.count += 1

    def __enter__(self) -> "CompileCounter":
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self)
