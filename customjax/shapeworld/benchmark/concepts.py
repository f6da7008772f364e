"""ShapeWorld concept folders for per-concept fine-tuning (``python -m customjax.finetune``): the
held-out subjects of the benchmark's single-subject cases (:func:`~customjax.shapeworld.benchmark.cases.make_cases`,
never in the base's training data), each seen in ``views`` scenes: the subject alone at a drawn
position, size and rotation on a drawn solid background (compatible with its colours; no held-out
(category, background, position) combination), with its exact mask and its category as the class word."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from customjax.shapeworld import world as sw
from customjax.shapeworld.benchmark.cases import Case, make_cases


def view_scenes(subject: sw.Subject, views: int, size: int, seed: int) -> list[sw.Scene]:
    """The ``views`` placed scenes of ``subject``'s concept folder, deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 9, *map(ord, subject.key)])
    out = []
    while len(out) < views:
        bg = sw.Background(str(rng.choice([c for c in sw.COLORS if sw.compatible(subject.appearance, sw.Background(c))])))
        position, size_name = str(rng.choice(list(sw.POSITIONS))), str(rng.choice(list(sw.SIZES)))
        if sw.is_heldout_combo(subject.category, bg.color, position):
            continue
        out.append(sw.Scene(bg, (sw.place(rng, subject, position, size_name, size),)))
    return out


def concept_views(subject: sw.Subject, views: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``views`` (image uint8 (size, size, 3), mask bool (size, size)) of ``subject``, deterministic in ``seed``."""
    out = []
    for scene in view_scenes(subject, views, size, seed):
        image, masks = sw.render(scene, size)
        out.append((image, masks[0]))
    return out


def concept_cases(n: int, seed: int = 0, size: int = 64, prompts_per_subject: int = 2) -> tuple[list[Case], list[sw.Subject]]:
    """(the benchmark's ``n`` single-subject cases, their distinct subjects in order)."""
    cases, _ = make_cases(n, seed, size, prompts_per_subject=prompts_per_subject)
    subjects = list(dict.fromkeys(c.subjects[0] for c in cases))
    return cases, subjects


def concept_name(subject: sw.Subject) -> str:
    return subject.key.replace("|", "-")


def color_regions(image: np.ndarray, mask: np.ndarray, appearance: sw.Appearance) -> dict[str, np.ndarray]:
    """{colour word: bool mask}: the object's pixels nearest to each of its two named colours (none for a
    solid subject): exact regions with captions, CLIF's R-Aug."""
    if len(appearance.colors) < 2:
        return {}
    pal = np.array([sw.PALETTE[c] for c in appearance.colors], np.float32)
    d = ((image[..., None, :].astype(np.float32) - pal) ** 2).sum(-1)
    nearest = np.argmin(d, -1)
    return {c: mask & (nearest == i) for i, c in enumerate(appearance.colors) if (mask & (nearest == i)).any()}


def write_concepts(out: str | Path, subjects: list[sw.Subject], views: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """One concept folder per subject under ``out`` (``<key>/NN.png``, ``masks/NN.png``, ``concept.json``,
    and for two-colour subjects ``regions/NN/<colour>.png``: :func:`color_regions`)."""
    folders = []
    for s in subjects:
        d = Path(out) / concept_name(s)
        (d / "masks").mkdir(parents=True, exist_ok=True)
        for i, (image, mask) in enumerate(concept_views(s, views, size, seed)):
            Image.fromarray(image).save(d / f"{i:02d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(d / "masks" / f"{i:02d}.png")
            for color, m in color_regions(image, mask, s.appearance).items():
                (d / "regions" / f"{i:02d}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(m.astype(np.uint8) * 255).save(d / "regions" / f"{i:02d}" / f"{color}.png")
        (d / "concept.json").write_text(json.dumps({"class": s.category}) + "\n")
        folders.append(d)
    return folders
