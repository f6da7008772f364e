"""Pixel preprocessing of the image encoders: resizing as torch's ``F.interpolate`` (bicubic with
antialias, bilinear with or without ``align_corners``) and mean / std normalisation, on NHWC floats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RESIZES = ("bicubic", "bilinear", "bilinear_align_corners")


def _linear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """(n_out, n_in) matrix of torch's 1-D linear ``F.interpolate`` (no antialias)."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        if align_corners:
            x = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        x0 = min(int(np.floor(x)), n_in - 1)
        x1 = min(x0 + 1, n_in - 1)
        t = x - x0
        m[i, x0] += 1.0 - t
        m[i, x1] += t
    return m


def resize_images(images: jax.Array, size: int, method: str = "bicubic") -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C); ``method`` one of ``RESIZES`` (``customjax.adapters.features.FeatureConfig``)."""
    B, H, W, C = images.shape
    if (H, W) == (size, size):
        return images
    if method == "bicubic":
        return jax.image.resize(images, (B, size, size, C), "bicubic", antialias=True)
    if method not in RESIZES:
        raise ValueError(f"resize method {method!r}; choose one of {RESIZES}")
    ac = method == "bilinear_align_corners"
    mh = jnp.asarray(_linear_matrix(H, size, ac), jnp.float32)
    mw = jnp.asarray(_linear_matrix(W, size, ac), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, images.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """(x - mean) / std over the channel axis."""
    return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)
