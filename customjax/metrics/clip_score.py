"""CLIP-T and CLIP-I, the papers' text and image similarity metrics (cosine similarity of CLIP
embeddings; RealCustom++ Sec. IV-A), computed with any transformers ``CLIPModel`` folder, e.g.
the ShapeWorld base model's own ``clip/``."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from customjax.adapters.features import CLIP_MEAN, CLIP_STD

from customjax.models.clip_text import clip_text_spec
from customjax.models.vit import clip_vision_spec
from customjax.tokenizer import load_tokenizer, tokenize
from customjax.weights.loaders import load_pretrained

MEAN, STD = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipScorer:
    text: object
    vision: object
    params: dict
    tokenizer: object

    @functools.partial(jax.jit, static_argnums=0)
    def _text(self, params, ids):
        e = self.text.apply({"params": params}, ids).text_embeds
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    @functools.partial(jax.jit, static_argnums=0)
    def _image(self, params, pixels):
        e = self.vision.apply({"params": params}, pixels).image_embeds
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def embed_text(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self._text(self.params["text"], jnp.asarray(tokenize(self.tokenizer, prompts))))

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 or [0, 1] float images (B, H, W, 3) at the vision tower's size."""
        x = np.asarray(images, np.float32)
        x = x / 255.0 if np.asarray(images).dtype == np.uint8 else x
        return np.asarray(self._image(self.params["vision"], jnp.asarray((x - MEAN) / STD)))

    def clip_t(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Per-image cosine similarity to its prompt."""
        return np.sum(self.embed_images(images) * self.embed_text(prompts), -1)

    def clip_i(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Per-image cosine similarity to its reference image."""
        return np.sum(self.embed_images(images) * self.embed_images(references), -1)


def load_clip_scorer(clip_folder: str | os.PathLike, tokenizer_folder: str | os.PathLike) -> ClipScorer:
    text, tp, _ = load_pretrained(clip_folder, clip_text_spec(True))
    vision, vp, _ = load_pretrained(clip_folder, clip_vision_spec(True))
    return ClipScorer(text, vision, {"text": tp, "vision": vp}, load_tokenizer(Path(tokenizer_folder)))
