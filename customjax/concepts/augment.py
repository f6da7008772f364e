"""CLIF's over-segmented training data (seed 002, Sec. 4.1 and Fig. 4), curated from a few masked
images per concept, deterministic in a seed:

  * ``concept``: each image as it is, a caption from ``concept.templates`` (both stages);
  * ``global`` (G-Aug, identity preservation): the segmented concept, scaled by a random factor, pasted
    at a random place into a context image (a common concept the base model generated or the user
    supplied), caption "<concept> with <context>" (``curation.global_templates``); stage 1;
  * ``region`` (R-Aug, attribute binding): a captioned part of the concept (``regions/`` masks, e.g. an
    object's two colours) cut out and pasted at a random scale and place on the image's own background
    colour, caption "the <region> of <concept>" (``curation.region_templates``); stage 1;
  * ``mix`` (M-Aug, concept attendance): two concepts side by side, each at a random scale in its half,
    on one of their backgrounds, caption "<left> on the left and <right> on the right"
    (``curation.mix_templates``); stage 2.

Where the paper is silent: the scale range (``curation.scale``, the fraction of the canvas side that the
concept's longer side spans, at most half of it in M-Aug), regions pasted on a plain background rather than
into contexts, and the background of an image taken as the median colour of its border pixels outside
the mask. The set is written as one ArrayRecord shard (:mod:`customjax.data.records`: ``text_image``
records whose ``names[0]`` is the kind and ``object_id`` the concepts it shows).
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

KINDS = ("concept", "global", "region", "mix")
CONTRASTIVE = ("concept", "global", "region")      # stage 1: the text encoder (Eq. 5)
DIFFUSION = ("concept", "mix")                     # stage 2: the UNet's LoRA


@dataclasses.dataclass(frozen=True)
class Curated:
    kind: str                      # one of KINDS
    caption: str
    image: np.ndarray              # (S, S, 3) float32 in [0, 1]
    concepts: tuple[str, ...]      # the concepts it shows (folder names)


def background_color(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3,): the median colour of the image's border pixels outside the concept's mask."""
    border = np.zeros(mask.shape, bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    pick = border & (mask < 0.5)
    px = image[pick] if pick.any() else image[border]
    return np.median(px, 0).astype(np.float32)


def cutout(image: np.ndarray, mask: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (h, w, 3), alpha (h, w)): the masked pixels cropped to their box, the box's longer side
    resized to ``side`` px."""
    ys, xs = np.nonzero(mask >= 0.5)
    if not len(ys):
        raise ValueError("cutout of an empty mask")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    f = side / max(h, w)
    size = (max(int(round(w * f)), 1), max(int(round(h * f)), 1))
    rgb = Image.fromarray((image[y0:y1, x0:x1] * 255).round().astype(np.uint8)).resize(size, Image.BICUBIC)
    a = Image.fromarray((mask[y0:y1, x0:x1] * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
    return np.asarray(rgb, np.float32) / 255.0, np.asarray(a, np.float32) / 255.0


def paste(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int) -> np.ndarray:
    """``canvas`` with ``rgb`` alpha-composited at (x, y), its top-left corner."""
    out = canvas.copy()
    h, w = alpha.shape
    a = alpha[..., None]
    out[y:y + h, x:x + w] = a * rgb + (1 - a) * out[y:y + h, x:x + w]
    return out


def _place(rng, canvas, rgb, alpha, x_range: tuple[int, int]) -> np.ndarray:
    S = canvas.shape[0]
    h, w = alpha.shape
    x = int(rng.integers(x_range[0], max(x_range[1] - w, x_range[0]) + 1))
    y = int(rng.integers(0, max(S - h, 0) + 1))
    return paste(canvas, rgb, alpha, x, y)


def check_masks(concepts: Sequence) -> None:
    """Every concept has its images' masks, or a ValueError naming the first that has none."""
    for k in concepts:
        if k.masks is None:
            raise ValueError(f"concept {k.name}: CLIF's augmentation needs each image's mask (masks/<image>.png in "
                             f"the concept folder; the paper segments with SAM)")


def curate(concepts: Sequence, phrases: Sequence[str], contexts: Sequence[tuple[str, np.ndarray]], cfg,
           templates: Sequence[str], seed: int) -> list[Curated]:
    """The curated set of ``concepts`` (:class:`~customjax.concepts.data.Concept` with masks) named by
    ``phrases`` in captions; ``contexts``: (caption, image (S, S, 3)) for G-Aug; ``cfg``:
    ``config.curation`` (``global_per_view``, ``region_per_view``, ``mix_per_pair``, ``scale``, the
    templates); ``templates``: the plain captions' (``{}`` = the phrase). Deterministic in ``seed``."""
    check_masks(concepts)
    lo, hi = (float(v) for v in cfg.scale)
    S = concepts[0].images.shape[1]
    out: list[Curated] = []

    def rng(*key):
        return np.random.default_rng([int(seed), 0xC11F, *key])

    for c, k in enumerate(concepts):
        for v, (im, m) in enumerate(zip(k.images, k.masks)):
            r = rng(0, c, v)
            out.append(Curated("concept", templates[int(r.integers(len(templates)))].format(phrases[c]), im, (k.name,)))
            for g in range(int(cfg.global_per_view) if contexts else 0):
                r = rng(1, c, v, g)
                cap, ctx = contexts[int(r.integers(len(contexts)))]
                rgb, a = cutout(im, m, r.uniform(lo, hi) * S)
                t = cfg.global_templates[int(r.integers(len(cfg.global_templates)))]
                out.append(Curated("global", t.format(concept=phrases[c], context=cap), _place(r, ctx, rgb, a, (0, S)),
                                   (k.name,)))
            parts = [(cap, pm * (m >= 0.5)) for cap, pm in (k.regions[v] if k.regions else ()) if (pm * (m >= 0.5)).max() >= 0.5]
            for g in range(int(cfg.region_per_view) if parts else 0):
                r = rng(2, c, v, g)
                cap, pm = parts[int(r.integers(len(parts)))]
                rgb, a = cutout(im, pm, r.uniform(lo, hi) * S)
                canvas = np.broadcast_to(background_color(im, m), im.shape).copy()
                t = cfg.region_templates[int(r.integers(len(cfg.region_templates)))]
                out.append(Curated("region", t.format(region=cap, concept=phrases[c]), _place(r, canvas, rgb, a, (0, S)),
                                   (k.name,)))
    for i, a in enumerate(concepts):
        for j, b in enumerate(concepts):
            if i == j:
                continue
            for g in range(int(cfg.mix_per_pair)):
                r = rng(3, i, j, g)
                va, vb = int(r.integers(len(a.images))), int(r.integers(len(b.images)))
                home = (a, va) if r.random() < 0.5 else (b, vb)
                canvas = np.broadcast_to(background_color(home[0].images[home[1]], home[0].masks[home[1]]),
                                         a.images[va].shape).copy()
                la = cutout(a.images[va], a.masks[va], min(r.uniform(lo, hi), 0.5) * S)
                lb = cutout(b.images[vb], b.masks[vb], min(r.uniform(lo, hi), 0.5) * S)
                canvas = _place(r, canvas, *la, (0, S // 2))
                canvas = _place(r, canvas, *lb, (S // 2, S))
                t = cfg.mix_templates[int(r.integers(len(cfg.mix_templates)))]
                out.append(Curated("mix", t.format(left=phrases[i], right=phrases[j]), canvas, (a.name, b.name)))
    return out


def counts(items: Sequence[Curated]) -> dict:
    """{kind: number of examples} over :data:`KINDS` (zeros included)."""
    n = Counter(x.kind for x in items)
    return {k: int(n[k]) for k in KINDS}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_curated(items: Sequence[Curated], out_dir: str | Path) -> list[str]:
    """``items`` as one ArrayRecord shard ``out_dir/curated-00000-of-00001.array_record`` (PNG frames);
    returns the shard paths."""
    from customjax.data.records import Example, ShardedWriter

    with ShardedWriter(out_dir, "curated", 1) as w:
        for i, x in enumerate(items):
            w.write(Example(kind="text_image", caption=x.caption, frames=(_png(x.image),), names=(x.kind,),
                            object_id=",".join(x.concepts), source=f"clif:{x.kind}:{i}"))
        return list(w.paths)


def read_curated(out_dir: str | Path) -> list[Curated]:
    """The items of :func:`write_curated`'s shards (images as stored: 8-bit)."""
    from customjax.data.records import find_shards, read_shard

    items = []
    for path in find_shards(out_dir):
        for ex in read_shard(path):
            kind = ex.names[0] if ex.names else ""
            if kind not in KINDS:
                raise ValueError(f"{ex.source}: kind {kind!r} is not a CLIF augmentation ({KINDS})")
            img = np.asarray(Image.open(io.BytesIO(ex.frames[0])).convert("RGB"), np.float32) / 255.0
            items.append(Curated(kind, ex.caption, img, tuple(ex.object_id.split(","))))
    return items
