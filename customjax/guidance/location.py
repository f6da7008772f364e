"""CustomContrast's subject location (seed 000, Sec. 3.4): the global attention map A_g, the average
of the visual cross-attention maps A_v and the placeholder's text cross-attention map A_t^p, which
the location loss (Eq. 8) fits to the subject mask in training and which, Top-K selected, becomes
the mask injected at the next sampling step.

The paper leaves the aggregation open. Here, per captured layer: A_v is the mean over the visual
tokens of each token's map, and A_t^p the placeholder tokens' map, each divided by its maximum over
positions (a softmax over tokens makes the plain mean of A_v over its tokens constant, 1 / m, and
the placeholder's share of a 77-token softmax is small); A_g = (A_v + A_t^p) / 2, resized
(bilinear) to the mask grid and averaged over the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from customjax.control.capture import collect
from customjax.guidance.mask import _grid


def _max_norm(m: jax.Array, axis: int = -1) -> jax.Array:
    return m / jnp.maximum(jnp.max(m, axis=axis, keepdims=True), 1e-8)


def location_maps(state: dict, kv: str, word_masks: jax.Array, latent_hw: tuple[int, int],
                  out_hw: tuple[int, int]) -> jax.Array:
    """A_g per subject (B, J, H, W) from a UNet call with ``Capture(cross_probs=F, extra_probs=F)``:
    ``kv`` the extra K/V set's name, ``word_masks`` (B, J, N) True at subject j's placeholder tokens.
    Subject j reads reference min(j, R - 1) (one reference for several words: the same one)."""
    text = [p for _, p in collect(state, "cross_probs")]
    vis = [p for _, p in collect(state, f"extra_probs_{kv}")]
    if not text or len(text) != len(vis):
        raise ValueError(f"location maps need the text and visual cross-attention of the same layers; captured "
                         f"{len(text)} text and {len(vis)} visual maps (Capture.cross_probs / extra_probs)")
    w = word_masks.astype(jnp.float32)
    B, J = w.shape[:2]
    acc = 0.0
    for tp, vp in zip(text, vis):                                # (B, T, N_text), (B, R, T, N_vis)
        h, wd = _grid(tp.shape[1], latent_hw)
        a_t = _max_norm(jnp.einsum("bqn,bjn->bjq", tp.astype(jnp.float32), w))          # (B, J, T)
        a_v = _max_norm(jnp.swapaxes(vp.astype(jnp.float32), -1, -2), axis=-1).mean(axis=2)  # (B, R, T)
        a_v = a_v[:, jnp.minimum(jnp.arange(J), a_v.shape[1] - 1)]
        m = (0.5 * (a_t + a_v)).reshape(B, J, h, wd)
        acc = acc + jax.image.resize(m, (B, J, *out_hw), method="linear")
    return acc / len(text)
