"""ShapeWorld: a procedural world of patterned shapes with exact ground truth.

A :class:`Scene` is a named background and 1-3 non-overlapping objects; an object is a *subject*
(category + :class:`Appearance`: primary / secondary colour, pattern, pattern angle) placed at a named
position (region), size and rotation. :func:`render` draws it without anti-aliasing, so the per-object
masks are exactly the pixels of the object's colours and the background pixels are exactly the
background colours. Everything is a pure function of a numpy ``Generator``.

Held-out splits (stable hashes, independent of the seed): ~10% of the patterned subjects (:func:`is_heldout_subject`)
and ~10% of (category, background colour, position) combinations (:func:`is_heldout_combo`) never occur
in ``split="train"`` data; :func:`eval_scenes` builds base-model evaluation scenes from the held-out
combinations and :func:`heldout_subjects` lists the subjects for customization benchmarks.

Multiview records show one subject in several contexts (background, position, size, rotation,
optional distractors) with the subject's mask per frame; their caption is the subject's category
alone, "a star" (:func:`subject_caption`): true of every frame (the loader pairs it with a random
target frame), and, as with MVImageNet's class labels in RealCustom++, the appearance is left to the
reference, so an adapter trained on them must take it from there (a caption naming the colours and
pattern, :func:`subject_phrase`, makes the reference redundant and the adapter learns nothing).

    python -m customjax.shapeworld.world OUT_DIR --num_text_image 10000 --num_multiview 2000 --frames 4 \
        --size 64 --seed 0 --shards 1

writes ``OUT_DIR/text_image/`` and ``OUT_DIR/multiview/`` (ArrayRecord shards + ``scenes.jsonl``; point
``config.data.text_image`` / ``config.data.multiview`` at these folders), ``OUT_DIR/eval_prompts.jsonl``
and ``OUT_DIR/heldout_subjects.jsonl``. A horizontal flip contradicts "left" / "right" in captions and
reverses horizontal gradients, so train on ShapeWorld with ``data.hflip=False``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import pathlib

import numpy as np
from PIL import Image

from customjax.data.convert import write_shards
from customjax.data.records import Example

# ---------------------------------------------------------------------------------------------------------
# Vocabulary.

PALETTE = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (245, 220, 30),
    "purple": (130, 40, 170), "orange": (245, 135, 20), "white": (245, 245, 245), "black": (15, 15, 15),
    "pink": (250, 140, 190), "cyan": (30, 210, 220), "brown": (120, 70, 30), "gray": (128, 128, 128),
}
COLORS = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], np.float32)
CATEGORIES = ("circle", "square", "triangle", "star", "ring", "cross", "heart")
PATTERNS = ("solid", "stripes", "dots", "checker", "gradient")
PATTERN_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)
ANGLES = (0, 90)      # stripes / gradient direction in object coordinates (degrees)
ANGLED = ("stripes", "gradient")
PATTERN_WORDS = {"stripes": "striped", "dots": "dotted", "checker": "checkered", "gradient": "gradient"}
BACKGROUND_PATTERNS = ("solid", "checkered", "striped")
BACKGROUND_WEIGHTS = (0.9, 0.05, 0.05)
# Region centres as fractions of the image side (x, y); an object belongs to its nearest centre.
POSITIONS = {"center": (0.5, 0.5), "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
             "bottom": (0.5, 0.78)}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
SIZES = {"small": (0.11, 0.14), "large": (0.20, 0.25)}  # radius / image side
SIZE_THRESHOLD = 0.17                                    # radius / side between small and large
NUM_OBJECTS_WEIGHTS = (0.5, 0.3, 0.2)
ROTATION = 15.0        # rotations are uniform in [-ROTATION, ROTATION] degrees (shapes stay upright)
JITTER = 0.06          # position jitter around the region centre (fraction of the side)
EXTENT = 1.1           # every shape lies within EXTENT * radius of its centre
GRADIENT_LEVELS = 5    # gradients are quantised to this many colours
BG_MARGIN = 60.0       # RGB distance every object colour keeps from the background colour(s)
HELDOUT_FRACTION = 0.1
PATTERN_PERIOD = {"stripes": 0.8, "dots": 0.8, "checker": 1.1}  # in units of the object radius


@dataclasses.dataclass(frozen=True)
class Appearance:
    """What makes a subject unique; ``secondary`` is None for solid, ``angle`` only for stripes / gradient.
    In prompt specs (metrics) ``pattern=None`` / ``secondary=None`` mean "not named"."""

    primary: str
    secondary: str | None = None
    pattern: str | None = "solid"
    angle: int = 0

    @property
    def colors(self) -> tuple[str, ...]:
        """The named colours: ``(primary,)`` or ``(primary, secondary)``."""
        return tuple(c for c in (self.primary, self.secondary) if c)


@dataclasses.dataclass(frozen=True)
class Subject:
    category: str
    appearance: Appearance

    @property
    def key(self) -> str:
        a = self.appearance
        return f"{self.category}|{a.primary}|{a.secondary}|{a.pattern}|{a.angle}"


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object; for prompt specs (metrics) every field but ``category`` may be None."""

    category: str
    appearance: Appearance | None = None
    position: str | None = None
    size: str | None = None
    center: tuple[float, float] | None = None  # (x, y) pixels
    radius: float | None = None                # pixels
    rotation: float | None = None              # degrees

    @property
    def subject(self) -> Subject:
        return Subject(self.category, self.appearance)


