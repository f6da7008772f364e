"""Robust image decoding (PIL) and the crop geometry of the training transforms.

:func:`open_rgb` never returns a broken image: corrupt or truncated bytes, and images whose short
side is below ``min_size``, raise :class:`ImageError` with a skip reason. Grayscale, 16-bit,
CMYK, palette and alpha images are converted to RGB (transparent areas composited on white), EXIF
orientation is applied, and large JPEGs are decoded at reduced scale (``draft``) when the crops
need fewer pixels. :func:`oriented_size` reads the same size from the header alone. The training
target is :func:`target_crop` of the frame decoded by :func:`open_target`, whatever else is cut from
the frame, so :mod:`~customjax.data.precompute` reproduces it exactly.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a skip reason (``undecodable``, ``truncated``, ``too_small``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, np.float32)
        if a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def failure_reason(error: BaseException) -> str:
    """The skip reason of an exception PIL raised for bad image bytes: ``truncated`` or ``undecodable``."""
    return "truncated" if "truncat" in str(error).lower() else "undecodable"


def _check_size(h: int, w: int, where: str, min_size: int) -> None:
    if min(h, w) < min_size:
        raise ImageError("too_small", f"{where}: {w}x{h} is smaller than min_size {min_size}")


def _check_array(data: np.ndarray, where: str, min_size: int) -> tuple[int, int]:
    if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (1, 3, 4)):
        raise ImageError("undecodable", f"{where}: pixel array of dtype {data.dtype} shape {data.shape}")
    h, w = data.shape[:2]
    _check_size(h, w, where, min_size)
    return h, w


def _open_header(data, where: str, min_size: int) -> tuple[Image.Image, tuple[int, int], int]:
    """(lazily opened image, (height, width) after EXIF orientation, orientation) of encoded ``data``."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    orientation = im.getexif().get(_ORIENTATION, 1)
    if orientation in _TRANSPOSED:
        w, h = h, w
    _check_size(h, w, where, min_size)
    return im, (h, w), orientation


def oriented_size(data, where: str, *, min_size: int = 0) -> tuple[int, int]:
    """The (height, width) :func:`open_rgb` reports for ``data`` (encoded bytes or a uint8 array), from
    the header alone (EXIF orientation applied, no pixels decoded); raises :class:`ImageError`
    (``undecodable`` headers, ``too_small``). Truncated pixel data is not detected."""
    if isinstance(data, np.ndarray):
        return _check_array(data, where, min_size)
    try:
        return _open_header(data, where, min_size)[1]
    except ImageError:
        raise
    except Exception as e:  # PIL raises many unrelated types for bad data
        raise ImageError(failure_reason(e), f"{where}: {type(e).__name__}: {e}") from None


def open_rgb(data, where: str, *, min_size: int = 0, scale=None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original (height, width) after EXIF orientation) of encoded ``data`` or a uint8 array.

    ``scale(h, w)`` gives the largest factor by which the caller will resize the (oriented) image; JPEGs
    are then decoded at the strongest power-of-two reduction that keeps at least that many pixels (the
    returned image may be smaller than the original size: scale crop boxes by ``image.size / original``).
    """
    if isinstance(data, np.ndarray):
        h, w = _check_array(data, where, min_size)
        return _to_rgb(Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[2] == 1 else data)), (h, w)
    try:
        im, (h, w), orientation = _open_header(data, where, min_size)
        factor = scale(h, w) if scale is not None else 1.0
        if factor < 1 and im.format == "JPEG":
            need = (max(1, math.ceil(im.size[0] * factor)), max(1, math.ceil(im.size[1] * factor)))
            im.draft(im.mode, need)
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        return _to_rgb(im), (h, w)
    except ImageError:
        raise
    except Exception as e:  # PIL raises many unrelated types for bad data
        raise ImageError(failure_reason(e), f"{where}: {type(e).__name__}: {e}") from None


def open_mask(data, where: str) -> Image.Image:
    """A single-channel (``L``) mask from encoded bytes or a uint8 array; raises :class:`ImageError`."""
    try:
        im = Image.fromarray(np.asarray(data)) if isinstance(data, np.ndarray) else Image.open(io.BytesIO(data))
        im.load()
        if im.mode in ("RGBA", "LA"):
            return im.getchannel("A")
        return im.convert("L")
    except Exception as e:
        raise ImageError("undecodable", f"{where} mask: {type(e).__name__}: {e}") from None


def cover_crop_box(size: tuple[int, int], out: tuple[int, int], offset: tuple[float, float]) -> tuple:
    """Crop box (left, top, right, bottom) in ``size = (h, w)`` pixels of an ``out = (H, W)`` window
    of the image resized to cover ``out``; ``offset`` in [0, 1]^2 places the window (0.5 = centre).
    Also returns the window's top-left in resized pixels (SDXL's crop coordinates)."""
    (h, w), (oh, ow) = size, out
    s = max(oh / h, ow / w)
    rh, rw = h * s, w * s
    top, left = round((rh - oh) * offset[0]), round((rw - ow) * offset[1])
    return (left / s, top / s, (left + ow) / s, (top + oh) / s), (top, left)


def crop_resize(im: Image.Image, original: tuple[int, int], box, out: tuple[int, int], resample=Image.BICUBIC):
    """``im`` (possibly decoded at reduced scale) cropped to ``box`` (in ``original`` pixels) and resized to
    ``out = (H, W)``."""
    fx, fy = im.size[0] / original[1], im.size[1] / original[0]
    scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return im.resize((out[1], out[0]), resample, box=scaled)


def target_scale(out: tuple[int, int]):
    """The ``scale`` argument of :func:`open_rgb` for a target of size ``out = (H, W)``: the resize factor
    of the cover crop. The target is decoded at this scale whatever else is cut from the frame, so that
    its pixels depend only on the frame and ``out`` (precomputed latents reproduce them exactly)."""
    H, W = out

    def scale(h, w):
        return max(H / h, W / w)
    return scale


def open_target(data, where: str, out: tuple[int, int], *, min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`open_rgb` of a frame at the target's scale (:func:`target_scale`)."""
    return open_rgb(data, where, min_size=min_size, scale=target_scale(out))


