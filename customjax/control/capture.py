"""Reading what :class:`customjax.control.spec.Capture` sowed, and the fast self-attention product.

RealCustom++ Eq. 12 multiplies the self-attention map by the cross-attention mask,
M = M_self @ M_cross. Since M_self = softmax(Q K^T / sqrt d), M_self @ v is an attention whose
values are v: :func:`self_attention_times` computes it from the captured Q, K with the fused kernel,
never forming the (h*w) x (h*w) map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util


def collect(state: dict, name: str) -> list[tuple[str, jax.Array]]:
    """(module path, value) for every ``name`` sown into ``state["attention"]``, in call order."""
    flat = traverse_util.flatten_dict(state.get("attention", {}))
    return [("/".join(k[:-1]), v) for k, vals in flat.items() if k[-1] == name for v in vals]


def self_attention_times(q: jax.Array, k: jax.Array, values: jax.Array) -> jax.Array:
    """Head-averaged softmax(Q K^T / sqrt d) @ values without the T x T map.

    q, k: (B, T, H, d) from ``Capture.self_qk``; values (B, T, C) with C <= d (padded to d inside).
    Returns (B, T, C).
    """
    B, T, H, d = q.shape
    C = values.shape[-1]
    if C > d:
        raise ValueError(f"values have {C} channels, more than the head dimension {d}; split them")
    v = jnp.pad(values.astype(q.dtype), ((0, 0), (0, 0), (0, d - C)))
    v = jnp.broadcast_to(v[:, :, None, :], (B, T, H, d))
    return jax.nn.dot_product_attention(q, k, v).mean(axis=2)[..., :C]