@dataclasses.dataclass(frozen=True)
class Background:
    color: str
    color2: str | None = None
    pattern: str = "solid"  # solid | checkered | striped

    @property
    def colors(self) -> tuple[str, ...]:
        return (self.color,) if self.color2 is None else (self.color, self.color2)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...]


def scene_to_dict(scene: Scene) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    objs = tuple(Obj(**{**o, "appearance": o["appearance"] and Appearance(**o["appearance"]),
                        "center": o["center"] and tuple(o["center"])}) for o in d["objects"])
    return Scene(Background(**d["background"]), objs)


# ---------------------------------------------------------------------------------------------------------
# Shapes and patterns in object coordinates (u right, v down, units of the radius).


def _polygon(u, v, n):
    inside = np.ones(u.shape, bool)
    for k in range(n):
        a = math.radians(-90 + 180 / n + 360 * k / n)
        inside &= u * math.cos(a) + v * math.sin(a) <= math.cos(math.pi / n)
    return inside


def _star(u, v, inner=0.45):
    rho = np.hypot(u, v)
    alpha = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * math.pi / 5)
    beta = np.abs(alpha - math.pi / 5)
    x, y = rho * np.cos(beta), rho * np.sin(beta)
    ex, ey = math.cos(math.pi / 5) - inner, math.sin(math.pi / 5)
    return ex * y - ey * (x - inner) >= 0


def _heart(u, v):
    x, y = 1.25 * u, -1.25 * v + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


SHAPES = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.75,
    "triangle": lambda u, v: _polygon(u, v, 3),
    "star": _star,
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "heart": _heart,
}


