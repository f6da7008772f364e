"""Writing images and grids for people to look at."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W, C) -> uint8."""
    return (np.clip(np.asarray(img, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(img: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(to_uint8(img)).save(path)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) -> one image with the N tiles in rows of ``cols`` (default about sqrt(N))."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return out
