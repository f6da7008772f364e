"""CustomContrast's Multimodal Feature Injection (MFI) encoder (seed 000, Sec. 3.2, Eqs. 2-3).

CLIP image features from K layers, ``f_I``, feed two Q-formers. Each Q-former is ``layers`` blocks
of Perceiver attention (Eq. 2; queries attend to ``[f_I ; queries]``) and a feed-forward, both
residual:

* Visual Q-former: m learnable queries plus a visual CLS give ``f_v`` (m + 1 tokens).
* Textual Q-former: spatio-temporal queries give ``f_t`` (l + 1 tokens). These are one learnable
  embedding per UNet cross-attention layer plus a textual CLS, each plus a Fourier embedding of
  the timestep through an MLP.
* TV fusion: ``PA(f_t, f_v)``, the visual tokens attending to ``[f_t ; f_v]``, refines the visual
  tokens to ``f^_v``.

Outputs: ``text_tokens`` (B, l, text_dim), the l S+ tokens in the text encoder's input-embedding
space, one to replace the placeholder word for each cross-attention layer; ``visual_tokens``
(B, m, cross_dim), for the parallel visual cross-attention of Eq. 3; and ``text_cls`` /
``visual_cls`` (B, dim), for CSCL (Eq. 4).

Choices the paper leaves open (:class:`MFIConfig`):
* the K CLIP layers' features are concatenated along the channels, one token per patch;
* the Perceiver attention LayerNorms its image features and its queries, as the cited
  PerceiverAttention (Flamingo / OpenFlamingo) does, and has no bias in q, k, v;
* the textual CLS is the last query and takes no layer embedding;
* the timestep MLP is Linear-SiLU-Linear, as the UNet's timestep embedding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.models.embeddings import timestep_features
from customjax.models.layers import multihead_attention, split_heads


@dataclasses.dataclass(frozen=True)
class MFIConfig:
    """``image_dim``: channels of f_I (K CLIP layers concatenated: 3 x 1024 for CLIP ViT-L/14).
    ``dim``: the Q-formers' width. ``heads`` x ``dim_head`` = the attention width. ``layers``: Perceiver
    blocks per Q-former (the paper: 4). ``visual_tokens``: m. ``cross_layers``: l, the UNet's
    cross-attention layers (SD-1.5: 16, SDXL: 70). ``text_dim``: width of the text encoder's input
    embeddings (SDXL's two encoders: 768 + 1280, split by the method). ``cross_dim``: the UNet's
    cross-attention width (the visual tokens')."""

    image_dim: int = 3 * 1024
    dim: int = 768
    heads: int = 12
    dim_head: int = 64
    layers: int = 4
    visual_tokens: int = 16
    cross_layers: int = 16
    text_dim: int = 768
    cross_dim: int = 768
    ff_mult: int = 4
    fusion: bool = True          # TV fusion (Table 3's "+ TV fusion" row)
    textual: bool = True         # the textual Q-former (Table 3's "visual Q-former only" row: False)


class PerceiverAttention(nn.Module):
    """Eq. 2: ``softmax(Q(f_q) K([f_I ; f_q])^T / sqrt(d)) V([f_I ; f_q])``, then an output projection."""

    heads: int
    dim_head: int
    out_dim: int

    @nn.compact
    def __call__(self, features: jax.Array, queries: jax.Array) -> jax.Array:
        x = nn.LayerNorm(epsilon=1e-5, name="norm_media")(features)
        q_in = nn.LayerNorm(epsilon=1e-5, name="norm_latents")(queries)
        kv_in = jnp.concatenate([x, q_in], axis=1)
        inner = self.heads * self.dim_head
        q = split_heads(nn.Dense(inner, use_bias=False, name="to_q")(q_in), self.heads)
        k = split_heads(nn.Dense(inner, use_bias=False, name="to_k")(kv_in), self.heads)
        v = split_heads(nn.Dense(inner, use_bias=False, name="to_v")(kv_in), self.heads)
        return nn.Dense(self.out_dim, use_bias=False, name="to_out")(multihead_attention(q, k, v))


class FeedForward(nn.Module):
    mult: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.Dense(d * self.mult, use_bias=False, name="fc1")(nn.LayerNorm(epsilon=1e-5, name="norm")(x))
        return nn.Dense(d, use_bias=False, name="fc2")(nn.gelu(h, approximate=False))


class QFormer(nn.Module):
    """``layers`` x (queries += PA(features, queries); queries += FF(queries))."""

    config: MFIConfig

    @nn.compact
    def __call__(self, features: jax.Array, queries: jax.Array) -> jax.Array:
        c = self.config
        for i in range(c.layers):
            queries = queries + PerceiverAttention(c.heads, c.dim_head, c.dim, name=f"attn_{i}")(features, queries)
            queries = queries + FeedForward(c.ff_mult, name=f"ff_{i}")(queries)
        return queries


class MFIEncoder(nn.Module):
    """``(image_features (B, N, image_dim), timesteps (B,))`` -> dict of ``text_tokens``, ``text_cls``,
    ``visual_tokens`` and ``visual_cls`` (see the module docstring)."""

    config: MFIConfig

    @nn.compact
    def __call__(self, image_features: jax.Array, timesteps: jax.Array) -> dict[str, jax.Array]:
        c = self.config
        B = image_features.shape[0]
        if image_features.ndim != 3 or image_features.shape[-1] != c.image_dim:
            raise ValueError(f"MFI encoder: image features of shape {image_features.shape}; expected "
                             f"(batch, tokens, {c.image_dim}) (K CLIP layers' channels concatenated)")
        f_i = nn.Dense(c.dim, name="proj_in")(image_features)
        init = nn.initializers.normal(c.dim ** -0.5)
        visual_q = self.param("visual_queries", init, (c.visual_tokens + 1, c.dim))
        f_v = QFormer(c, name="visual_qformer")(f_i, jnp.broadcast_to(visual_q, (B, *visual_q.shape)))
        out = {"visual_cls": f_v[:, -1]}
        if c.textual:
            layer_q = self.param("layer_queries", init, (c.cross_layers + 1, c.dim))
            temb = timestep_features(timesteps, c.dim)
            temb = nn.Dense(c.dim, name="time_fc2")(nn.silu(nn.Dense(c.dim, name="time_fc1")(temb)))
            st_q = layer_q[None] + temb[:, None]                    # spatio-temporal queries, (B, l + 1, dim)
            f_t = QFormer(c, name="textual_qformer")(f_i, st_q)
            out["text_cls"] = f_t[:, -1]
            out["text_tokens"] = nn.Dense(c.text_dim, name="text_out")(
                nn.LayerNorm(epsilon=1e-5, name="text_norm")(f_t[:, :-1]))
            if c.fusion:                                            # TV fusion: PA(f_t, f_v)
                f_v = f_v + PerceiverAttention(c.heads, c.dim_head, c.dim, name="tv_fusion")(f_t, f_v)
        out["visual_tokens"] = nn.Dense(c.cross_dim, name="visual_out")(
            nn.LayerNorm(epsilon=1e-5, name="visual_norm")(f_v[:, :-1]))
        return out
