"""Region losses. Region-weighted squared / absolute errors, shared by the pretraining stages
(``object_weight``: the objects of a ShapeWorld scene, :mod:`customjax.shapeworld.pretrain`) and the adapter
objective (``objective.subject_weight``: the subject of a multiview record,
:mod:`customjax.methods.objective`); neither weighting is in the papers. And the token grounding loss
of TokenCompose (Wang et al. 2024), which puts each object word's cross-attention on its object
(``unet.ground_weight`` of the pretraining)."""

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


def attention_grounding(maps, words, regions):
    """TokenCompose's token loss L_token (Wang et al. 2024, Eq. 2): for each object, (1 - the share
    of its word's cross-attention that falls on the object)^2, averaged over the objects present and
    the layers.

    maps: cross-attention probabilities ``(B, h*w, N)`` of square layers (any h dividing H);
    words: ``(B, K, N)``, object k's word tokens (rows of zeros: no such object, or a dropped caption);
    regions: ``(B, K, H, W)``, object k's coverage of each latent cell.
    """
    w = words.astype(jnp.float32)
    present = (w.sum(-1) > 0).astype(jnp.float32)                        # (B, K)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    B, K, H, W = regions.shape
    total = 0.0
    for probs in maps:
        h = int(round(probs.shape[1] ** 0.5))
        if h * h != probs.shape[1] or H % h:
            raise ValueError(f"a cross-attention map of {probs.shape[1]} positions is not a square grid dividing {H}")
        r = regions.reshape(B, K, h, H // h, h, W // h).mean((3, 5)).reshape(B, K, h * h)
        a = jnp.einsum("bqn,bkn->bkq", probs.astype(jnp.float32), w)      # (B, K, hw)
        share = jnp.sum(a * r, -1) / jnp.maximum(jnp.sum(a, -1), 1e-12)
        total = total + jnp.sum(present * (1.0 - share) ** 2) / jnp.maximum(jnp.sum(present), 1.0)
    return total / max(len(maps), 1)
