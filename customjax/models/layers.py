"""Small shared pieces: activations by their Hugging Face names and multi-head attention math."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, T, H*D) -> (B, T, H, D)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) in float32; q (B, Tq, H, D), k (B, Tk, H, D) -> (B, H, Tq, Tk).

    ``mask`` broadcasts to (B, H, Tq, Tk); False entries are excluded.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs (B, H, Tq, Tk), v (B, Tk, H, D) -> (B, Tq, H*D)."""
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out.reshape(*out.shape[:2], -1)


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                        is_causal: bool = False) -> jax.Array:
    """Fused attention (flash / cuDNN where the backend has it); q, k, v (B, T, H, D) -> (B, Tq, H*D).

    ``mask`` broadcasts to (B, H, Tq, Tk), True = attend.
    """
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return out.reshape(*out.shape[:2], -1)