def pattern_level(appearance: Appearance, u, v) -> np.ndarray:
    """Per pixel mixing level in [0, 1] at object coordinates ``u, v`` (units of the radius): 0 = primary,
    1 = secondary, gradients use :data:`GRADIENT_LEVELS` levels. Patterns scale and rotate with the object."""
    p = appearance.pattern
    if p == "solid":
        return np.zeros(u.shape, np.float32)
    a = math.radians(appearance.angle)
    t = u * math.cos(a) + v * math.sin(a)
    if p == "gradient":
        n = GRADIENT_LEVELS
        return (np.minimum(np.floor(np.clip((t + 0.7) / 1.4, 0, 1) * n), n - 1) / (n - 1)).astype(np.float32)
    k = 1 / PATTERN_PERIOD[p]
    if p == "stripes":
        return (np.floor(2 * k * t + 0.5) % 2).astype(np.float32)
    if p == "dots":
        x, y = k * u, k * v
        return (np.hypot(x - np.round(x), y - np.round(y)) <= 0.28).astype(np.float32)
    if p == "checker":
        return ((np.floor(2 * k * u) + np.floor(2 * k * v)) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {p!r}")


def appearance_colors(appearance: Appearance) -> np.ndarray:
    """(N, 3) uint8: every colour an object of this appearance can have."""
    p = np.array(PALETTE[appearance.primary], np.float32)
    if appearance.pattern == "solid":
        return p[None].astype(np.uint8)
    s = np.array(PALETTE[appearance.secondary], np.float32)
    levels = np.linspace(0, 1, GRADIENT_LEVELS) if appearance.pattern == "gradient" else np.array([0.0, 1.0])
    return np.round(p + levels[:, None] * (s - p)).astype(np.uint8)


def nearest_color(rgb) -> np.ndarray:
    """Index into :data:`COLORS` of the nearest palette colour of each RGB value (..., 3)."""
    rgb = np.asarray(rgb, np.float32)
    d = ((rgb[..., None, :] - PALETTE_RGB) ** 2).sum(-1)
    return np.argmin(d, -1)


def background_distance(rgb, background: Background) -> np.ndarray:
    """RGB distance of each colour (..., 3) to the background's colour set (the segment between two tones)."""
    rgb = np.asarray(rgb, np.float32)
    a = np.array(PALETTE[background.color], np.float32)
    if background.color2 is None:
        return np.sqrt(((rgb - a) ** 2).sum(-1))
    b = np.array(PALETTE[background.color2], np.float32)
    t = np.clip(((rgb - a) @ (b - a)) / float((b - a) @ (b - a)), 0, 1)
    return np.sqrt(((rgb - (a + t[..., None] * (b - a))) ** 2).sum(-1))


@functools.lru_cache(maxsize=None)
def compatible(appearance: Appearance, background: Background) -> bool:
    """True when no colour of ``appearance`` can be confused with the background (exact segmentation)."""
    cols = appearance_colors(appearance)
    bg = {COLORS.index(c) for c in background.colors}
    return bool((background_distance(cols, background) >= BG_MARGIN).all()
                and not (set(nearest_color(cols).tolist()) & bg))


# ---------------------------------------------------------------------------------------------------------
# Held-out splits.


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0 ** 64


def is_heldout_subject(subject: Subject) -> bool:
    """~10% of the patterned subjects (solid ones are too basic to hold out)."""
    return subject.appearance.pattern != "solid" and _hash_fraction("subject|" + subject.key) < HELDOUT_FRACTION


def is_heldout_combo(category: str, background_color: str, position: str) -> bool:
    return _hash_fraction(f"combo|{category}|{background_color}|{position}") < HELDOUT_FRACTION


def all_appearances() -> list[Appearance]:
    out = [Appearance(c) for c in COLORS]
    for p in PATTERNS[1:]:
        for c1, c2 in itertools.permutations(COLORS, 2):
            out += [Appearance(c1, c2, p, a) for a in (ANGLES if p in ANGLED else (0,))]
    return out


@functools.lru_cache(maxsize=None)
def heldout_subjects() -> tuple[Subject, ...]:
    """All held-out subjects (deterministic order)."""
    return tuple(s for c in CATEGORIES for a in all_appearances() if is_heldout_subject(s := Subject(c, a)))


@functools.lru_cache(maxsize=None)
def heldout_combos() -> tuple[tuple[str, str, str], ...]:
    """All held-out (category, background colour, position) combinations."""
    return tuple(t for t in itertools.product(CATEGORIES, COLORS, POSITIONS) if is_heldout_combo(*t))


def _allowed(obj: Obj, background: Background, split: str) -> bool:
    """Whether ``obj`` on ``background`` may appear in ``split`` (``train`` excludes every held-out part)."""
    if split != "train":
        return True
    return not is_heldout_subject(obj.subject) and not any(
        is_heldout_combo(obj.category, c, obj.position) for c in background.colors)


# ---------------------------------------------------------------------------------------------------------
# Sampling.


def _choice(rng, items, p=None):
    """``items[i]`` with ``i`` uniform (or with probabilities ``p``); one uniform draw."""
    u = rng.random()
    if p is None:
        return items[min(int(u * len(items)), len(items) - 1)]
    return items[min(bisect.bisect(list(itertools.accumulate(p)), u * sum(p)), len(items) - 1)]


def sample_appearance(rng, patterns=PATTERNS) -> Appearance:
    pattern = _choice(rng, tuple(patterns), [PATTERN_WEIGHTS[PATTERNS.index(p)] for p in patterns])
    primary = _choice(rng, COLORS)
    if pattern == "solid":
        return Appearance(primary)
    secondary = _choice(rng, tuple(c for c in COLORS if c != primary))
    return Appearance(primary, secondary, pattern, _choice(rng, ANGLES) if pattern in ANGLED else 0)


def sample_subject(rng, split: str = "train", patterns=PATTERNS, categories=CATEGORIES) -> Subject:
    """A random subject: ``train`` excludes held-out subjects, ``heldout`` draws only held-out ones."""
    if split == "heldout":
        return _choice(rng, [s for s in heldout_subjects() if s.category in categories
                             and s.appearance.pattern in patterns])
    while True:
        s = Subject(_choice(rng, tuple(categories)), sample_appearance(rng, patterns))
        if not (split == "train" and is_heldout_subject(s)):
            return s


def sample_background(rng, solid_only: bool = False) -> Background:
    pattern = "solid" if solid_only else _choice(rng, BACKGROUND_PATTERNS, BACKGROUND_WEIGHTS)
    color = _choice(rng, COLORS)
    if pattern == "solid":
        return Background(color)
    return Background(color, _choice(rng, tuple(c for c in COLORS if c != color)), pattern)


def place(rng, subject: Subject, position: str, size_name: str, size: int) -> Obj:
    """``subject`` at a jittered point of region ``position`` with a radius of size class ``size_name``."""
    lo_r, hi_r = SIZES[size_name]
    u = rng.random(4).tolist()
    radius = (lo_r + (hi_r - lo_r) * u[0]) * size
    lo, hi = EXTENT * radius + 1, size - EXTENT * radius - 1
    center = tuple(min(max((c + JITTER * (2 * j - 1)) * size, lo), hi) for c, j in zip(POSITIONS[position], u[1:3]))
    return Obj(subject.category, subject.appearance, position, size_name, center, radius, ROTATION * (2 * u[3] - 1))


def fits(obj: Obj, others, size: int) -> bool:
    """``obj`` keeps a gap of max(3 px, 4% of the side) beyond the extents of every one of ``others``."""
    gap = max(3.0, 0.04 * size)
    return all(math.dist(obj.center, o.center) >= EXTENT * (obj.radius + o.radius) + gap for o in others)


def _add_object(rng, objects: list, background: Background, size: int, split: str, subject: Subject | None = None,
                patterns=PATTERNS, categories=CATEGORIES, tries: int = 20) -> Obj | None:
    """Adds a compatible, allowed, non-overlapping object at a free region (None if none fits)."""
    for _ in range(tries):
        subj = subject or sample_subject(rng, split, patterns, categories)
        if compatible(subj.appearance, background):
            break
        if subject is not None:
            return None
    else:
        return None
    free = tuple(p for p in POSITIONS if p not in {o.position for o in objects})
    for attempt in range(tries):
        size_name = "small" if attempt >= tries // 2 else _choice(rng, tuple(SIZES))
        obj = place(rng, subj, _choice(rng, free), size_name, size)
        if _allowed(obj, background, split) and fits(obj, objects, size):
            objects.append(obj)
            return obj
    return None


def sample_scene(rng: np.random.Generator, size: int = 64, *, split: str = "train", max_objects: int = 3,
                 patterns=PATTERNS, categories=CATEGORIES, solid_background: bool = False) -> Scene:
    """A random scene of 1..``max_objects`` objects (``split="train"``: no held-out subject or combination)."""
    n = _choice(rng, range(1, max_objects + 1), NUM_OBJECTS_WEIGHTS[:max_objects])
    objects: list[Obj] = []
    while not objects:  # later objects may not fit; the first fits unless the background admits none
        background = sample_background(rng, solid_background)
        for _ in range(n):
            _add_object(rng, objects, background, size, split, patterns=patterns, categories=categories)
    return Scene(background, tuple(objects))


def multiview_scenes(rng: np.random.Generator, subject: Subject, frames: int = 4, size: int = 64, *,
                     split: str = "train", distractors: float = 0.25) -> list[Scene]:
    """``frames`` scenes of ``subject`` (always ``objects[0]``) in different contexts; each frame has a
    distractor object with probability ``distractors``."""
    scenes = []
    while len(scenes) < frames:
        background = sample_background(rng)
        objects: list[Obj] = []
        if _add_object(rng, objects, background, size, split, subject=subject) is None:
            continue
        if rng.uniform() < distractors:
            _add_object(rng, objects, background, size, split)
        scenes.append(Scene(background, tuple(objects)))
    return scenes


def eval_scenes(n: int, seed: int = 0, size: int = 64) -> list[Scene]:
    """Deterministic base-model evaluation scenes: one training subject in a held-out
    (category, background colour, position) combination, on a solid background."""
    rng, combos, out = np.random.default_rng([seed, 7]), heldout_combos(), []
    while len(out) < n:
        category, color, position = _choice(rng, combos)
        background = Background(color)
        subject = sample_subject(rng, "train", categories=(category,))
        if compatible(subject.appearance, background):
            out.append(Scene(background, (place(rng, subject, position, _choice(rng, tuple(SIZES)), size),)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=8)
def _grid(size: int):
    return np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (y, x) pixel centres


def render_background(background: Background, size: int) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[background.color]
    if background.pattern != "solid":
        ys, xs = _grid(size)
        if background.pattern == "checkered":
            cell = size / 4
            second = (np.floor(xs / cell) + np.floor(ys / cell)) % 2 == 1
        elif background.pattern == "striped":
            second = np.floor(xs / (size / 8)) % 2 == 1
        else:
            raise ValueError(f"unknown background pattern {background.pattern!r}")
        image[second] = PALETTE[background.color2]
    return image


def object_pixels(obj: Obj, size: int):
    """(row slice, column slice, inside (h, w) bool, colours (h, w, 3) uint8) of ``obj`` within its box."""
    cx, cy, r = obj.center[0], obj.center[1], obj.radius
    ext = EXTENT * r
    y0, y1 = max(int(cy - ext), 0), min(int(math.ceil(cy + ext)) + 1, size)
    x0, x1 = max(int(cx - ext), 0), min(int(math.ceil(cx + ext)) + 1, size)
    ys, xs = _grid(size)
    dx, dy = (xs[y0:y1, x0:x1] - cx) / r, (ys[y0:y1, x0:x1] - cy) / r
    c, s = math.cos(math.radians(obj.rotation or 0.0)), math.sin(math.radians(obj.rotation or 0.0))
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = SHAPES[obj.category](u, v)
    a = obj.appearance
    p = np.array(PALETTE[a.primary], np.float32)
    if a.pattern == "solid":
        colors = np.broadcast_to(p.astype(np.uint8), inside.shape + (3,))
    else:
        level = pattern_level(a, u, v)[..., None]
        colors = np.round(p + level * (np.array(PALETTE[a.secondary], np.float32) - p)).astype(np.uint8)
    return slice(y0, y1), slice(x0, x1), inside, colors


def render(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) uint8, masks (K, size, size) bool of the visible pixels of each object)."""
    image = render_background(scene.background, size)
    masks = np.zeros((len(scene.objects), size, size), bool)
    for k, obj in enumerate(scene.objects):
        rows, cols, inside, colors = object_pixels(obj, size)
        image[rows, cols][inside] = colors[inside]
        masks[:k, rows, cols] &= ~inside  # later objects occlude earlier ones
        masks[k, rows, cols] = inside
    return image, masks


# ---------------------------------------------------------------------------------------------------------
# Captions.


def article(phrase: str) -> str:
    """``"an " + phrase`` before a vowel, else ``"a " + phrase``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def appearance_phrase(a: Appearance, colors: bool = True, secondary: bool = True, pattern: bool = True) -> str:
    """``"red and white striped"``, ``"red"``, ``"striped"`` ... (empty when nothing is named)."""
    if a.pattern == "solid":
        return a.primary if colors else ""
    if a.pattern == "gradient" and colors and secondary:
        return f"{a.primary} to {a.secondary} gradient" if pattern else f"{a.primary} and {a.secondary}"
    words = ([a.primary] + ([f"and {a.secondary}"] if secondary else [])) if colors else []
    return " ".join(words + ([PATTERN_WORDS[a.pattern]] if pattern else []))


def subject_phrase(subject: Subject) -> str:
    """``"a red and white striped star"`` (every attribute of the subject, deterministic)."""
    return article(f"{appearance_phrase(subject.appearance)} {subject.category}")


def subject_caption(subject: Subject) -> str:
    """``"a star"``: the caption of a multiview record, the category word only (module docstring)."""
    return article(subject.category)


def _object_phrase(obj: Obj, rng=None) -> str:
    """Full description without rng; with rng, size / colours / pattern / position are sometimes omitted.
    The category word is always there; a None appearance / size / position is not named."""
    full = rng is None
    keep = (lambda p: True) if full else (lambda p: rng.uniform() < p)
    a = obj.appearance
    if a is None:
        app = ""
    elif full:
        app = appearance_phrase(a)
    else:
        colors = keep(0.9)
        app = appearance_phrase(a, colors, colors and keep(0.8), a.pattern != "solid" and keep(0.75))
    words = [w for w in ((obj.size if obj.size and keep(0.5) else ""), app, obj.category) if w]
    phrase = article(" ".join(words))
    if obj.position and keep(0.6):
        phrase += " " + POSITION_PHRASES[obj.position]
    return phrase


def background_phrase(background: Background, pattern: bool = True) -> str:
    if background.color2 is None:
        return background.color
    return f"{background.color} and {background.color2}" + (f" {background.pattern}" if pattern else "")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


CAPTION_TEMPLATES = (
    "{objects} on {bg} background",
    "{bg} background with {objects}",
    "{objects}, {bg} background",
    "a photo of {objects} on {bg} background",
    "an image of {objects} against {bg} background",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption: random template, some attributes omitted; categories and background colours always named."""
    objects = _join([_object_phrase(o, rng) for o in scene.objects])
    bg = article(background_phrase(scene.background, pattern=rng.uniform() < 0.7))
    return _choice(rng, CAPTION_TEMPLATES).format(objects=objects, bg=bg)


def contrast_scene(scene: Scene, rng: np.random.Generator, attribute: str) -> Scene:
    """``scene`` with one random object's ``attribute`` ("category" or "position", a free region)
    changed: the description that a hard-negative caption (NegCLIP, Yuksekgonul et al. 2023) makes."""
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    if attribute == "category":
        obj = dataclasses.replace(obj, category=_choice(rng, tuple(c for c in CATEGORIES if c != obj.category)))
    elif attribute == "position":
        taken = {o.position for o in scene.objects}
        obj = dataclasses.replace(obj, position=_choice(rng, tuple(p for p in POSITIONS if p not in taken)))
    else:
        raise ValueError(f"contrast_scene: attribute {attribute!r} is not 'category' or 'position'")
    return Scene(scene.background, scene.objects[:k] + (obj,) + scene.objects[k + 1:])


def prompt(scene: Scene) -> str:
    """The deterministic full description (evaluation prompt): every named attribute of every object
    (an object's None appearance / size / position is not named)."""
    objects = _join([_object_phrase(o) for o in scene.objects])
    return f"{objects}, on {article(background_phrase(scene.background))} background"


# ---------------------------------------------------------------------------------------------------------
# In-memory batches, records and the writer.


def batch(rng: np.random.Generator, n: int, size: int = 64, **scene_kw) -> dict:
    """``n`` random scenes: ``image`` (n, H, W, 3) uint8, ``caption`` / ``prompt`` lists, ``scenes``,
    ``masks`` (list of (K, H, W) bool)."""
    scenes = [sample_scene(rng, size, **scene_kw) for _ in range(n)]
    rendered = [render(s, size) for s in scenes]
    return {"image": np.stack([r[0] for r in rendered]), "caption": [caption(s, rng) for s in scenes],
            "prompt": [prompt(s) for s in scenes], "scenes": scenes, "masks": [r[1] for r in rendered]}


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def text_image_record(seed: int, index: int, size: int = 64, split: str = "train", **scene_kw):
    """(Example, Scene, caption) of text-image example ``index`` (a pure function of ``(seed, index)``)."""
    rng = np.random.default_rng([seed, 0, index])
    scene = sample_scene(rng, size, split=split, **scene_kw)
    text = caption(scene, rng)
    image, _ = render(scene, size)
    ex = Example(kind="text_image", caption=text, frames=(encode_png(image),), names=(f"{index:07d}",),
                 source=f"shapeworld/text_image/{index:07d}")
    return ex, scene, text


def multiview_record(seed: int, index: int, frames: int = 4, size: int = 64, split: str = "train",
                     distractors: float = 0.25):
    """(Example, Subject, scenes) of multiview object ``index``: caption = :func:`subject_caption`,
    masks = the subject's mask per frame."""
    rng = np.random.default_rng([seed, 1, index])
    subject = sample_subject(rng, split)
    scenes = multiview_scenes(rng, subject, frames, size, split=split, distractors=distractors)
    rendered = [render(s, size) for s in scenes]
    ex = Example(kind="multiview", caption=subject_caption(subject),
                 frames=tuple(encode_png(im) for im, _ in rendered), names=tuple(f"{j:03d}" for j in range(frames)),
                 masks=tuple(encode_png(m[0].astype(np.uint8) * 255) for _, m in rendered),
                 object_id=f"{index:07d}|{subject.key}", source=f"shapeworld/multiview/{index:07d}")
    return ex, subject, scenes


def _write_kind(out: pathlib.Path, kind: str, n: int, make, shards: int, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scenes.jsonl", "w") as f:
        def gen():
            for i in range(n):
                ex, meta = make(i)
                f.write(json.dumps({"index": i, "caption": ex.caption, **meta}) + "\n")
                yield ex
        return write_shards(gen(), out, "train", shards, total=n, kind=kind, source="shapeworld", progress=progress)


def write_dataset(out_dir, *, num_text_image: int, num_multiview: int, frames: int = 4, size: int = 64,
                  seed: int = 0, shards: int = 1, num_eval: int = 256, max_objects: int = 3,
                  progress: bool = False) -> dict[str, str]:
    """Writes the training shards, ``eval_prompts.jsonl`` and ``heldout_subjects.jsonl``; returns the
    ``make_loader`` sources ``{"text_image": folder, "multiview": folder}``."""
    out = pathlib.Path(out_dir)
    sources = {}
    if num_text_image:
        def ti(i):
            ex, scene, _ = text_image_record(seed, i, size, max_objects=max_objects)
            return ex, {"scene": scene_to_dict(scene)}
        _write_kind(out / "text_image", "text_image", num_text_image, ti, shards, progress)
        sources["text_image"] = str(out / "text_image")
    if num_multiview:
        def mv(i):
            ex, subject, scenes = multiview_record(seed, i, frames, size)
            return ex, {"subject": dataclasses.asdict(subject), "scenes": [scene_to_dict(s) for s in scenes]}
        _write_kind(out / "multiview", "multiview", num_multiview, mv, shards, progress)
        sources["multiview"] = str(out / "multiview")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval_prompts.jsonl", "w") as f:
        for s in eval_scenes(num_eval, seed, size):
            f.write(json.dumps({"prompt": prompt(s), "scene": scene_to_dict(s)}) + "\n")
    with open(out / "heldout_subjects.jsonl", "w") as f:
        for s in heldout_subjects():
            f.write(json.dumps({"key": s.key, "phrase": subject_phrase(s), **dataclasses.asdict(s)}) + "\n")
    return sources


PROG = "customjax.shapeworld.world"
PARSE = dict(usage=f"python -m {PROG} OUT_DIR [flags]", doc=__doc__, positionals=("OUT_DIR",))


def define_flags(flag_values=None) -> None:
    """The command's flags (defined on use, so that importing this module defines none), on absl's
    ``flags.FLAGS`` or ``flag_values``. Positional argument: OUT_DIR."""
    from absl import flags

    fv = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_integer("num_text_image", 1024, "text-image scenes (OUT_DIR/text_image; 0: none)", lower_bound=0, **fv)
    flags.DEFINE_integer("num_multiview", 256, "multiview subjects (OUT_DIR/multiview; 0: none)", lower_bound=0, **fv)
    flags.DEFINE_integer("frames", 4, "frames per multiview record", lower_bound=1, **fv)
    flags.DEFINE_integer("size", 64, "image side in pixels", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "world seed (the held-out splits do not depend on it)", **fv)
    flags.DEFINE_integer("shards", 1, "ArrayRecord shards per kind", lower_bound=1, **fv)
    flags.DEFINE_integer("num_eval", 256, "held-out evaluation prompts (OUT_DIR/eval_prompts.jsonl)",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("max_objects", 3, "most objects in a text-image scene", lower_bound=1,
                         upper_bound=len(NUM_OBJECTS_WEIGHTS), **fv)


def main(argv, flag_values=None) -> int:
    """The command: ``argv`` is what absl's ``app.run`` passes (the program, OUT_DIR), the flags
    parsed into ``flag_values`` (default ``flags.FLAGS``)."""
    from absl import flags

    f = flags.FLAGS if flag_values is None else flag_values
    _, out = argv
    print(json.dumps(write_dataset(out, num_text_image=f.num_text_image, num_multiview=f.num_multiview,
                                   frames=f.frames, size=f.size, seed=f.seed, shards=f.shards, num_eval=f.num_eval,
                                   max_objects=f.max_objects, progress=True), indent=2))
    return 0


if __name__ == "__main__":
    from customjax.cli import run

    run(PROG, define_flags, main, **PARSE)
