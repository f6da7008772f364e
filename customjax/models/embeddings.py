"""Sinusoidal timestep features and the timestep MLP (diffusers ``Timesteps``, ``TimestepEmbedding``)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_features(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                      max_period: float = 10000.0) -> jax.Array:
    """[sin(t w_i), cos(t w_i)] with w_i = exp(-ln(max_period) i / (dim/2 - freq_shift)); (N,) -> (N, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_2")(nn.silu(x))
