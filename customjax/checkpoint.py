"""Orbax checkpoints of a training run: the train state (trainable parameters, optimizer state,
EMA, step, RNG), the data iterator state and the config, saved asynchronously, ``max_to_keep``
kept, the latest restored on start. Run folders are ``etils.epath`` paths: local, or a bucket URL
(``gs://...``) where orbax and the file backend of ``epath`` reach it."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def run_path(path: str | os.PathLike) -> epath.Path:
    """A run folder as an ``epath.Path``: a URL (``gs://bucket/run``) as is, a local path made
    absolute (``pathlib`` would turn ``gs://b`` into the local folder ``gs:/b``)."""
    p = epath.Path(path)
    return p if is_remote(p) else p.absolute()


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://...``, ``s3://...``) rather than a local path."""
    return "://" in os.fspath(path)


class Checkpointer:
    """A thin CheckpointManager wrapper for ``workdir/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.dir = run_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                           enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def read_meta(self, step: int) -> dict:
        """The JSON ``meta`` saved with ``step`` alone (the run's config, the step), without the state."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def restore_readable(self, abstract_state: Any, steps: list[int] | None = None
                         ) -> tuple[int, Any, Any, dict, list[tuple[int, str]]]:
        """(step, state, data_state, meta, unreadable) of the newest checkpoint that reads, trying
        ``steps`` (default: all, newest first); ``unreadable``: (step, error) of the newer ones that
        did not read (a truncated or corrupt write). Raises when none reads."""
        steps = self.all_steps() if steps is None else steps
        bad = []
        for step in steps:
            try:
                state, data, meta = self.restore(abstract_state, step)
                return step, state, data, meta, bad
            except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many types for a broken file)
                first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
                bad.append((step, f"{type(e).__name__}: {first[:300]}"))
        listing = "; ".join(f"step {s}: {m}" for s, m in bad) or "none saved"
        raise FileNotFoundError(f"no readable checkpoint in {self.dir} ({listing})")

    def set_aside(self, step: int) -> epath.Path:
        """Renames an unreadable step's folder to ``<step>.unreadable`` (kept for inspection, out of
        the manager's sight) and rereads the step list; returns the new path. Call on one process."""
        src = self.dir / str(step)
        dst = self.dir / f"{step}.unreadable"
        n = 1
        while dst.exists():
            n += 1
            dst = self.dir / f"{step}.unreadable{n}"
        src.rename(dst)
        self.manager.reload()
        return dst

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None, force: bool = False) -> bool:
        """Saves (asynchronously) the state; ``data_state`` and ``meta`` must be JSON-able."""
        state = jax.tree_util.tree_map(lambda a: jax.random.key_data(a) if _is_key(a) else a, state)
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(data_state if data_state is not None else {}),
                "meta": ocp.args.JsonSave(meta or {})}
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) at ``step`` (default: the latest). ``abstract_state``: the
        state's structure with shapes, dtypes and shardings (e.g. from ``jax.eval_shape`` and the
        step's shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        keyed = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(tuple(a.shape) + jax.random.key_data(jax.random.key(0)).shape, jax.numpy.uint32,
                                           sharding=getattr(a, "sharding", None)) if _is_key(a) else a, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(keyed), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = jax.tree_util.tree_map(lambda a, r: jax.random.wrap_key_data(r) if _is_key(a) else r,
                                       abstract_state, out["state"])
        return state, out["data"], out["meta"]

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop at ``step`` after a preemption notice (SIGTERM to
        any of them), per JAX's preemption sync service (``jax.distributed.initialize``); call it
        at every step on every process. False without the service (one process, no
        ``jax.distributed``)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _is_key(a: Any) -> bool:
    return hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def write_config(workdir: str | os.PathLike, config: Any) -> epath.Path:
    path = run_path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2))
    return path
