"""Writing images and grids for people to look at."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W, C) -> uint8."""
    return (np.clip(np.asarray(img, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """A reference image (H, W, 3), uint8 or float in [0, 1], resized (bicubic, as an 8-bit PIL
    image; floats are rounded by :func:`to_uint8`) to float32 (size, size, 3) in [0, 1]."""
    img = np.asarray(img)
    u8 = img if img.dtype == np.uint8 else to_uint8(img)
    return np.asarray(Image.fromarray(u8).resize((size, size), Image.BICUBIC), np.float32) / 255.0


def save_png(img: np.ndarray, path: str | os.PathLike) -> None:
    """Writes ``img`` (float in [0, 1] or uint8) as PNG; ``path`` may be an ``etils.epath`` path
    (a bucket URL such as ``gs://...``)."""
    if "://" in os.fspath(path):
        import io

        from etils import epath
        buf = io.BytesIO()
        Image.fromarray(to_uint8(img)).save(buf, format="PNG")
        epath.Path(path).write_bytes(buf.getvalue())
        return
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


COLORS = np.array([[1.0, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.35, 1.0], [1.0, 0.8, 0.1], [0.8, 0.2, 0.9]])


def upsample(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (..., h, w) to (..., H, W) (H, W multiples of h, w)."""
    h, w = mask.shape[-2:]
    return np.repeat(np.repeat(mask, hw[0] // h, axis=-2), hw[1] // w, axis=-1)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Image (H, W, 3) with subject masks (J, h, w) in [0, 1] painted over it, one colour each."""
    H, W = image.shape[:2]
    out = np.asarray(image, np.float32).copy()
    for j, m in enumerate(np.asarray(masks, np.float32)):
        a = alpha * upsample(m, (H, W))[..., None]
        out = out * (1 - a) + a * COLORS[j % len(COLORS)]
    return out


def mask_strip(steps: np.ndarray, size: int = 64) -> np.ndarray:
    """Per-step masks (T, J, h, w) as one row of T colour tiles (RealCustom++ Fig. 14)."""
    tiles = []
    for m in np.asarray(steps, np.float32):
        tile = np.zeros((size, size, 3), np.float32)
        for j, mj in enumerate(m):
            tile += upsample(mj, (size, size))[..., None] * COLORS[j % len(COLORS)]
        tiles.append(np.clip(tile, 0, 1))
    return grid(np.stack(tiles), cols=len(tiles), pad=1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def sheet(rows: list[dict], min_size: int = 256, pad: int = 8, font_size: int = 16) -> np.ndarray:
    """A contact sheet a person can read: one row a case, its ``title`` (the prompt, its words and
    seeds) written above, then its ``tiles``: ``(label, image)`` pairs (the reference(s), each sample
    and its mask overlay), every image upscaled by an integer factor (nearest) to at least
    ``min_size`` px high, each label under its tile. Returns float (H, W, 3) in [0, 1]."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    line = font_size + 6
    tile = max(np.asarray(img).shape[0] for r in rows for _, img in r["tiles"])
    scale = max(1, math.ceil(min_size / tile))
    size = tile * scale
    cols = max(len(r["tiles"]) for r in rows)
    width = pad + cols * (size + pad)
    row_h = line + size + line + pad
    page = Image.new("RGB", (width, pad + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(page)
    for i, r in enumerate(rows):
        y = pad + i * row_h
        draw.text((pad, y), _fit(r["title"], font, width - 2 * pad), fill="black", font=font)
        for q, (label, img) in enumerate(r["tiles"]):
            img = to_uint8(img) if np.asarray(img).dtype != np.uint8 else np.asarray(img)
            f = max(1, size // img.shape[0])
            big = np.repeat(np.repeat(img, f, axis=0), f, axis=1)
            x = pad + q * (size + pad)
            page.paste(Image.fromarray(big), (x, y + line))
            draw.text((x, y + line + size + 2), _fit(label, font, size), fill="dimgray", font=font)
    return np.asarray(page, np.float32) / 255.0


def case_rows(cases: list[dict], images: list, overlays: list | None) -> list[dict]:
    """The rows of :func:`sheet` for sampled cases: ``cases`` (one per image, each with ``prompt``,
    ``words``, ``seed``, ``reference_images`` and optionally ``layout``: masks drawn, not attended),
    their images and mask overlays (or None); the images of one prompt and reference set share a row."""
    rows: dict = {}
    for i, c in enumerate(cases):
        key = (c["prompt"], tuple(c["words"]), id(c["reference_images"]), bool(c.get("layout")))
        if key not in rows:
            words = f"  [{', '.join(c['words'])}]" if c["words"] else ""
            layout = "  masks: the drawn layout" if c.get("layout") else ""
            rows[key] = dict(prompt=c["prompt"] + words + layout, seeds=[], tiles=[
                (f"reference {k + 1}" if len(c["reference_images"]) > 1 else "reference", ref)
                for k, ref in enumerate(c["reference_images"])])
        r = rows[key]
        r["seeds"].append(str(c["seed"]))
        r["tiles"].append((f"seed {c['seed']}", images[i]))
        if overlays is not None:
            r["tiles"].append((f"seed {c['seed']} masks", overlays[i]))
    return [dict(title=f"{r['prompt']}  (seeds {', '.join(r['seeds'])})", tiles=r["tiles"]) for r in rows.values()]
