"""Adaptive mask guidance: from the guidance branch's captured attention to per-subject masks.

RealCustom Eq. 11 / RealCustom++ Eqs. 12-13, 16: the target word's cross-attention maps of the
chosen layers, resized to the mask resolution and averaged (M_cross); optionally multiplied by the
high-resolution self-attention (M = M_self @ M_cross, computed as an attention whose values are
M_cross, never forming the N x N map); Top-K (per subject, or disjoint by Algorithm 1); max-norm
or binary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from customjax.control.capture import collect, self_attention_times
from customjax.control.masks import resize_mask
from customjax.guidance.topk import keep_count, multi_subject_top_k, normalize, top_k_indicator
from customjax.models.blocks import nearest_resize


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Static mask settings (the rows of RealCustom++ Tables V, VI, XII and RealCustom Table 2).

    cross_factors: cross-attention layers aggregated, by feature-map downsampling factor relative to
      the latent ("low resolution cross-attn" = the coarse factors; all factors = Table V No.1).
    self_factors: self-attention layers of the augmentation M_self @ M_cross; () = cross only
      (Table V No.2, "w/o AMG-S"), the finest factor = AMG (No.4), all factors = No.3.
    mask_factor: the mask's resolution, latent / mask_factor (the largest attention map).
    gamma_scope: Top-K ratio, one for all subjects or one per subject.
    norm: "max" (Eq. 13) or "binary".
    multi: "algorithm1" (disjoint, RealCustom++ Alg. 1) or "overlap" (independent Top-K).
    """

    cross_factors: tuple[int, ...] = (2, 4)
    self_factors: tuple[int, ...] = (1,)
    mask_factor: int = 1
    gamma_scope: float | tuple[float, ...] = 0.2
    norm: str = "max"
    multi: str = "algorithm1"

    def gammas(self, subjects: int) -> tuple[float, ...]:
        g = self.gamma_scope
        g = (g,) * subjects if isinstance(g, (int, float)) else tuple(g)
        if len(g) != subjects:
            raise ValueError(f"gamma_scope has {len(g)} entries for {subjects} subjects")
        return g


def _grid(hw: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a flattened attention map of ``hw`` positions over a latent of ``latent_hw``:
    the UNet's stride-2 downsamplers give ceil(side / 2) per level (45 -> 23 -> 12 -> 6)."""
    h, w = latent_hw
    while h * w > hw:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != hw:
        raise ValueError(f"attention map of {hw} positions does not tile the latent {latent_hw}")
    return h, w


def cross_attention_maps(state: dict, word_masks: jax.Array, latent_hw: tuple[int, int],
                         out_hw: tuple[int, int]) -> jax.Array:
    """M_cross per subject (B, J, H, W): each captured cross-attention map, averaged over the
    subject's word tokens, resized (bilinear) to ``out_hw`` and averaged over layers.

    word_masks: (B, J, N) True at the tokens of subject j's real word.
    """
    maps = collect(state, "cross_probs")
    if not maps:
        raise ValueError("no cross-attention maps were captured; check MaskConfig.cross_factors "
                         "against the UNet's attention resolutions")
    w = word_masks.astype(jnp.float32)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    acc = 0.0
    for _, probs in maps:                      # (B, hw, N)
        h, wd = _grid(probs.shape[1], latent_hw)
        m = jnp.einsum("bqn,bjn->bjq", probs.astype(jnp.float32), w).reshape(*w.shape[:2], h, wd)
        acc = acc + jax.image.resize(m, (*m.shape[:2], *out_hw), method="linear")
    return acc / len(maps)


def self_augment(state: dict, m_cross: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """M = M_self @ M_cross (RealCustom++ Eq. 12) per subject, averaged over the captured
    self-attention layers. A layer coarser than the mask sees M_cross average-pooled to its grid
    and its product is upsampled (nearest): the exact product with the map resized by nearest
    neighbour, with rows renormalised."""
    qks = collect(state, "self_qk")
    if not qks:
        raise ValueError("no self-attention Q/K captured; check MaskConfig.self_factors")
    B, J, H, W = m_cross.shape
    acc = 0.0
    for _, (q, k) in qks:
        h, w = _grid(q.shape[1], latent_hw)
        v = resize_mask(m_cross, (h, w)).reshape(B, J, h * w).transpose(0, 2, 1)
        out = self_attention_times(q.astype(jnp.float32), k.astype(jnp.float32), v)
        out = out.transpose(0, 2, 1).reshape(B, J, h, w)
        acc = acc + nearest_resize(out.transpose(0, 2, 3, 1), (H, W)).transpose(0, 3, 1, 2)
    return acc / len(qks)


def select(m: jax.Array, cfg: MaskConfig) -> jax.Array:
    """Top-K and normalisation: (B, J, H, W) scores -> guidance masks M_hat (B, J, H, W)."""
    J, hw = m.shape[1], m.shape[2] * m.shape[3]
    counts = tuple(keep_count(g, hw) for g in cfg.gammas(J))
    if cfg.multi not in ("algorithm1", "overlap"):
        raise ValueError(f"unknown multi-subject mode {cfg.multi!r}")
    if J > 1 and cfg.multi == "algorithm1":
        kept = multi_subject_top_k(m, counts)
    else:
        kept = jnp.stack([top_k_indicator(m[:, j], c) for j, c in enumerate(counts)], axis=1)
    return normalize(jnp.where(kept, m, 0.0), kept, cfg.norm)


def guidance_mask(state: dict, word_masks: jax.Array, latent_hw: tuple[int, int],
                  cfg: MaskConfig) -> jax.Array:
    """The whole guidance-branch mask computation: (B, J, H, W) at latent / mask_factor."""
    out_hw = (latent_hw[0] // cfg.mask_factor, latent_hw[1] // cfg.mask_factor)
    m = cross_attention_maps(state, word_masks, latent_hw, out_hw)
    if cfg.self_factors:
        m = self_augment(state, m, latent_hw)
    return select(m, cfg)
