"""Top-K selection of guidance-mask positions: single subject (RealCustom Eq. 11, RealCustom++
Eq. 13) and the multi-subject allocation of RealCustom++ Algorithm 1 (Eq. 16), all with static
shapes on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_count(gamma: float, n: int) -> int:
    """floor(gamma * n), the number of positions a subject keeps."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma_scope must lie in [0, 1], got {gamma}")
    return int(gamma * n + 1e-9)


def top_k(m: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest entries of each map (..., H, W), zeroes the rest; exactly ``k`` are
    kept (ties go to the lower flat index)."""
    flat = m.reshape(*m.shape[:-2], -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return jnp.where(rank < k, flat, 0).reshape(m.shape)


def top_k_indicator(m: jax.Array, k: int) -> jax.Array:
    """Boolean (..., H, W): True at the ``k`` largest entries."""
    flat = m.reshape(*m.shape[:-2], -1)
    rank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1)
    return (rank < k).reshape(m.shape)


def normalize(m_bar: jax.Array, kept: jax.Array, mode: str) -> jax.Array:
    """``"max"``: M_bar / max(M_bar) per map (Eq. 13 / 16); ``"binary"``: 1 on kept positions."""
    if mode == "binary":
        return kept.astype(m_bar.dtype)
    if mode == "max":
        mx = jnp.max(m_bar, axis=(-2, -1), keepdims=True)
        return jnp.where(kept, m_bar / jnp.where(mx > 0, mx, 1.0), 0.0)
    raise ValueError(f"unknown mask normalisation {mode!r}; use 'max' or 'binary'")


def multi_subject_top_k(m: jax.Array, counts: tuple[int, ...]) -> jax.Array:
    """RealCustom++ Algorithm 1: round-robin over subjects j = 0..J-1; while subject j still needs
    positions (``counts[j]``), it takes the largest of its own scores among positions no subject has
    taken yet. Returns the boolean allocation (B, J, H, W): disjoint, exactly ``counts[j]`` per subject.

    Runs as one ``lax.fori_loop`` of max(counts) rounds with J masked argmaxes each.
    """
    B, J, H, W = m.shape
    if len(counts) != J:
        raise ValueError(f"{len(counts)} counts for {J} subjects")
    if sum(counts) > H * W:
        raise ValueError(f"subjects ask for {sum(counts)} positions, the map has {H * W}")
    flat = m.reshape(B, J, H * W).astype(jnp.float32)
    need = jnp.asarray(counts, jnp.int32)

    def round_(r, alloc):  # alloc: (B, J, HW) bool
        for j in range(J):  # static: the subject order within a round matters
            taken = jnp.any(alloc, axis=1)
            score = jnp.where(taken, -jnp.inf, flat[:, j])
            pick = jax.nn.one_hot(jnp.argmax(score, axis=-1), H * W, dtype=bool)
            alloc = alloc.at[:, j].set(alloc[:, j] | (pick & (r < need[j])))
        return alloc

    alloc = jax.lax.fori_loop(0, max(counts, default=0), round_, jnp.zeros((B, J, H * W), bool))
    return alloc.reshape(B, J, H, W)
