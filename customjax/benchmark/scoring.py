"""Scoring the benchmark's images (:func:`score`, exact, from ShapeWorld's ``measure``; CLIP-T / CLIP-I).

Scores per image:
  * ``background_correct``: ``measure``'s (the background is the named colour);
  * ``position_correct``: the (first) subject was found with the right category at the named position;
  * ``others_correct``: every other named object (the extra object, or the second subject) was
    found with the right category at its named position (None when the prompt has no other object);
  * ``controllability`` = the mean of those of the three that apply (None skipped);
  * ``similarity``: ``appearance_similarity`` of the subject to its reference Subject (0 when not
    found); two subjects: the mean over both;
  * also ``category_correct`` / ``size_correct`` / ``color_correct`` of the subject, ``count_correct``,
    ``background_score``, ``mask_mean`` (mean of the final guidance masks), and ``clip_t`` (prompt)
    / ``clip_i`` (reference; two subjects: the mean) with the model folder's own ``clip/``.

Summaries: mean and normal-approximation 95% interval over cases x seeds (``summarise``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from customjax.benchmark.cases import Case
from customjax.data import shapeworld as sw
from customjax.metrics.shapeworld import measure

CONTROL_KEYS = ("background_correct", "position_correct", "others_correct")
METRICS = ("controllability", "background_correct", "position_correct", "others_correct", "similarity",
           "category_correct", "size_correct", "color_correct", "count_correct", "background_score", "mask_mean",
           "clip_t", "clip_i")
CONTROLLABILITY = ("controllability = mean over the applicable items of {background_correct; position_correct: the "
                   "subject found with the right category at the named position; others_correct: every other named "
                   "object (extra object / second subject) found with the right category at its named position}; "
                   "similarity = appearance_similarity of the subject to its reference subject (0 if not found; "
                   "two subjects: mean of both)")


def _placed_ok(rec: dict) -> bool:
    return bool(rec["found"] and rec["category_correct"] and rec["position_correct"] is not False)


def score(image: np.ndarray, case: Case) -> dict:
    """The exact scores of one image (see the module docstring)."""
    spec = case.spec
    m = measure(image, spec, reference=case.subjects[0])
    objs = m["objects"]
    sims = [m["appearance_similarity"] or 0.0]
    if len(case.subjects) == 2:  # the second subject's similarity: measure with the objects swapped
        swapped = sw.Scene(spec.background, (spec.objects[1], spec.objects[0], *spec.objects[2:]))
        sims.append(measure(image, swapped, reference=case.subjects[1])["appearance_similarity"] or 0.0)
    subject = objs[0]
    out = dict(background_correct=bool(m["background_correct"]), position_correct=_placed_ok(subject),
               others_correct=None if len(objs) == 1 else all(_placed_ok(o) for o in objs[1:]),
               similarity=float(np.mean(sims)), category_correct=bool(subject["category_correct"]),
               size_correct=subject["size_correct"], color_correct=subject["color_correct"],
               count_correct=bool(m["count_correct"]), background_score=float(m["background_score"]))
    out["controllability"] = float(np.mean([float(out[k]) for k in CONTROL_KEYS if out[k] is not None]))
    return out


def clip_scorer(cfg):
    """The model folder's own CLIP (``clip/`` + ``tokenizer/``), or None (with the reason)."""
    folder = Path(cfg.model.path) if cfg.model.path else None
    if folder is None or not (folder / "clip").is_dir():
        return None, f"no CLIP scores: {'the random pipeline' if folder is None else folder} has no clip/ folder"
    from customjax.metrics.clip_score import load_clip_scorer
    return load_clip_scorer(folder / "clip", folder / "tokenizer"), f"CLIP-T / CLIP-I with {folder / 'clip'}"


def _at(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def clip_scores(scorer, images: np.ndarray, cases: list[Case], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image CLIP-T (its prompt) and CLIP-I (its reference; the mean over two references)."""
    vs = scorer.vision.config.image_size
    t = scorer.clip_t(_at(images, vs), [c.prompt for c in cases])
    R = max(len(c.references) for c in cases)
    i = np.zeros(len(cases))
    for r in range(R):
        refs = _at(np.stack([c.reference_images(size)[min(r, len(c.references) - 1)] for c in cases]), vs)
        i += scorer.clip_i(_at(images, vs), refs) / R
    return np.asarray(t), i
