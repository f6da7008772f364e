"""RealCustom (seed 003): CLIP image features of the reference, narrowed per step by the adaptive
scoring module (Eqs. 5-10) that sees the text, z_t (times the guidance mask at inference,
Sec. 3.3) and the timestep; the kept tokens feed the visual K/V of every cross-attention layer.

Trainable: the scoring module and the visual K/V projections.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from customjax.adapters.features import normalize, resize_images
from customjax.adapters.scoring import GAMMA_INFERENCE, AdaptiveScoring
from customjax.control.params import is_control_param
from customjax.models.vit import CLIP_MEAN, CLIP_STD

KV_NAME = "vision"


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """The CLIP image encoder (``hidden_state``: which of its hidden states are the image features;
    -1 = last) and the scoring module."""

    clip: Any
    scoring: AdaptiveScoring
    hidden_state: int = -1


@functools.partial(jax.jit, static_argnames=("side",))
def reference_tokens(side: ImageSide, params: dict, images: jax.Array) -> jax.Array:
    """CLIP image features f_ci (B, n_i, c_i) of reference images (B, H, W, 3) in [0, 1]."""
    px = normalize(resize_images(images, side.clip.config.image_size), CLIP_MEAN, CLIP_STD)
    out = side.clip.apply({"params": params["clip"]}, px)
    return out.hidden_states[side.hidden_state] if side.hidden_state != -1 else out.last_hidden_state


@dataclasses.dataclass(frozen=True)
class ScoringVisual:
    """The sampler's image side for RealCustom: per step, score the reference tokens against the
    text and the masked z_t and keep the top ``gamma_num`` (a static-shape token mask)."""

    scoring: AdaptiveScoring
    gamma_num: float = GAMMA_INFERENCE

    def __call__(self, adapter_params: Any, feats: jax.Array, text_ctx: jax.Array, z: jax.Array,
                 sqrt_abar: jax.Array) -> tuple[jax.Array, jax.Array]:
        B, R = feats.shape[:2]
        flat = feats.reshape(B * R, *feats.shape[2:])
        rep = lambda a: jnp.repeat(a, R, axis=0)
        out = self.scoring.apply({"params": adapter_params}, flat, rep(text_ctx), rep(z),
                                 jnp.broadcast_to(sqrt_abar, (B * R,)), self.gamma_num)
        return out.features.reshape(feats.shape), out.keep.reshape(B, R, -1)


def is_trainable(path: tuple[str, ...]) -> bool:
    """Scoring-module parameters (under ``scoring``) and the UNet's visual K/V projections."""
    return path[0] == "scoring" or is_control_param(path, extra_kv=(KV_NAME,), lora=False)
