"""Convolutional building blocks shared by the UNet and the VAE (diffusers names, NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def group_norm(groups: int, eps: float, name: str, dtype: Any = jnp.float32) -> nn.GroupNorm:
    """torch.nn.GroupNorm numerics: two-pass variance, epsilon inside the square root."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def check_nhwc(x: jax.Array, channels: int, what: str, key: str = "in_channels") -> None:
    """Raises one ``ValueError`` unless ``x`` is NHWC (B, H, W, ``channels``), naming NCHW when the
    channels sit on axis 1 (a static shape check, free under ``jit``)."""
    shape = tuple(x.shape)
    if len(shape) == 4 and shape[-1] == channels:
        return
    if len(shape) == 4 and shape[1] == channels:
        raise ValueError(f"{what} has shape {shape}, which looks NCHW (B, C, H, W); this model takes NHWC "
                         f"(B, H, W, C) with C = {key} = {channels}: convert with x.transpose(0, 2, 3, 1)")
    raise ValueError(f"{what} has shape {shape}; this model takes NHWC (B, H, W, C) with C = {key} = {channels}")


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(x, size=size, mode="nearest")`` on NHWC: output row i reads input row
    floor(i * H_in / H_out) (columns alike); exactly 2x is a plain repeat."""
    (h, w), (H, W) = x.shape[1:3], tuple(size)
    if (H, W) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows, cols = np.arange(H) * h // H, np.arange(W) * w // W
    return x[:, rows][:, :, cols]


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: int | None = None,
         dtype: Any = jnp.float32) -> nn.Conv:
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, optional time-embedding shift, 1x1 shortcut when channels change."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                         name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", dtype=self.dtype)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``asymmetric_pad`` is the VAE encoder's pad (0, 1, 0, 1) then no padding."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.out_channels, 3, "conv", stride=2, padding=0, dtype=self.dtype)(x)
        return conv(self.out_channels, 3, "conv", stride=2, dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, or to ``size`` (H, W) (diffusers' ``output_size``: the UNet passes its
    skip's size, so odd sides come back as they went down), then 3x3 conv."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = nearest_resize(x, (2 * x.shape[1], 2 * x.shape[2]) if size is None else size)
        return conv(self.out_channels, 3, "conv", dtype=self.dtype)(x)
