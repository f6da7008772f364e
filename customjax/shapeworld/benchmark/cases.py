"""The benchmark's cases (:func:`make_cases`, a pure function of the seed and the image size).

  * single-subject: a held-out subject (``sw.heldout_subjects()``, never in training data), its
    reference (the subject alone, large, centred, unrotated, on a neutral background: white, gray or
    black, the first its colours allow) and a prompt that puts its category word (the target word)
    in a new context: another solid background colour, a position, a size and, in every second
    case, another object (a solid-coloured training subject of another category, named with its
    colour, at another position). The prompt never names the subject's appearance: that must come
    from the reference. Cases cycle through the categories; ``prompts_per_subject`` consecutive
    cases share a subject.
  * two-subject: two held-out subjects of different categories, two references, both category
    words in the prompt, at opposite positions (left / right or top / bottom).

:func:`place_masks`: each subject's named place as a mask (the ``layout`` settings' fixed masks).

The ground-truth :attr:`Case.scene` is a placed, renderable scene; :attr:`Case.spec` is what the
prompt says (plus the subjects' appearances, which ``measure`` compares with the references) and is
what the images are measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from customjax.shapeworld import world as sw

NEUTRAL = ("white", "gray", "black")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    subjects: tuple[sw.Subject, ...]      # the customized subjects: scene.objects[:len(subjects)]
    scene: sw.Scene                       # ground truth (placed); further objects are named by colour
    prompt: str
    words: tuple[str, ...]                # target words (the subjects' categories), one per subject
    references: tuple[sw.Scene, ...]      # one reference scene per subject

    @property
    def spec(self) -> sw.Scene:
        """The prompt's scene for :func:`measure`: subjects with position, size and their (unnamed)
        appearance; other objects with position and colour (their size is not named)."""
        n = len(self.subjects)
        objs = tuple(sw.Obj(o.category, o.appearance, o.position, o.size if k < n else None)
                     for k, o in enumerate(self.scene.objects))
        return sw.Scene(self.scene.background, objs)

    @property
    def described_prompt(self) -> str:
        """The prompt with the subjects' appearance named too (``"a large red and blue striped star on
        the left ..."``): the text-only way to ask for the subject (the benchmark's ``described`` setting)."""
        return case_prompt(self.scene, len(self.subjects), describe=True)

    def reference_images(self, size: int) -> np.ndarray:
        return np.stack([sw.render(r, size)[0] for r in self.references])

    def to_dict(self) -> dict:
        return dict(name=self.name, prompt=self.prompt, words=list(self.words),
                    subjects=[dict(key=s.key, phrase=sw.subject_phrase(s)) for s in self.subjects],
                    scene=sw.scene_to_dict(self.scene), references=[sw.scene_to_dict(r) for r in self.references])


