"""Region-weighted squared / absolute errors, shared by the pretraining stages (``object_weight``:
the objects of a ShapeWorld scene, :mod:`customjax.pretrain`) and the adapter objective
(``objective.subject_weight``: the subject of a multiview record, :mod:`customjax.methods.objective`).
Neither weighting is in the papers."""

from __future__ import annotations

import jax.numpy as jnp


def coverage(mask, hw: tuple[int, int]):
    """(B, h, w) float32: the share of each cell of an (h, w) grid that ``mask`` (B, H, W; bool or [0, 1])
    covers (mean pooling; numpy in, numpy out, jax in, jax out)."""
    B, H, W = mask.shape
    h, w = hw
    if H % h or W % w:
        raise ValueError(f"mask {(H, W)} does not pool onto the grid {(h, w)}")
    return mask.astype("float32").reshape(B, h, H // h, w, W // w).mean((2, 4))


def weighted_mean(err, cover, weight: float, *, per_example: bool = False):
    """The mean of ``err`` (B, h, w, c) with each cell weighted 1 + ``weight`` * ``cover`` (B, h, w),
    normalised by the weights' sum: over the whole batch, or per example (then averaged) with
    ``per_example``. A uniform error, or an all-ones ``cover``, gives the plain mean."""
    v = (1.0 + weight * cover)[..., None]
    axes = tuple(range(1, err.ndim)) if per_example else None
    return jnp.mean(jnp.sum(v * err, axis=axes) / (jnp.sum(v, axis=axes) * err.shape[-1]))