def target_crop(im: Image.Image, original: tuple[int, int], out: tuple[int, int],
                offset: tuple[float, float] = (0.5, 0.5)) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (H, W, 3) target, top-left of the window in resized pixels) of an image from
    :func:`open_target`: resized to cover ``out = (H, W)`` and cropped at ``offset`` (0.5: centre).
    The training transform and :mod:`~customjax.data.precompute` both cut targets with it."""
    box, top_left = cover_crop_box(original, out, offset)
    return np.asarray(crop_resize(im, original, box, out)), top_left


def reference_crop_box(size: tuple[int, int], out: int, ratio: float, offset: tuple[float, float]) -> tuple:
    """Crop box (in ``size = (h, w)`` pixels) of the Eq. 11 reference: the centre square resized to
    ``out * ratio`` and an ``out`` x ``out`` window cropped at ``offset`` in [0, 1]^2."""
    h, w = size
    m = min(h, w)
    side = max(out, round(out * ratio))
    s = side / m
    x0, y0 = (w - m) / 2, (h - m) / 2
    top, left = round((side - out) * offset[0]), round((side - out) * offset[1])
    return (x0 + left / s, y0 + top / s, x0 + (left + out) / s, y0 + (top + out) / s)


NEUTRAL_FILLS = ((255, 255, 255), (128, 128, 128), (0, 0, 0))   # white, gray, black: in this order


def subject_cutout(im: Image.Image, mask: Image.Image, *, extent: float = 0.45, margin: float = 60.0):
    """The subject of a frame as an object-centric reference: the pixels outside ``mask`` (>= 128 is
    the subject) replaced by the first of :data:`NEUTRAL_FILLS` at RGB distance >= ``margin`` from
    every subject pixel (else the farthest), on a square canvas centred on the mask's box, whose
    longer side spans ``extent`` of the canvas. ``mask`` is resized to ``im`` (nearest). Returns
    (image, (side, side)), or None for an empty mask."""
    a = np.asarray(im.convert("RGB"))
    m = np.asarray(mask.resize(im.size, Image.NEAREST)) >= 128
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    colors = a[m].astype(np.float32)                                  # (n, 3) subject pixels
    dist = [float(np.sqrt(((colors - np.float32(f)) ** 2).sum(-1)).min()) for f in NEUTRAL_FILLS]
    ok = [i for i, d in enumerate(dist) if d >= margin]
    fill = NEUTRAL_FILLS[ok[0] if ok else int(np.argmax(dist))]
    side = max(int(math.ceil(max(y1 - y0, x1 - x0) / extent)), 1)
    top, left = int(round((y0 + y1 - side) / 2)), int(round((x0 + x1 - side) / 2))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    sy0, sx0 = max(top, 0), max(left, 0)                        # the canvas window inside the frame
    sy1, sx1 = min(top + side, a.shape[0]), min(left + side, a.shape[1])
    win = canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    keep = m[sy0:sy1, sx0:sx1]
    win[keep] = a[sy0:sy1, sx0:sx1][keep]
    return Image.fromarray(canvas), (side, side)
