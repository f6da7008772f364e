"""diffusers ``Transformer2DModel`` and ``BasicTransformerBlock`` (self-attn, cross-attn, GEGLU)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.control.spec import Control, ControlConfig
from customjax.models.attention import Attention
from customjax.models.blocks import conv, group_norm


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _ln(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                        name=name)


class GEGLU(nn.Module):
    """proj: Linear(dim, 2 * inner); hidden * gelu(gate) with exact gelu."""

    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(_dense(2 * self.inner, "proj", self.dtype)(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
        return _dense(self.dim, "net_2", self.dtype)(x)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    dim_head: int
    factor: int = 1
    control: ControlConfig = ControlConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, hw, control: Control | None = None):
        attn = lambda cross, name: Attention(self.heads, self.dim_head, self.dim, cross, self.factor,
                                             self.control, self.dtype, name=name)
        x = x + attn(False, "attn1")(_ln("norm1", self.dtype)(x), None, hw)
        x = x + attn(True, "attn2")(_ln("norm2", self.dtype)(x), context, hw, control)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(_ln("norm3", self.dtype)(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear for SD-2/SDXL), blocks, proj_out, residual.

    ``layer_offset`` is the UNet-wide index of this model's first cross-attention layer, used to pick
    a layer's own text sequence when ``context`` is per-layer ``(L, B, N, D)``.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    layer_offset: int = 0
    factor: int = 1
    remat: bool = False
    control: ControlConfig = ControlConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, control: Control | None = None):
        B, H, W, C = x.shape
        inner = self.heads * self.dim_head
        res = x
        x = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            x = _dense(inner, "proj_in", self.dtype)(x.reshape(B, H * W, C))
        else:
            x = conv(inner, 1, "proj_in", dtype=self.dtype)(x).reshape(B, H * W, inner)
        block_cls = nn.remat(BasicTransformerBlock, static_argnums=(3,)) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            ctx = context[self.layer_offset + i] if context.ndim == 4 else context
            x = block_cls(inner, self.heads, self.dim_head, self.factor, self.control, self.dtype,
                          name=f"transformer_blocks_{i}")(x, ctx, (H, W), control)
        if self.use_linear_projection:
            x = _dense(C, "proj_out", self.dtype)(x).reshape(B, H, W, C)
        else:
            x = conv(C, 1, "proj_out", dtype=self.dtype)(x.reshape(B, H, W, inner))
        return x + res
