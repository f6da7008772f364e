"""RealCustom (seed 003): CLIP image features of the reference, narrowed per step by the adaptive
scoring module (Eqs. 5-10) that sees the text, z_t (times the guidance mask at inference,
Sec. 3.3) and the timestep; the kept tokens feed the visual K/V of every cross-attention layer
(Eq. 4).

Trainable: the scoring module (``scoring``) and the visual K/V projections. Data: a reference per
example (the target image itself, Sec. 3.2). Sampling: ``guidance.cfg = "two_scale"`` (Eq. 13).
``scoring.fusion = "none"`` is Table 3's "w/o adaptive scoring module" (ID-2): every image feature,
unweighted, in training and inference (no scoring parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from customjax.models.pixels import normalize, resize_images
from customjax.adapters.scoring import GAMMA_INFERENCE, AdaptiveScoring, ScoringConfig, sample_gamma
from customjax.control.spec import ExtraKV
from customjax.methods.common import abstract, encoder, init
from customjax.methods.protocol import Condition, ImageSide, Method, constant_visual, jit_method
from customjax.models.vit import CLIP_MEAN, CLIP_STD

NO_SCORING = "none"


@dataclasses.dataclass(frozen=True)
class Modules:
    """The CLIP image encoder (``hidden_state``: which of its hidden states are the image features;
    -1 = last) and the scoring module (None: Table 3 ID-2, no scoring)."""

    clip: Any
    scoring: AdaptiveScoring | None
    hidden_state: int = -1


def clip_features(modules: Modules, params: dict, images: jax.Array) -> jax.Array:
    """CLIP image features f_ci (B, n_i, c_i) of images (B, H, W, 3) in [0, 1]."""
    px = normalize(resize_images(images, modules.clip.config.image_size), CLIP_MEAN, CLIP_STD)
    out = modules.clip.apply({"params": params["clip"]}, px)
    return out.hidden_states[modules.hidden_state] if modules.hidden_state != -1 else out.last_hidden_state


@dataclasses.dataclass(frozen=True)
class ScoringVisual:
    """The sampler's image side for RealCustom: per step, score the reference tokens against the
    text and the masked z_t and keep the top ``gamma_num`` (a static-shape token mask)."""

    scoring: AdaptiveScoring
    gamma_num: float = GAMMA_INFERENCE

    def __call__(self, adapter_params: Any, feats: jax.Array, text_ctx: jax.Array, z: jax.Array,
                 sqrt_abar: jax.Array, t: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        B, R = feats.shape[:2]
        flat = feats.reshape(B * R, *feats.shape[2:])
        rep = lambda a: jnp.repeat(a, R, axis=0)
        out = self.scoring.apply({"params": adapter_params}, flat, rep(text_ctx), rep(z),
                                 jnp.broadcast_to(sqrt_abar, (B * R,)), self.gamma_num)
        return out.features.reshape(feats.shape), out.keep.reshape(B, R, -1)


class RealCustom(Method):
    name = "realcustom"
    paper = "RealCustom (seed 003)"
    adapter = "scoring"

    def image_side(self, config, pipe, keys):
        clip, cp = encoder(config, "clip", config.encoders.clip, keys[0])
        params = {"clip": cp}
        scoring = None
        if config.scoring.fusion != NO_SCORING:
            scoring = AdaptiveScoring(ScoringConfig(fusion=config.scoring.fusion), jnp.dtype(config.model.dtype))
            n = (clip.config.image_size // clip.config.patch_size) ** 2 + 1
            cross = pipe.unet.config.cross_attention_dim[0]
            params["scoring"] = init(scoring, keys[2], jnp.zeros((1, n, clip.config.hidden_size)),
                                     jnp.zeros((1, 2, cross)), jnp.zeros((1, 4, 4, pipe.unet.config.in_channels)),
                                     jnp.ones((1,)), shapes_only=abstract(config))
        return ImageSide(Modules(clip, scoring), params, ExtraKV(self.kv_name, clip.config.hidden_size))

    def reference_size(self, config) -> int:
        return int(config.encoders.image_size)

    def condition(self, modules, frozen, trainable, batch, x, key, config):
        feats = jax.lax.stop_gradient(clip_features(modules, frozen, batch["reference"]))
        if modules.scoring is None:
            return Condition(feats[:, None])
        gamma = sample_gamma(key, feats.shape[0], config.gamma_low, config.gamma_high)       # Eq. 10
        out = modules.scoring.apply({"params": trainable["scoring"]}, feats, x.ctx, x.z_t, x.sqrt_abar, gamma)
        return Condition(out.features[:, None], out.keep[:, None])

    @jit_method
    def reference_tokens(self, modules, params, images):
        return clip_features(modules, params, images)

    def visual(self, modules, config):
        if modules.scoring is None:
            return constant_visual
        return ScoringVisual(modules.scoring, float(config.scoring.gamma_num))


METHOD = RealCustom()
