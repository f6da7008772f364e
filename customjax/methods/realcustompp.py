"""RealCustom++ (seed 004): SigLIP + DINOv2 features of the reference -> the cross-layer
cross-scale projector (Eqs. 5-9) -> visual tokens f_ci, fed to the bias-free ``to_k_vision`` /
``to_v_vision`` of every cross-attention layer (Eq. 4 in training, Eqs. 14 / 17 at inference).

Trainable: the projector and the visual K/V projections; everything else frozen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax

from customjax.adapters.ccp import CCPConfig, CrossLayerCrossScaleProjector
from customjax.adapters.features import (Encoder, FeatureConfig, ReferenceFeatures, check_encoders,
                                         reference_features)
from customjax.control.params import is_control_param

KV_NAME = "vision"


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """The reference encoders and the projector (static modules; parameters live apart, by name:
    ``{"<encoder name>": ..., "ccp": ...}``). ``encoders``: SigLIP and DINOv2, or one encoder
    alone (the ShapeWorld base model's CLIP image encoder)."""

    encoders: tuple[Encoder, ...]
    ccp: CrossLayerCrossScaleProjector
    features: FeatureConfig = FeatureConfig()

    def __post_init__(self):
        check_encoders(self.encoders)


def projector_inputs(side: ImageSide, params: Mapping[str, Any], images: jax.Array) -> ReferenceFeatures:
    """The projector's inputs for reference images (B, H, W, 3) in [0, 1] (the shallow / high
    features only when the projector reads them); ``params[encoder.name]``: the encoders' parameters."""
    c: CCPConfig = side.ccp.config
    return reference_features(images, side.encoders, params, side.features, shallow=c.cross_layer,
                              high=c.cross_scale)


@functools.partial(jax.jit, static_argnames=("side",))
def reference_tokens(side: ImageSide, params: dict, images: jax.Array) -> jax.Array:
    """f_ci (B, N, c_image) for reference images (B, H, W, 3) in [0, 1]."""
    f = projector_inputs(side, params, images)
    return side.ccp.apply({"params": params["ccp"]}, f.deep, f.shallow, f.high).tokens


def constant_visual(adapter_params: Any, feats: jax.Array, text_ctx: jax.Array, z: jax.Array,
                    sqrt_abar: jax.Array) -> tuple[jax.Array, None]:
    """The sampler's image side for RealCustom++: the projector tokens, the same at every step."""
    return feats, None


def is_trainable(path: tuple[str, ...]) -> bool:
    """Projector parameters (under ``ccp``) and the UNet's visual K/V projections."""
    return path[0] == "ccp" or is_control_param(path, extra_kv=(KV_NAME,), lora=False)
