"""Image and text encoders for the similarity metrics, from Hugging Face folders, without torch.

  * :func:`load_dino`: a transformers ``ViTModel`` folder (DreamBench's DINO-I uses ``facebook/dino-vits16``);
    a ``Dinov2Model`` folder works too (Contrastive Inversion reports DINOv2). The embedding is the final-normed
    CLS token.
  * :func:`load_clip_encoder`: a ``CLIPModel`` folder (CLIP-T, CLIP-I: the projected, normalised embeddings).

Each applies its folder's ``preprocessor_config.json`` as transformers' image processors do (``size`` as
height / width or ``shortest_edge``, PIL ``resample``, ``crop_size`` centre crop, rescale by 1/255,
``image_mean`` / ``image_std``), with transformers' defaults for the model type when the file is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One image processor: resize (exact ``(h, w)`` or the shortest edge to ``shortest``), centre crop,
    rescale, normalise."""

    size: tuple[int, int] | None = None
    shortest: int | None = None
    crop: tuple[int, int] | None = None
    resample: int = Image.BICUBIC
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Preprocess":
        size = d.get("size")
        exact = shortest = None
        if d.get("do_resize", True):
            if isinstance(size, int):
                exact = (size, size)
            elif isinstance(size, dict) and "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            elif isinstance(size, dict) and {"height", "width"} <= set(size):
                exact = (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"{where}: preprocessor size {size!r} is not supported (an int, "
                                 "{'height', 'width'} or {'shortest_edge'})")
        crop = None
        if d.get("do_center_crop", False):
            c = d.get("crop_size", 224)
            crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        if not d.get("do_rescale", True) or not d.get("do_normalize", True):
            raise ValueError(f"{where}: do_rescale / do_normalize false are not supported")
        return cls(exact, shortest, crop, int(d.get("resample", Image.BICUBIC)),
                   tuple(d.get("image_mean", IMAGENET_MEAN)), tuple(d.get("image_std", IMAGENET_STD)))

    def out_size(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        raise ValueError("an image processor with only a shortest-edge resize gives no fixed size: set crop_size")

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (h, w, 3) in [0, 1], resized and cropped (not normalised)."""
        img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
        if self.size:
            img = img.resize((self.size[1], self.size[0]), resample=self.resample)
        elif self.shortest:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest * long / short)
            img = img.resize((self.shortest, new_long) if w <= h else (new_long, self.shortest), resample=self.resample)
        x = np.asarray(img, np.float32) / 255.0
        if self.crop:
            ch, cw = self.crop
            h, w = x.shape[:2]
            if h < ch or w < cw:
                raise ValueError(f"image of {h}x{w} after resizing is smaller than the crop {ch}x{cw}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[top:top + ch, left:left + cw]
        return x

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Normalised (N, h, w, 3) float32."""
        x = np.stack([self.pixels(i) for i in images])
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def read_preprocess(folder: Path, default: dict) -> Preprocess:
    f = folder / "preprocessor_config.json"
    d = json.loads(f.read_text()) if f.is_file() else default
    return Preprocess.from_dict(d, str(f if f.is_file() else folder))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class ImageEncoder:
    """Unit image embeddings (N, D) of uint8 images, ``chunk`` at a time through one jitted function."""

    def __init__(self, name: str, preprocess: Preprocess, fn, chunk: int = 32):
        self.name, self.preprocess, self._fn, self.chunk = name, preprocess, jax.jit(fn), chunk

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.chunk):
            part = list(images[i:i + self.chunk])
            n = len(part)
            x = self.preprocess(part + [part[-1]] * (self.chunk - n) if len(images) > self.chunk else part)
            out.append(np.asarray(self._fn(jnp.asarray(x)))[:n])
        return _unit(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


DINO_DEFAULT = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
CLIP_DEFAULT = {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 224, "resample": 3}


def load_dino(folder: str | os.PathLike) -> ImageEncoder:
    """DINO-I's encoder: a ``ViTModel`` (DINO v1) or ``Dinov2Model`` folder; the embedding is the CLS
    token after the final LayerNorm."""
    from customjax.models.vit import DINOV2, VIT
    from customjax.weights.folder import read_config
    from customjax.weights.loaders import load_pretrained

    folder = Path(folder)
    kind = read_config(folder).get("model_type")
    specs = {"vit": VIT, "dinov2": DINOV2, "dinov2_with_registers": DINOV2}
    if kind not in specs:
        raise ValueError(f"{folder}: model_type {kind!r}; DINO-I needs a ViTModel ('vit', e.g. facebook/dino-vits16) "
                         "or a Dinov2Model folder")
    module, params, cfg = load_pretrained(folder, specs[kind])
    pre = read_preprocess(folder, DINO_DEFAULT)
    if pre.out_size() != (cfg.image_size, cfg.image_size) and kind == "vit":
        raise ValueError(f"{folder}: the image processor gives {pre.out_size()} images, the ViT takes {cfg.image_size} px")
    return ImageEncoder(f"DINO ({folder.name})", pre, lambda x: module.apply({"params": params}, x).last_hidden_state[:, 0])


class ClipEncoder(ImageEncoder):
    """CLIP image embeddings plus :meth:`embed_text`."""

    def __init__(self, model, params, tokenizer, preprocess: Preprocess, name: str):
        super().__init__(name, preprocess, lambda x: model.vision.apply({"params": params["vision"]}, x).image_embeds)
        self._text = jax.jit(lambda ids: model.text.apply({"params": params["text"]}, ids).text_embeds)
        self.tokenizer = tokenizer

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        from customjax.tokenizer import tokenize
        return _unit(np.asarray(self._text(jnp.asarray(tokenize(self.tokenizer, list(prompts))))))


def load_clip_encoder(folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ClipEncoder:
    """CLIP-T / CLIP-I's encoder: a ``CLIPModel`` folder (its tokenizer files, or ``tokenizer``: a
    tokenizer folder)."""
    from customjax.models.clip import load_clip
    from customjax.tokenizer import load_tokenizer

    folder = Path(folder)
    model, params = load_clip(folder)
    tok_dir = Path(tokenizer) if tokenizer else folder
    if not ((tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"{tok_dir}: no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json); "
                                "pass the tokenizer folder")
    pre = read_preprocess(folder, CLIP_DEFAULT)
    size = model.vision.config.image_size
    if pre.out_size() != (size, size):
        raise ValueError(f"{folder}: the image processor gives {pre.out_size()} images, the CLIP vision tower takes {size} px")
    return ClipEncoder(model, params, load_tokenizer(tok_dir), pre, f"CLIP ({folder.name})")
