"""Resizing spatial masks to a layer's feature-map resolution."""

from __future__ import annotations

import jax


def resize_mask(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Resizes ``(..., H, W)`` to ``(..., h, w)``: block average for integer downsampling (so a
    binary mask becomes its coverage fraction), bilinear otherwise."""
    H, W = mask.shape[-2:]
    h, w = hw
    if (H, W) == (h, w):
        return mask
    if H % h == 0 and W % w == 0:
        m = mask.reshape(*mask.shape[:-2], h, H // h, w, W // w)
        return m.mean(axis=(-3, -1))
    return jax.image.resize(mask, (*mask.shape[:-2], h, w), method="linear")
