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


# Above this many attention logits (B * H * Tq * Tk; 128 MiB of float32) attention runs over query
# chunks, each rematerialised in the backward pass: the full (Tq, Tk) map of a 64 x 64 feature map
# (SD-1.5 at 512 px, 8 heads: 512 MiB, a few such maps per layer in the backward pass) is never formed.
CHUNK_LOGITS = 2 ** 25


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                        is_causal: bool = False) -> jax.Array:
    """Fused attention (flash / cuDNN where the backend has it); q, k, v (B, T, H, D) -> (B, Tq, H*D).

    ``mask`` broadcasts to (B, H, Tq, Tk), True = attend. Large maps (more than :data:`CHUNK_LOGITS`
    logits, a mask without a query axis) run in query chunks (:func:`chunked_attention`).
    """
    B, Tq, H, _ = q.shape
    if not is_causal and B * H * Tq * k.shape[1] > CHUNK_LOGITS and (mask is None or mask.shape[-2] == 1):
        out = chunked_attention(q, k, v, mask, max(1, CHUNK_LOGITS // (B * H * k.shape[1])))
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return out.reshape(*out.shape[:2], -1)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, chunk: int) -> jax.Array:
    """``jax.nn.dot_product_attention`` over query chunks of at most ``chunk`` rows, one after the
    other (``lax.map``), each recomputed in the backward pass (``jax.checkpoint``): memory for one
    chunk's (chunk, Tk) logits instead of the whole map. (B, Tq, H, D) -> (B, Tq, H, D)."""
    B, Tq, H, D = q.shape
    n = -(-Tq // chunk)
    size = -(-Tq // n)
    qp = jnp.pad(q, ((0, 0), (0, n * size - Tq), (0, 0), (0, 0))).reshape(B, n, size, H, D).swapaxes(0, 1)
    one = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, mask=mask))
    out = jax.lax.map(one, qp)                                          # (n, B, size, H, D)
    return out.swapaxes(0, 1).reshape(B, n * size, H, D)[:, :Tq]
