"""Contrastive and location losses of CustomContrast (seed 000, Sec. 3.3-3.4), as pure functions of
arrays (jit- and grad-safe), shared with the contrastive methods that come after it.

* :func:`cscl_loss`: Crossmodal Semantic Contrastive Learning, Eq. 4;
* :func:`macl_loss`: Multiscale Appearance Contrastive Learning in the S+ space, Eq. 7;
* :func:`location_loss`: the subject location loss, Eq. 8;
* :func:`total_loss`: Eq. 9.

Where the paper's text is ambiguous, the choice is stated in the function's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``cos(a_i, b_j)`` for every pair: (..., N, D) x (..., M, D) -> (..., N, M)."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.einsum("...nd,...md->...nm", a, b)


def _log_ratio(logits: jax.Array, keep: jax.Array, num: jax.Array) -> jax.Array:
    """``num - logsumexp(logits over keep)`` along the last axis."""
    den = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=-1)
    return num - den


def cscl_loss(v_cls: jax.Array, t_cls: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Eq. 4 over a batch of N visual and textual CLS features (N, D), ``a_ij = cos(v_i, t_j)``:

        L_c = -sum_i log[exp(a_ii) / sum_{j != i} exp(a_ji)] - sum_i log[exp(a_ii) / sum_{j != i} exp(a_ij)]

    As printed, the positive a_ii is left out of both denominators. The first term runs over
    the visual side (column i), the second over the textual side (row i). The sums over i are
    averaged here (mean over N): the paper sums, and lambda_1 absorbs the factor. ``temperature``
    divides every a_ij; the paper gives none (1.0)."""
    a = cosine_matrix(v_cls, t_cls) / temperature           # a[i, j] = cos(v_i, t_j)
    n = a.shape[0]
    off = ~jnp.eye(n, dtype=bool)
    diag = jnp.diagonal(a)
    col = _log_ratio(a.T, off, diag)                        # a.T[i, j] = a_ji
    row = _log_ratio(a, off, diag)
    return -(col.mean() + row.mean())


def macl_loss(s_plus: jax.Array, subject: jax.Array, appearance: jax.Array, temperature: float = 0.07,
              min_similarity: float = 0.05) -> jax.Array:
    """Eq. 7 over a batch of S+ tokens ``s_plus`` (N, l, D): one token per cross-attention layer.
    ``subject`` (N,) ints: samples with the same id are views of one subject, and the other views
    are the positives. ``appearance`` (N, N): r_ij, the CLIP image similarity of the segmented
    subjects. With ``cos^a_ij = cos(s+_ia, s+_ja)`` and ``alpha_ij = 1 / r_ij``:

        L_m^ij = -sum_a log[exp(alpha_ij cos^a_ij / tau) / sum_{k != i} exp(alpha_ik cos^a_ik / tau)]

    This is averaged over every (anchor i, positive j) pair and summed over the l layers, as
    printed. The denominator runs over every k != i, the positive included. r_ij is clipped below
    at ``min_similarity``, so that alpha stays finite for unrelated subjects (the paper does not
    say). A batch without a positive pair gives 0."""
    n = s_plus.shape[0]
    cos = cosine_matrix(jnp.swapaxes(s_plus, 0, 1), jnp.swapaxes(s_plus, 0, 1))   # (l, N, N)
    alpha = 1.0 / jnp.maximum(appearance, min_similarity)
    logits = alpha[None] * cos / temperature                                       # (l, N, N)
    off = ~jnp.eye(n, dtype=bool)
    den = jax.nn.logsumexp(jnp.where(off[None], logits, -jnp.inf), axis=-1, keepdims=True)   # (l, N, 1)
    log_p = (logits - den).sum(0)                                                  # (N, N): sum over layers
    pos = (subject[:, None] == subject[None, :]) & off
    count = pos.sum()
    return jnp.where(count > 0, -jnp.sum(jnp.where(pos, log_p, 0.0)) / jnp.maximum(count, 1), 0.0)


def location_loss(attention: jax.Array, mask: jax.Array) -> jax.Array:
    """Eq. 8 between the averaged attention map ``attention`` (B, h, w) (the visual and placeholder
    cross-attention maps averaged, each normalised over positions) and the subject mask ``mask``
    (B, h, w) in [0, 1]:

        L_loc = mean((1 - M) * A) - mean(M * A)

    The paper prints ``(1 - A)`` in the first term. Taken literally, minimising it would pull
    attention out of the subject. Its source (FastComposer, Xiao et al. 2023, which the paper
    cites) lowers the attention outside the mask and raises it inside, as here."""
    return jnp.mean((1.0 - mask) * attention) - jnp.mean(mask * attention)


def total_loss(ldm: jax.Array, cscl: jax.Array, macl: jax.Array, location: jax.Array,
               lambda1: float = 1e-2, lambda2: float = 1e-3) -> jax.Array:
    """Eq. 9: ``L_LDM + lambda1 (L_c + L_m) + lambda2 L_loc`` (the paper's 1e-2, 1e-3)."""
    return ldm + lambda1 * (cscl + macl) + lambda2 * location
