"""Sampling cases (a prompt, its target words, their reference images, seeds), read from the JSONL
files of the sample CLI and checked before anything compiles. One case a line::

    {"prompt": "a toy on the beach", "words": ["toy"], "references": ["toy.png"], "seeds": [0, 1]}

An optional ``"masks"`` (one image a word: grey level = mask value, white = 1) is a layout: each
subject's mask, fixed for the whole sampling, in place of its attention mask (the sampler runs such
cases with ``t_stop = 0``).

Used by the sample CLI (``customjax.sample``) and the training previews (``customjax.preview``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from customjax.tokenizer import word_token_positions


class CaseError(ValueError):
    """A case that cannot be sampled; the message names where it comes from (``file:line``)."""


def read_cases(path: str | os.PathLike) -> list[dict]:
    """The cases of a JSONL file (blank lines skipped), each with ``_where`` = ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: no such file")
    cases = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                case = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaseError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(case, dict):
                raise CaseError(f"{path}:{n}: not a JSON object")
            cases.append(dict(case, _where=f"{path}:{n}"))
    return cases


def _read(path, where: str, kind: str, mode: str) -> np.ndarray:
    """The image at ``path`` (or an image itself: a PIL image, or an array (H, W[, C]) of uint8 or
    floats in [0, 1]) in PIL ``mode`` as float32 in [0, 1], or a :class:`CaseError` naming ``where``
    and the ``kind`` of image (missing, unreadable, of a wrong shape or range)."""
    if isinstance(path, Image.Image):
        return np.asarray(path.convert(mode), np.float32) / 255.0
    if isinstance(path, np.ndarray) or hasattr(path, "__array__"):
        a = np.asarray(path)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise CaseError(f"{where}: {kind} image of shape {a.shape}; expected (H, W, 3) (channels last), "
                            "(H, W, 4) or (H, W)")
        if a.dtype != np.uint8:
            if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                raise CaseError(f"{where}: {kind} image of {a.dtype} outside [0, 1] (give uint8 or floats in [0, 1])")
            a = (a.astype(np.float32) * 255.0 + 0.5).astype(np.uint8)
        return _read(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a), where, kind, mode)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), np.float32) / 255.0
    except FileNotFoundError:
        raise CaseError(f"{where}: {kind} image {path} does not exist") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise CaseError(f"{where}: {kind} image {path} cannot be read ({type(e).__name__}: {e})") from None


def load_image(path, where: str) -> np.ndarray:
    """A reference image as float32 RGB (H, W, 3) in [0, 1], or a :class:`CaseError` naming ``where``."""
    return _read(path, where, "reference", "RGB")


def load_mask(path, where: str) -> np.ndarray:
    """A layout mask as float32 (H, W) in [0, 1] (its grey level), or a :class:`CaseError` naming
    ``where``: missing, unreadable or all black."""
    m = _read(path, where, "mask", "L")
    if not m.any():
        raise CaseError(f"{where}: mask image {_name(path)} is all black (an empty mask)")
    return m


def as_list(images, ndim: int = 3) -> list:
    """One image (a path, a PIL image, an array of ``ndim`` dimensions: 3 for (H, W, C) references, 2
    for (H, W) masks) as a list of one; a sequence of them (or a stacked array) as a list."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == ndim):
        return [images]
    return list(images)


def _name(image) -> str:
    """A path as given, an in-memory image as ``<array HxW>``."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return "<array {}x{}>".format(*np.asarray(image).shape[:2])


def resize_masks(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """(J, h, w) float32: each layout mask averaged over the cells of the sampler's mask grid ``hw``."""
    out = [np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.BOX), np.float32) for m in masks]
    return np.clip(np.stack(out), 0.0, 1.0)


def check_case(c: dict, tokenizer, references_mode: str, where: str, words_required: bool = True
               ) -> tuple[list[str], list[str]]:
    """(words, reference paths) of one case, or a :class:`CaseError` naming ``where``: keys
    present, every target word in the prompt, one reference per word (one for One2Many). Without
    ``words_required`` (a method without masks) the words may be absent and any number (>= 1) of
    references is taken."""
    for key in ("prompt", "references") + (("words",) if words_required else ()):
        if key not in c:
            raise CaseError(f"{where}: missing {key!r}")
    words = c.get("words") or []
    words = [words] if isinstance(words, str) else list(words)
    refs = as_list(c["references"])
    if words_required and not words:
        raise CaseError(f"{where}: no target word given")
    for w in words:
        try:
            word_token_positions(tokenizer, c["prompt"], w)
        except ValueError as e:
            raise CaseError(f"{where}: {e}") from None
    if not words_required:
        if not refs:
            raise CaseError(f"{where}: no reference image given")
        return words, refs
    want = 1 if references_mode == "one2many" else len(words)
    if len(refs) != want:
        raise CaseError(f"{where}: {len(refs)} reference(s) for {len(words)} word(s); "
                        f"{references_mode} needs {want}")
    return words, refs


def check_cases(cases: Sequence[dict], tokenizer, references_mode: str, default_seeds: Sequence[int],
                seeds_override: Sequence[int] | None = None, words_required: bool = True) -> list[dict]:
    """Checks every case (:func:`check_case`) and loads its images; returns records {prompt, words,
    references (paths), images (float [0, 1]), seeds, where, masks (layout masks (H, W) per word, or
    None)}. Seeds: ``seeds_override`` if given, else the case's own, else ``default_seeds``."""
    out = []
    for c in cases:
        where = c.get("_where", "?")
        words, refs = check_case(c, tokenizer, references_mode, where, words_required)
        images = [load_image(r, where) for r in refs]
        seeds = [int(s) for s in (seeds_override or c.get("seeds") or default_seeds)]
        masks = None
        if c.get("masks") is not None:
            paths = as_list(c["masks"], ndim=2)
            if len(paths) != len(words):
                raise CaseError(f"{where}: {len(paths)} mask(s) for {len(words)} word(s); a layout needs one per word")
            masks = [load_mask(m, where) for m in paths]
        out.append(dict(prompt=c["prompt"], words=words, references=[_name(r) for r in refs], images=images,
                        seeds=seeds, where=where,
                        masks=masks))
    return out