def place_regions(h: int, w: int) -> np.ndarray:
    """(h, w) position names: each cell's nearest position centre (:data:`~customjax.shapeworld.world.POSITIONS`,
    as :func:`~customjax.shapeworld.metrics.position_of` places an object by its centre)."""
    names = list(sw.POSITIONS)
    centres = np.array([sw.POSITIONS[n] for n in names])                       # (P, 2) as (x, y)
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    d = (x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2
    return np.array(names)[d.argmin(-1)]


def place_masks(case: Case, h: int, w: int) -> np.ndarray:
    """(J, h, w) float: 1 on each subject's named place (:func:`place_regions`), 0 elsewhere: the masks
    of the benchmark's ``layout`` settings (a layout that a user could draw, disjoint by construction)."""
    regions = place_regions(h, w)
    return np.stack([(regions == o.position).astype(np.float32) for o in case.scene.objects[:len(case.subjects)]])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def neutral_background(subject: sw.Subject) -> sw.Background:
    """White, gray or black (the first the subject's colours allow; else the first compatible colour)."""
    for c in NEUTRAL + sw.COLORS:
        if sw.compatible(subject.appearance, sw.Background(c)):
            return sw.Background(c)
    raise ValueError(f"no background is compatible with {subject.key}")


def reference_scene(subject: sw.Subject, size: int) -> sw.Scene:
    """The subject alone, large (the middle of the large radii), centred, unrotated, on a neutral background."""
    r = 0.5 * sum(sw.SIZES["large"]) * size
    obj = sw.Obj(subject.category, subject.appearance, "center", "large", (size / 2, size / 2), r, 0.0)
    return sw.Scene(neutral_background(subject), (obj,))


def case_prompt(scene: sw.Scene, n_subjects: int, describe: bool = False) -> str:
    """:func:`~customjax.shapeworld.world.prompt` of ``scene`` with the first ``n_subjects`` objects named
    by size, category and position (their appearance only with ``describe``) and the others by (solid)
    colour, category and position: ``"a large star on the left and a red square at the top, on a blue
    background"``."""
    objs = tuple((o if describe else dataclasses.replace(o, appearance=None)) if k < n_subjects
                 else dataclasses.replace(o, appearance=sw.Appearance(o.appearance.primary), size=None)
                 for k, o in enumerate(scene.objects))
    return sw.prompt(sw.Scene(scene.background, objs))


def _single(rng, subject: sw.Subject, size: int, other: bool, name: str) -> Case | None:
    ref = reference_scene(subject, size)
    bgs = [c for c in sw.COLORS if c != ref.background.color and sw.compatible(subject.appearance, sw.Background(c))]
    bg = sw.Background(_pick(rng, bgs))
    position, size_name = _pick(rng, tuple(sw.POSITIONS)), _pick(rng, tuple(sw.SIZES))
    if sw.is_heldout_combo(subject.category, bg.color, position):
        return None
    objects = [sw.place(rng, subject, position, size_name, size)]
    if other:
        category = _pick(rng, [c for c in sw.CATEGORIES if c != subject.category])
        colors = [c for c in sw.COLORS if c not in subject.appearance.colors and c != bg.color
                  and sw.compatible(sw.Appearance(c), bg)]
        if not colors:
            return None
        pos2 = _pick(rng, [p for p in sw.POSITIONS if p != position])
        o = sw.place(rng, sw.Subject(category, sw.Appearance(_pick(rng, colors))), pos2, "small", size)
        if not sw.fits(o, objects, size) or sw.is_heldout_combo(category, bg.color, pos2):
            return None
        objects.append(o)
    scene = sw.Scene(bg, tuple(objects))
    return Case(name, (subject,), scene, case_prompt(scene, 1), (subject.category,), (ref,))


def _pair(rng, a: sw.Subject, b: sw.Subject, size: int, name: str) -> Case | None:
    refs = (reference_scene(a, size), reference_scene(b, size))
    bgs = [c for c in sw.COLORS if c not in {r.background.color for r in refs}
           and all(sw.compatible(s.appearance, sw.Background(c)) for s in (a, b))]
    if not bgs:
        return None
    bg = sw.Background(_pick(rng, bgs))
    positions = _pick(rng, (("left", "right"), ("top", "bottom")))
    if rng.random() < 0.5:
        positions = positions[::-1]
    sizes = [_pick(rng, tuple(sw.SIZES)) for _ in range(2)]
    for attempt in range(2):  # the sizes drawn, then both small
        objs = [sw.place(rng, s, p, z, size) for s, p, z in zip((a, b), positions, sizes)]
        if sw.fits(objs[1], objs[:1], size):
            break
        sizes = ["small", "small"]
    else:
        return None
    if any(sw.is_heldout_combo(o.category, bg.color, o.position) for o in objs):
        return None
    scene = sw.Scene(bg, tuple(objs))
    return Case(name, (a, b), scene, case_prompt(scene, 2), (a.category, b.category), refs)


def make_cases(n: int, seed: int = 0, size: int = 64, *, prompts_per_subject: int = 2,
               pairs: int = 0) -> tuple[list[Case], list[Case]]:
    """(``n`` single-subject cases, ``pairs`` two-subject cases) for images of ``size`` pixels,
    deterministic in ``seed`` (see the module docstring)."""
    rng = np.random.default_rng([seed, 6])
    pool = {c: [sw.heldout_subjects()[i] for i in rng.permutation(len(sw.heldout_subjects()))
                if sw.heldout_subjects()[i].category == c] for c in sw.CATEGORIES}
    start = int(rng.integers(len(sw.CATEGORIES)))

    def take(category: str) -> sw.Subject:
        return pool[category].pop()

    single: list[Case] = []
    subject = None
    for i in range(n):
        if i % prompts_per_subject == 0:
            subject = take(sw.CATEGORIES[(start + i // prompts_per_subject) % len(sw.CATEGORIES)])
        crng = np.random.default_rng([seed, 6, 0, i])
        case = None
        while case is None:
            case = _single(crng, subject, size, other=i % 2 == 1, name=f"s{i:03d}")
        single.append(case)
    two: list[Case] = []
    for k in range(pairs):
        crng = np.random.default_rng([seed, 6, 1, k])
        ca = sw.CATEGORIES[(start + k) % len(sw.CATEGORIES)]
        cb = sw.CATEGORIES[(start + k + 1 + int(crng.integers(len(sw.CATEGORIES) - 1))) % len(sw.CATEGORIES)]
        case = None
        while case is None:
            case = _pair(crng, take(ca), take(cb), size, name=f"p{k:03d}")
        two.append(case)
    return single, two


def write_sample_cases(out_dir, n: int = 4, pairs: int = 1, seed: int = 0, size: int = 64,
                       seeds: Sequence[int] = (0, 1)) -> list[dict]:
    """Writes cases as the sample CLI's input: ``out_dir/cases.jsonl`` (prompt, words, references,
    seeds) and the reference PNGs beside it (paths relative to the repository root when ``out_dir``
    is); each two-subject case a second time with a drawn layout (``masks``: each subject's named place,
    :func:`place_masks`, as PNGs). ``python -c "from customjax.shapeworld.benchmark.cases import write_sample_cases
    as w; w('examples/shapeworld')"`` wrote ``examples/shapeworld/``."""
    import json
    import pathlib

    from PIL import Image

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    single, two = make_cases(n, seed, size, pairs=pairs)
    lines = []
    for case in single + two:
        refs = []
        for j, ref in enumerate(case.references):
            path = out / f"{case.name}_ref{j}.png"
            Image.fromarray(sw.render(ref, size)[0]).save(path)
            refs.append(str(path))
        line = {"prompt": case.prompt, "words": list(case.words), "references": refs, "seeds": list(seeds)}
        lines.append(line)
        if len(case.subjects) > 1:
            masks = []
            for j, m in enumerate(place_masks(case, size, size)):
                path = out / f"{case.name}_mask{j}.png"
                Image.fromarray((m * 255).astype(np.uint8)).save(path)
                masks.append(str(path))
            lines.append(dict(line, masks=masks))
    (out / "cases.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines
