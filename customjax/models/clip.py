"""CLIP as one model of two towers (transformers ``CLIPModel``): L2-normalised text and image
embeddings (Radford et al. 2021, Fig. 3), for contrastive training and CLIP-T / CLIP-I scores.
The towers are :class:`~customjax.models.clip_text.CLIPTextModel` and
:class:`~customjax.models.vit.CLIPVisionModel`, both with their projections."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from customjax.models.pixels import normalize
from customjax.models.clip_text import CLIPTextModel, CLIPTextOutput, clip_text_spec
from customjax.models.vit import CLIP_MEAN, CLIP_STD, CLIPVisionModel, clip_vision_spec
from customjax.weights.loaders import load_pretrained


def _unit(e: jax.Array) -> jax.Array:
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class CLIP:
    """Static towers (hashable, a jit static argument); parameters ``{"text", "vision"}`` apart."""

    text: CLIPTextModel
    vision: CLIPVisionModel

    def embed_text(self, params: dict, ids: jax.Array) -> jax.Array:
        return self.text_features(params, ids)[0]

    def text_features(self, params: dict, ids: jax.Array) -> tuple[jax.Array, CLIPTextOutput]:
        """(normalised text embeddings, the tower's whole output: per-token states too)."""
        out = self.text.apply({"params": params["text"]}, ids)
        return _unit(out.text_embeds), out

    def embed_image(self, params: dict, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] at the vision tower's size."""
        return _unit(self.vision.apply({"params": params["vision"]}, normalize(images, CLIP_MEAN, CLIP_STD)).image_embeds)


def load_clip(folder: str | os.PathLike) -> tuple[CLIP, dict]:
    """(CLIP, {"text", "vision"} params) from a transformers ``CLIPModel`` folder (strict; the
    ``logit_scale`` is logged as not a tower parameter)."""
    text, tp, _ = load_pretrained(folder, clip_text_spec(True))
    vision, vp, _ = load_pretrained(folder, clip_vision_spec(True))
    return CLIP(text, vision), {"text": tp, "vision": vp}
