"""Convolutional building blocks shared by the UNet and the VAE (diffusers names, NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(groups: int, eps: float, name: str, dtype: Any = jnp.float32) -> nn.GroupNorm:
    """torch.nn.GroupNorm numerics: two-pass variance, epsilon inside the square root."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


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
    """Nearest-neighbour 2x, then 3x3 conv."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, "conv", dtype=self.dtype)(x)
