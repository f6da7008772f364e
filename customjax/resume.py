"""Resume safety: a run goes on only with the config its checkpoint was trained with.

Every checkpoint records the run's config (``meta["config"]``). Before anything is written, the
config of the run being resumed is compared with it key by key; a difference in anything that
changes the trained state (the method, model, encoders, adapter, batch, optimizer, objective, data,
EMA, accumulation, seed, ...) is refused with the list of differing keys. What is safe to change
(:data:`SAFE`: the step count, logging, saving, previews, the sampler settings) passes, and
``--allow_config_change=key,...`` lets a named key through on purpose (a prefix ending in ``.``
names a whole section)."""

from __future__ import annotations

import json
from typing import Any, Iterable

# Keys (or sections, ending in ".") that may differ from the checkpoint's config.
SAFE = ("train.steps", "optim.total_steps", "train.log_every", "train.save_every", "train.max_to_keep",
        "train.async_save", "train.preview_every", "train.preview_count", "train.max_bad_steps",
        "data.workers", "sample.", "guidance.", "ablations")


class ResumeError(ValueError):
    """The run's config differs from its checkpoint's in keys that change the trained state."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, values made JSON-comparable (tuples as lists)."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(d))}


def _allowed(key: str, allow: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in (*SAFE, *allow))


def changes(saved: dict, current: dict, allow: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) of every key that differs and is not allowed."""
    a, b = flatten(saved), flatten(current)
    allow = tuple(allow)
    # a key a newer version added, left empty, changes nothing ("" / None: the feature is off)
    added_off = {k for k in b.keys() - a.keys() if b[k] in ("", None)}
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted((a.keys() | b.keys()) - added_off)
            if a.get(k, "<absent>") != b.get(k, "<absent>") and not _allowed(k, allow)]


def check(saved: dict, current: dict, step: int, where: str, allow: Iterable[str] = ()) -> None:
    """Raises :class:`ResumeError` listing the differing keys (at most 30)."""
    diff = changes(saved, current, allow)
    if diff:
        lines = [f"  {k}: checkpoint {old!r} -> this run {new!r}" for k, old, new in diff[:30]]
        raise ResumeError(
            f"{where}: the run's config differs from the one its checkpoint (step {step}) was trained with, in "
            f"{len(diff)} key(s) that change the trained state:\n" + "\n".join(lines) +
            "\nUse the checkpoint's config (its config.json), a new --workdir, or --allow_config_change=KEY,... "
            "to go on with a change on purpose.")
