"""CLIP-T and CLIP-I, the papers' text and image similarity metrics (cosine similarity of CLIP
embeddings; RealCustom++ Sec. IV-A), computed with any transformers ``CLIPModel`` folder, e.g.
the ShapeWorld base model's own ``clip/``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from customjax.models.clip import CLIP, load_clip
from customjax.tokenizer import load_tokenizer, tokenize

_embed_text = jax.jit(CLIP.embed_text, static_argnums=0)
_embed_image = jax.jit(CLIP.embed_image, static_argnums=0)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipScorer:
    model: CLIP
    params: dict
    tokenizer: object

    @property
    def image_size(self) -> int:
        return self.model.vision.config.image_size

    def embed_text(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(_embed_text(self.model, self.params, tokenize(self.tokenizer, prompts)))

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 or [0, 1] float images (B, H, W, 3) at the vision tower's size."""
        x = np.asarray(images)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return np.asarray(_embed_image(self.model, self.params, x))

    def clip_t(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Per-image cosine similarity to its prompt."""
        return np.sum(self.embed_images(images) * self.embed_text(prompts), -1)

    def clip_i(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Per-image cosine similarity to its reference image."""
        return np.sum(self.embed_images(images) * self.embed_images(references), -1)


def load_clip_scorer(clip_folder: str | os.PathLike, tokenizer_folder: str | os.PathLike) -> ClipScorer:
    model, params = load_clip(clip_folder)
    return ClipScorer(model, params, load_tokenizer(Path(tokenizer_folder)))
