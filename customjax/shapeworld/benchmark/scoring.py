"""Scoring the benchmark's images (:func:`score`, exact, from ShapeWorld's ``measure``; CLIP-T / CLIP-I).

Scores per image:
  * ``background_correct``: ``measure``'s (the background is the named colour);
  * ``position_correct``: the (first) subject was found with the right category at the named position;
  * ``placed_any``: the subject's object was found at the named position, whatever its shape (layout
    control apart from drawing the category; not part of controllability);
  * ``others_correct``: every other named object (the extra object, or the second subject) was
    found with the right category at its named position (None when the prompt has no other object);
  * ``controllability`` = the mean of those of the three that apply (None skipped);
  * ``similarity``: ``measure``'s similarity of the subject to its reference Subject (0 when not
    found); two subjects: the mean over both (one ``measure`` call, a reference per subject);
  * also ``category_correct`` / ``size_correct`` / ``color_correct`` of the subject, ``count_correct``,
    ``background_score``, ``mask_mean`` (mean of the final guidance masks), and ``clip_t`` (prompt)
    / ``clip_i`` (reference; two subjects: the mean) with the model folder's own ``clip/``;
  * settings with masks of their own (guided or ``layout``; :func:`mask_scores`): ``mask_on_place``,
    the share of each subject's final mask that lies in its named place (the region of the image
    nearest to that position's centre; mean over subjects), and, with two subjects, ``mask_overlap``,
    the share the two masks have in common (sum of the pointwise minimum over the smaller mask's sum;
    0 for disjoint masks).

Summaries: mean and 95% interval over cases x seeds (``summarise``: Wilson for booleans, the normal
approximation clipped to [0, 1] for the scores in :data:`UNIT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from customjax.shapeworld.benchmark.cases import Case, place_masks
from customjax.shapeworld.metrics import measure

CONTROL_KEYS = ("background_correct", "position_correct", "others_correct")
METRICS = ("controllability", "background_correct", "position_correct", "placed_any", "others_correct", "similarity",
           "category_correct", "size_correct", "color_correct", "count_correct", "background_score", "mask_mean",
           "mask_on_place", "mask_overlap", "clip_t", "clip_i")
# non-boolean scores in [0, 1]
UNIT = ("controllability", "similarity", "background_score", "mask_mean", "mask_on_place", "mask_overlap")
CONTROLLABILITY = ("controllability = mean over the applicable items of {background_correct; position_correct: the "
                   "subject found with the right category at the named position; others_correct: every other named "
                   "object (extra object / second subject) found with the right category at its named position}; "
                   "similarity = appearance similarity of the subject to its reference subject (0 if not found; "
                   "two subjects: mean of both)")


def _placed_ok(rec: dict) -> bool:
    return bool(rec["found"] and rec["category_correct"] and rec["position_correct"] is not False)


def score(image: np.ndarray, case: Case) -> dict:
    """The exact scores of one image (see the module docstring): one :func:`measure` call with a
    reference for every subject."""
    m = measure(image, case.spec, references=case.subjects)
    objs = m["objects"]
    subject = objs[0]
    out = dict(background_correct=bool(m["background_correct"]), position_correct=_placed_ok(subject),
               placed_any=bool(subject["found"] and subject["position_correct"] is not False),
               others_correct=None if len(objs) == 1 else all(_placed_ok(o) for o in objs[1:]),
               similarity=float(np.mean([o["similarity"] for o in objs[:len(case.subjects)]])),
               category_correct=bool(subject["category_correct"]),
               size_correct=subject["size_correct"], color_correct=subject["color_correct"],
               count_correct=bool(m["count_correct"]), background_score=float(m["background_score"]))
    out["controllability"] = float(np.mean([float(out[k]) for k in CONTROL_KEYS if out[k] is not None]))
    return out


def mask_scores(masks: np.ndarray, case: Case) -> dict:
    """Where the final guidance masks (J, h, w) of one image lie: ``mask_on_place`` and, for two
    subjects, ``mask_overlap`` (see the module docstring)."""
    masks = np.asarray(masks, np.float64)
    if masks.ndim != 3 or masks.shape[0] != len(case.subjects):
        raise ValueError(f"case {case.name}: masks of shape {masks.shape}, expected ({len(case.subjects)}, h, w)")
    mass = np.maximum(masks.sum((1, 2)), 1e-12)
    out = dict(mask_on_place=float(np.mean((masks * place_masks(case, *masks.shape[1:])).sum((1, 2)) / mass)))
    if len(masks) == 2:
        out["mask_overlap"] = float(np.minimum(masks[0], masks[1]).sum() / mass.min())
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


def reference_embeddings(scorer, case: Case, size: int) -> np.ndarray:
    """(R, D): the unit CLIP image embeddings of the case's R references (once per case)."""
    return np.asarray(scorer.embed_images(_at(case.reference_images(size), scorer.image_size)))


def clip_scores(scorer, images: np.ndarray, prompts: Sequence[str],
                refs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per image CLIP-T (cosine to its prompt) and CLIP-I (mean cosine to its references ``refs[i]``,
    (R, D) unit embeddings from :func:`reference_embeddings`); each image and prompt is embedded once."""
    img = np.asarray(scorer.embed_images(_at(images, scorer.image_size)))
    txt = np.asarray(scorer.embed_text(list(prompts)))
    t = (img * txt).sum(-1)
    i = np.array([float(np.mean(r @ e)) for e, r in zip(img, refs)])
    return t, i
