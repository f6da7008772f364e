"""Word binding: does a word's cross-attention mark its own object when several are drawn?

The customization methods read a target word's cross-attention map as the place of its subject
(RealCustom Eq. 7-8, RealCustom++ AMG), so a base model must route each word to its object. For
one cross-attention layer and a scene of objects with known masks, each subject's word map (its
tokens' probabilities averaged, normalised over positions) is compared with the objects:

    density(region) = mean of the map over the region / the map's mean (1 = no preference)
    binding = density(own object) / (density(own object) + density(other object))

0.5: the word marks both objects alike; 1: only its own."""

from __future__ import annotations

import numpy as np


def word_binding(probs, words, regions) -> dict[str, np.ndarray]:
    """Binding statistics of one layer for two-subject scenes.

    probs: ``(B, h*w, N)`` head-averaged cross-attention probabilities; words: ``(B, 2, N)`` bool, each
    subject's word tokens; regions: ``(B, 2, h, w)`` each subject's object coverage of the layer's grid.
    Returns ``(B, 2)`` arrays: binding, density_own, density_other, and ``(B,)`` word_mass (the
    probability the two words receive together, averaged over positions)."""
    probs, words = np.asarray(probs, np.float64), np.asarray(words, bool)
    B, T, _ = probs.shape
    if words.shape[:2] != (B, 2) or regions.shape[:2] != (B, 2) or np.prod(regions.shape[2:]) != T:
        raise ValueError(f"shapes do not match: probs {probs.shape}, words {words.shape}, regions {regions.shape}")
    if not words.any(-1).all():
        raise ValueError("a subject has no word tokens (truncated prompt?)")
    r = np.asarray(regions, np.float64).reshape(B, 2, T)
    a = np.einsum("btn,bsn->bst", probs, words) / words.sum(-1, keepdims=True)      # (B, 2, T)
    p = a / np.maximum(a.sum(-1, keepdims=True), 1e-30)
    density = lambda region: (p * region).sum(-1) / np.maximum(region.sum(-1), 1e-12) * T
    own, other = density(r), density(r[:, ::-1])
    return dict(binding=own / np.maximum(own + other, 1e-30), density_own=own, density_other=other,
                word_mass=np.einsum("btn,bn->bt", probs, words.any(1)).mean(-1))
