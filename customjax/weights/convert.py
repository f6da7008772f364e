"""Strict mapping of PyTorch state dicts onto Flax parameter trees.

Our Flax modules carry the diffusers / transformers module names, with list indices written the
way linen names list members (``down_blocks.0`` -> ``down_blocks_0``). A PyTorch key maps to a Flax
path by that rule alone, and its leaf by the layer kind:

    weight (2-D) -> kernel, transposed          weight (4-D) -> kernel, OIHW -> HWIO
    weight       -> scale (norms) | embedding (nn.Embed) | weight (raw parameters)
    anything else -> the same name

Loading is strict: every checkpoint tensor must land in a parameter, every parameter must be
filled, and shapes must agree. All problems are collected and raised together, each naming the
checkpoint key, the parameter path and the shapes.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
_LIST_MEMBER = re.compile(r"^(.*(?:blocks|layers|layer|resnets|attentions|samplers|to_out|net))_(\d+)$")


class WeightMismatchError(ValueError):
    """A checkpoint that does not fit the model; ``missing``, ``unexpected`` and ``mismatched``
    hold the offending names."""

    def __init__(self, name: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{name}: checkpoint does not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong shape)"]
        for key, path, want, got in mismatched[:20]:
            lines.append(f"  wrong shape: checkpoint key {key!r} -> parameter {path}: "
                         f"expected {want}, found {got} (PyTorch layout)")
        for path in missing[:20]:
            lines.append(f"  missing: parameter {path} (checkpoint key like {torch_key(path)!r}) "
                         "is not in the checkpoint")
        for key in unexpected[:20]:
            lines.append(f"  unexpected: checkpoint key {key!r} has no parameter in the model")
        super().__init__("\n".join(lines))


class KeyedMismatchError(WeightMismatchError):
    """A checkpoint in another layout (a released file, timm) that does not fit the model; every
    problem is listed by its checkpoint key. ``mismatched``: (key, parameter path, expected PyTorch
    shape, found shape); ``layout`` names the layout in the message; ``hint`` is appended."""

    layout = "the model"

    def __init__(self, name: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, str, tuple, tuple]], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{name}: checkpoint does not match {self.layout} "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong shape)"]
        lines += [f"  wrong shape: {k!r}{'' if p == k else f' -> parameter {p}'}: expected {w}, found {g} "
                  "(PyTorch layout)" for k, p, w, g in mismatched[:20]]
        lines += [f"  missing: {k!r} is not in the checkpoint" for k in missing[:20]]
        lines += [f"  unexpected: {k!r} has no parameter in the model" for k in unexpected[:20]]
        if hint:
            lines.append(hint)
        ValueError.__init__(self, "\n".join(lines))


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1.weight`` -> (``down_blocks_0``, ``resnets_1``, ``conv1``, ``weight``)."""
    return tuple(_INDEX.sub(r"_\1", torch_key).split("."))


def torch_key(path: str) -> str:
    """Inverse of :func:`flax_path` for our model families: a ``_N`` suffix is a list index only on
    list-holding names (``down_blocks_0``, ``to_out_0``), so ``linear_1`` stays as it is."""
    parts = []
    for p in path.split("/"):
        m = _LIST_MEMBER.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _torch_shape(flax_shape: tuple, leaf: str) -> tuple:
    """A Flax kernel shape in PyTorch layout, for messages."""
    s = tuple(flax_shape)
    if leaf != "kernel":
        return s
    return {2: lambda: s[::-1], 3: lambda: s[::-1], 4: lambda: (s[3], s[2], s[0], s[1])}.get(len(s), lambda: s)()


def _to_kernel(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a.T
    if a.ndim == 3:
        return a.transpose(2, 1, 0)
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    return a


def convert(state: Mapping[str, np.ndarray], target: Any, *, name: str = "model",
            rename: Callable[[str], str] | None = None,
            skip: Callable[[str], bool] | None = None,
            dtype: Any = np.float32) -> dict:
    """Builds a Flax parameter tree shaped like ``target`` from a PyTorch ``state`` dict.

    Args:
      state: PyTorch key -> array.
      target: the parameter tree (arrays or ``jax.ShapeDtypeStruct``), e.g. from ``jax.eval_shape``.
      name: what is being loaded, for messages (e.g. the folder).
      rename: maps a checkpoint key to the key our naming expects, for the few names that differ.
      skip: keys that are deliberately not parameters (buffers such as ``position_ids``, another
        model's tower); they are logged, never silently dropped.
      dtype: parameter dtype.
    """
    flat_target = {"/".join(k): v for k, v in traverse_util.flatten_dict(target).items()}
    out: dict[str, np.ndarray] = {}
    unexpected, mismatched, skipped = [], [], []
    for key in sorted(state):
        if skip is not None and skip(key):
            skipped.append(key)
            continue
        value = state[key]
        path = flax_path(rename(key) if rename else key)
        module, leaf = path[:-1], path[-1]
        candidates = [(leaf, lambda a: a)]
        if leaf == "weight":
            candidates = [("kernel", _to_kernel), ("scale", lambda a: a),
                          ("embedding", lambda a: a), ("weight", lambda a: a)]
        for cand, fn in candidates:
            p = "/".join(module + (cand,))
            if p in flat_target:
                arr = fn(np.asarray(value))
                want = tuple(flat_target[p].shape)
                if tuple(arr.shape) != want:
                    mismatched.append((key, p, _torch_shape(want, cand), tuple(np.shape(value))))
                else:
                    if p in out:
                        raise ValueError(f"{name}: two checkpoint keys map to parameter {p}")
                    out[p] = np.asarray(arr, dtype=dtype)
                break
        else:
            unexpected.append(key)
    missing = sorted(set(flat_target) - set(out) - {m[1] for m in mismatched})
    if missing or unexpected or mismatched:
        raise WeightMismatchError(name, missing, unexpected, mismatched)
    if skipped:
        log.info("%s: %d checkpoint tensors are not parameters of this model and were left out: %s",
                 name, len(skipped), skipped[:8])
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def to_torch_state(params: Any, *, rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert`, for export: our parameters under PyTorch names and layouts.
    ``rename`` maps our derived key to the checkpoint's name, where they differ."""
    out = {}
    for k, v in traverse_util.flatten_dict(params).items():
        a, leaf = np.asarray(v), k[-1]
        if leaf == "kernel":
            a = a.T if a.ndim in (2, 3) else a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
        key = torch_key("/".join(k))
        key = rename(key) if rename else key
        if key in out:
            raise ValueError(f"two parameters export to the same key {key!r}")
        out[key] = np.ascontiguousarray(a)
    return out
