"""The ShapeWorld customization benchmark (issue 6): held-out subjects in new contexts, every
sampling setting of the papers' ablations, exact scores, a report.

Cases (:func:`make_cases`, a pure function of the seed and the image size):
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
  The ground-truth :attr:`Case.scene` is a placed, renderable scene; :attr:`Case.spec` is what the
  prompt says (plus the subjects' appearances, which :func:`measure` compares with the references)
  and is what the images are measured against.

Settings (:data:`SETTINGS`): config overrides of the base (RealCustom++) config, the papers'
ablation presets (``configs/common.py: ABLATIONS``) where they exist:
  * ``t2i``: no reference (``t_stop=0``, constant all-zero mask: the visual branch contributes
    nothing; exactly plain CFG text-to-image with weight ``guidance.w``);
  * ``unmasked_sXXX``: the adapter everywhere at visual scale s (``t_stop=0``, constant mask = s,
    ``visual_scale=1``: the visual attention output is multiplied by mask x scale, so a constant
    mask s is the unmasked adapter at scale s; the guidance branch never runs). The four scales and
    ``t2i`` (s = 0) differ only in a traced input and share one compiled sampler;
  * ``amg`` (the config as given: AMG), ``binary``, ``cross_only`` (``no_amg_s``), ``gamma0XX``,
    ``tstop`` (= amg) / ``no_early_stop``;
  * ``realcustom``: the RealCustom adapter (``--realcustom_config`` / ``--realcustom_checkpoint``;
    scoring module, Eq. 13 two-scale CFG, its own mask settings);
  * ``two_algorithm1`` / ``two_overlap``: two-subject cases, Many2Many references, disjoint masks
    (Algorithm 1) or independent, possibly overlapping Top-K.
  Settings that resolve to the same sampler configuration and constant mask are sampled once
  (``same_as`` in the report).

Scores per image (:func:`score`):
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

import dataclasses
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from customjax.data import shapeworld as sw
from customjax.metrics.shapeworld import measure, summarise

NEUTRAL = ("white", "gray", "black")
CONTROL_KEYS = ("background_correct", "position_correct", "others_correct")
METRICS = ("controllability", "background_correct", "position_correct", "others_correct", "similarity",
           "category_correct", "size_correct", "color_correct", "count_correct", "background_score", "mask_mean",
           "clip_t", "clip_i")
CONTROLLABILITY = ("controllability = mean over the applicable items of {background_correct; position_correct: the "
                   "subject found with the right category at the named position; others_correct: every other named "
                   "object (extra object / second subject) found with the right category at its named position}; "
                   "similarity = appearance_similarity of the subject to its reference subject (0 if not found; "
                   "two subjects: mean of both)")


# ---------------------------------------------------------------------------------------------------------
# Cases.


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

    def reference_images(self, size: int) -> np.ndarray:
        return np.stack([sw.render(r, size)[0] for r in self.references])

    def to_dict(self) -> dict:
        return dict(name=self.name, prompt=self.prompt, words=list(self.words),
                    subjects=[dict(key=s.key, phrase=sw.subject_phrase(s)) for s in self.subjects],
                    scene=sw.scene_to_dict(self.scene), references=[sw.scene_to_dict(r) for r in self.references])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


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


def object_phrase(obj: sw.Obj, color: bool, size: bool) -> str:
    """``"a large star on the left"`` / ``"a red square at the top"``: category, position, and the size
    or the (solid) colour when asked; never a pattern."""
    words = ([obj.size] if size else []) + ([obj.appearance.primary] if color else []) + [obj.category]
    return f"{_article(' '.join(words))} {sw.POSITION_PHRASES[obj.position]}"


def case_prompt(scene: sw.Scene, n_subjects: int) -> str:
    phrases = [object_phrase(o, color=k >= n_subjects, size=k < n_subjects) for k, o in enumerate(scene.objects)]
    return f"{' and '.join(phrases)}, on {_article(sw.background_phrase(scene.background))} background"


def _fits(obj: sw.Obj, others: Sequence[sw.Obj], size: int) -> bool:
    gap = max(3.0, 0.04 * size)
    return all(math.dist(obj.center, o.center) >= sw.EXTENT * (obj.radius + o.radius) + gap for o in others)


def _colors(subject: sw.Subject) -> set[str]:
    a = subject.appearance
    return {a.primary} | ({a.secondary} if a.secondary else set())


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
        colors = [c for c in sw.COLORS if c not in _colors(subject) and c != bg.color
                  and sw.compatible(sw.Appearance(c), bg)]
        if not colors:
            return None
        pos2 = _pick(rng, [p for p in sw.POSITIONS if p != position])
        o = sw.place(rng, sw.Subject(category, sw.Appearance(_pick(rng, colors))), pos2, "small", size)
        if not _fits(o, objects, size) or sw.is_heldout_combo(category, bg.color, pos2):
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
        if _fits(objs[1], objs[:1], size):
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


# ---------------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class Setting:
    """How to sample: ``ablations`` (``configs/common.py: ABLATIONS`` presets) then ``guidance``
    overrides of ``config.guidance``, on the RealCustom++ config (``method="realcustompp"``) or the
    RealCustom one; ``init_mask``: the constant mask before the first guidance mask (with
    ``t_stop=0``: the mask throughout)."""

    name: str
    group: str
    label: str
    method: str = "realcustompp"
    ablations: tuple[str, ...] = ()
    guidance: tuple[tuple[str, Any], ...] = ()
    init_mask: float = 0.0
    subjects: int = 1
    fast: bool = False


GROUPS = {
    "frontier": "Unmasked-adapter frontier (RealCustom++ Fig. 1(c) / 2): text-to-image and the adapter everywhere",
    "mask": "Mask construction (RealCustom++ Tables V, XII; AMG = cross-attn + self-attn augmentation, max norm)",
    "gamma": "Top-K ratio gamma_scope (RealCustom++ Table VI)",
    "early_stop": "Early stop of the guidance branch (RealCustom++ Table VII / XII AMG-T)",
    "realcustom": "RealCustom (conference version: adaptive scoring module, Eq. 13 guidance)",
    "two_subject": "Two subjects, Many2Many references (RealCustom++ Algorithm 1 vs overlapping masks)",
}
_NOMASK = (("t_stop", 0), ("visual_scale", 1.0))
SETTINGS: tuple[Setting, ...] = (
    Setting("t2i", "frontier", "text-to-image (no reference, s = 0)", guidance=_NOMASK, init_mask=0.0, fast=True),
    *(Setting(f"unmasked_s{int(s * 100):03d}", "frontier", f"adapter without mask, s = {s}", guidance=_NOMASK,
              init_mask=s, fast=True) for s in (0.25, 0.5, 0.75, 1.0)),
    Setting("amg", "mask", "RealCustom++ AMG (default)", fast=True),
    Setting("binary", "mask", "w/o mask norm (binary mask)", ablations=("binary",)),
    Setting("cross_only", "mask", "cross-attn only (w/o AMG-S self-attn augmentation)", ablations=("no_amg_s",)),
    *(Setting(f"gamma{int(g * 100):03d}", "gamma", f"gamma_scope = {g}", ablations=(f"gamma{int(g * 100):03d}",))
      for g in (0.1, 0.2, 0.3, 0.5)),
    Setting("tstop", "early_stop", "early stop at T_stop (AMG-T)"),
    Setting("no_early_stop", "early_stop", "w/o early stop (guidance every step)", ablations=("no_early_stop",)),
    Setting("realcustom", "realcustom", "RealCustom (scoring module, Eq. 13 CFG)", method="realcustom"),
    Setting("two_algorithm1", "two_subject", "two subjects, Algorithm 1 (disjoint masks)",
            guidance=(("references", "many2many"), ("multi", "algorithm1")), subjects=2, fast=True),
    Setting("two_overlap", "two_subject", "two subjects, masks may overlap", ablations=("overlap",),
            guidance=(("references", "many2many"),), subjects=2),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)


def setting_config(base, setting: Setting, ablations: Mapping[str, tuple[str, Callable]]):
    """A copy of ``base`` with the setting's presets and overrides applied (masks are not recorded)."""
    c = base.copy_and_resolve_references()
    for name in setting.ablations:
        if name not in ablations:
            raise ValueError(f"setting {setting.name}: unknown ablation preset {name!r}")
        c.guidance.update(ablations[name][1](c))
    c.guidance.update(dict(setting.guidance))
    c.sample.record_masks = False
    return c


def with_steps(cfg, steps: int | None):
    """``cfg`` with ``steps`` sampling steps and T_stop rescaled in proportion (the papers use half)."""
    c = cfg.copy_and_resolve_references()
    if steps and steps != c.sample.steps:
        if c.guidance.t_stop is not None:
            c.guidance.t_stop = max(1, round(c.guidance.t_stop * steps / c.sample.steps))
        c.sample.steps = steps
    return c


def load_ablations(config_file: str | Path) -> dict:
    """``ABLATIONS`` of the ``common.py`` beside a config file (``configs/common.py``)."""
    import importlib.util

    path = Path(str(config_file).split(":")[0]).resolve().parent / "common.py"
    spec = importlib.util.spec_from_file_location("_benchmark_config_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ABLATIONS


# ---------------------------------------------------------------------------------------------------------
# Sampling.


@dataclasses.dataclass
class Model:
    """One built method with its reference side and replicated sampler parameters."""

    cfg: Any
    built: Any
    params: Any
    tok_fn: Callable
    visual: Callable
    ref_size: int
    tokens: dict = dataclasses.field(default_factory=dict)   # case name -> (R, N, D)


def load_model(cfg, checkpoint: str | None, mesh) -> Model:
    import logging

    from customjax.methods import realcustom, realcustompp
    from customjax.methods.build import build, load_adapter
    from customjax.parallel import replicate

    built = build(cfg)
    if checkpoint:
        built = load_adapter(built, checkpoint)
    else:
        logging.warning("%s: no checkpoint, the adapter is randomly initialised (plumbing only)", cfg.method)
    if built.method == "realcustompp":
        tok_fn, visual, adapter = realcustompp.reference_tokens, realcustompp.constant_visual, None
        ref_size = cfg.encoders.image_size * cfg.encoders.scale
    else:
        tok_fn, adapter = realcustom.reference_tokens, built.params["image"]["scoring"]
        visual = realcustom.ScoringVisual(built.image_side.scoring, cfg.scoring.gamma_num)
        ref_size = cfg.encoders.image_size
    params = replicate({"unet": built.params["unet"], "vae": built.params["vae"],
                        "text_encoders": built.params["text_encoders"], "adapter": adapter}, mesh)
    return Model(cfg, built, params, tok_fn, visual, ref_size)


def reference_tokens(model: Model, case: Case, size: int) -> np.ndarray:
    import jax.numpy as jnp

    from customjax.sample import _resize

    if case.name not in model.tokens:
        refs = case.reference_images(size).astype(np.float32) / 255.0
        imgs = np.stack([_resize(r, model.ref_size) for r in refs])
        model.tokens[case.name] = np.asarray(model.tok_fn(model.built.image_side, model.built.params["image"],
                                                          jnp.asarray(imgs)))
    return model.tokens[case.name]


def generate(model: Model, gcfg, jobs: list[tuple[Case, int]], init_mask: float, batch: int, mesh, size: int,
             on_batch: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) and final masks (n, J, h, w) of ``jobs`` (case, seed), all with
    ``len(case.words) == J``, in batches of ``batch`` (the last padded: one compiled shape)."""
    import jax
    import jax.numpy as jnp

    from customjax.images import to_uint8
    from customjax.parallel import shard_batch
    from customjax.sampling.common import cached_sampler, seed_latents
    from customjax.sampling.dual_branch import dual_branch_sample
    from customjax.tokenizer import tokenize, word_token_positions

    cfg, pipe = model.cfg, model.built.pipe
    smp = cached_sampler(pipe.schedule, cfg.sample.sampler, cfg.sample.steps)
    f, J = pipe.vae_scale, len(jobs[0][0].words)
    hw_mask = (size // f // gcfg.mask.mask_factor,) * 2
    images, masks = [], []
    for b in range(0, len(jobs), batch):
        chunk = jobs[b:b + batch]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n_real)
        prompts = [c.prompt for c, _ in chunk]
        ids = tuple(jnp.asarray(tokenize(t, prompts)) for t in pipe.tokenizers)
        neg = tuple(jnp.asarray(tokenize(t, [""] * batch)) for t in pipe.tokenizers)
        wm = np.zeros((batch, J, ids[0].shape[1]), bool)
        for i, (c, _) in enumerate(chunk):
            for k, w in enumerate(c.words):
                wm[i, k, word_token_positions(pipe.tokenizers[0], c.prompt, w)] = True
        feats = np.stack([reference_tokens(model, c, size) for c, _ in chunk])
        lat = seed_latents([s for _, s in chunk], (size // f, size // f, pipe.unet.config.in_channels))
        m0 = np.full((batch, J, *hw_mask), init_mask, np.float32)
        data = shard_batch(dict(ids=ids, neg=neg, wm=jnp.asarray(wm), feats=jnp.asarray(feats), lat=jnp.asarray(lat),
                                m0=jnp.asarray(m0)), mesh)
        res = dual_branch_sample(pipe, model.built.unet, smp, gcfg, model.visual, model.params, data["ids"],
                                 data["neg"], data["wm"], data["feats"], data["lat"], data["m0"],
                                 zero_uncond=pipe.is_sdxl)
        res = jax.tree_util.tree_map(np.asarray, res)
        images.append(to_uint8(res["images"][:n_real]))
        masks.append(res["masks"][:n_real])
        on_batch(n_real)
    return np.concatenate(images), np.concatenate(masks)


# ---------------------------------------------------------------------------------------------------------
# Scoring.


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


# ---------------------------------------------------------------------------------------------------------
# The run.


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(commit=commit, dirty=dirty)


def run_benchmark(cfg, *, checkpoint: str | None, ablations: Mapping, settings: Sequence[str] = SETTING_NAMES,
                  rc_cfg=None, rc_checkpoint: str | None = None, cases: int = 20, prompts_per_subject: int = 2,
                  pairs: int = 10, case_seed: int = 0, seeds: Sequence[int] = (0, 1), batch: int | None = None,
                  progress: bool = True) -> tuple[dict, dict]:
    """Samples and scores every setting: (the report, JSON-ready; the images and cases for
    :func:`write_report`)."""
    import jax
    from tqdm import tqdm

    from customjax.methods.build import guidance_config
    from customjax.parallel import data_mesh
    from customjax.sampling.dual_branch import dual_branch_sample, unet_evaluations
    from customjax.tokenizer import word_token_positions

    t_start = time.time()
    if cfg.method != "realcustompp":
        raise ValueError(f"--config must be a RealCustom++ config (method {cfg.method!r})")
    if rc_cfg is not None and rc_cfg.method != "realcustom":
        raise ValueError(f"--realcustom_config must be a RealCustom config (method {rc_cfg.method!r})")
    size = cfg.sample.height
    if cfg.sample.width != size:
        raise ValueError("the benchmark needs square images (sample.height == sample.width)")
    unknown = [s for s in settings if s not in SETTING_NAMES]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTING_NAMES)}")
    chosen = [s for s in SETTINGS if s.name in settings]
    notes = []
    if rc_cfg is None and any(s.method == "realcustom" for s in chosen):
        notes.append("realcustom: skipped (no --realcustom_config)")
        chosen = [s for s in chosen if s.method != "realcustom"]
    if rc_cfg is not None and (rc_cfg.sample.height, rc_cfg.model.path) != (size, cfg.model.path):
        raise ValueError("--realcustom_config must use the same base model and image size as --config")
    single, two = make_cases(cases, case_seed, size, prompts_per_subject=prompts_per_subject,
                             pairs=pairs if any(s.subjects == 2 for s in chosen) else 0)
    if not two:
        chosen = [s for s in chosen if s.subjects == 1]

    # the ceiling: the rendered target scenes, scored like the samples
    ground_truth = {str(k): summarise([{m: v for m, v in score(sw.render(c.scene, size)[0], c).items()
                                        if v is not None} for c in pool])
                    for k, pool in ((1, single), (2, two)) if pool}
    mesh = data_mesh()
    ndev = mesh.shape["data"]
    models = {"realcustompp": load_model(cfg, checkpoint, mesh)}
    if any(s.method == "realcustom" for s in chosen):
        models["realcustom"] = load_model(rc_cfg, rc_checkpoint, mesh)
    for m in models.values():   # every target word must survive tokenization, before anything compiles
        for case in single + two:
            for w in case.words:
                word_token_positions(m.built.pipe.tokenizers[0], case.prompt, w)
    scorer, clip_note = clip_scorer(cfg)
    notes.append(clip_note)

    # Resolve every setting; identical (method, sampler config, mask, subjects) are sampled once.
    plan, first = [], {}
    for s in chosen:
        base = cfg if s.method == "realcustompp" else rc_cfg
        c = setting_config(base, s, ablations)
        gcfg = guidance_config(c)
        key = (s.method, gcfg, float(s.init_mask), s.subjects)
        plan.append((s, c, gcfg, first.setdefault(key, s.name)))
    total = sum(len(two if s.subjects == 2 else single) * len(seeds) for s, _, _, same in plan if same == s.name)

    results, images, entries = {}, {}, []
    with tqdm(total=total, desc="benchmark", unit="img", disable=not progress) as bar:
        for s, c, gcfg, same in plan:
            pool = two if s.subjects == 2 else single
            entry = dict(name=s.name, group=s.group, label=s.label, method=s.method, ablations=list(s.ablations),
                         overrides=dict(s.guidance), init_mask=s.init_mask, subjects=s.subjects,
                         guidance=c.guidance.to_dict(),
                         unet_evaluations_per_image=unet_evaluations(gcfg, c.sample.steps),
                         same_as=None if same == s.name else same)
            if same != s.name:
                entries.append({**entry, **{k: v for k, v in next(e for e in entries if e["name"] == same).items()
                                            if k in ("summary", "seconds", "compiled")}})
                results[s.name], images[s.name] = results[same], images[same]
                continue
            bar.set_postfix_str(s.name)
            jobs = [(case, seed) for case in pool for seed in seeds]
            bsz = min(batch or c.sample.batch, len(jobs))
            bsz += -bsz % ndev
            cache0 = dual_branch_sample._cache_size()
            t0 = time.time()
            imgs, masks = generate(models[s.method], gcfg, jobs, s.init_mask, bsz, mesh, size, bar.update)
            seconds = time.time() - t0
            recs = []
            for (case, seed), im, mk in zip(jobs, imgs, masks):
                recs.append(dict(setting=s.name, case=case.name, seed=int(seed), **score(im, case),
                                 mask_mean=float(mk.mean())))
            if scorer is not None:
                ct, ci = clip_scores(scorer, imgs, [case for case, _ in jobs], size)
                for r, a, b in zip(recs, ct, ci):
                    r.update(clip_t=float(a), clip_i=float(b))
            summary = summarise([{k: r[k] for k in METRICS if r.get(k) is not None} for r in recs])
            entries.append({**entry, "summary": summary, "seconds": round(seconds, 2),
                            "compiled": dual_branch_sample._cache_size() > cache0})
            results[s.name], images[s.name] = recs, imgs
    dev = jax.devices()[0]
    report = dict(
        benchmark="shapeworld_custom", config=cfg.to_dict(), checkpoint=checkpoint,
        realcustom_config=None if rc_cfg is None else rc_cfg.to_dict(), realcustom_checkpoint=rc_checkpoint,
        device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count()), **_git(),
        jax=jax.__version__, steps=cfg.sample.steps, sampler=cfg.sample.sampler, image_size=size,
        seeds=[int(s) for s in seeds], case_seed=case_seed, prompts_per_subject=prompts_per_subject,
        definition=CONTROLLABILITY, notes=notes, ground_truth=ground_truth, seconds=round(time.time() - t_start, 1),
        settings=entries, cases=[c.to_dict() for c in single + two], images=[r for s in entries if s["same_as"] is None
                                                            for r in results[s["name"]]])
    return report, dict(images=images, single=single, two=two, seeds=list(seeds))


# ---------------------------------------------------------------------------------------------------------
# The report.


def _fmt(summary: dict, key: str) -> str:
    v = summary.get(key)
    if v is None:
        return "-"
    return f"{v['mean']:.3f} ± {(v['hi'] - v['lo']) / 2:.3f}"


def markdown(report: dict) -> str:
    cols = (("controllability", "Controllability"), ("background_correct", "Background"),
            ("position_correct", "Position"), ("others_correct", "Other objects"), ("similarity", "Similarity"),
            ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("mask_mean", "Mask cover"))
    lines = [f"# ShapeWorld customization benchmark", "",
             f"Device {report['device']['kind']} ({report['device']['platform']}), commit "
             f"{(report.get('commit') or '?')[:12]}{' (dirty)' if report.get('dirty') else ''}; "
             f"{report['steps']} {report['sampler']} steps, {report['image_size']} px; seeds {report['seeds']}; "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 1)} single-subject and "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 2)} two-subject held-out cases; "
             f"checkpoint `{report.get('checkpoint')}`.", "",
             f"Mean ± half-width of the 95% interval over cases x seeds. {report['definition']}.", ""]
    lines += [f"Note: {n}" for n in report["notes"]] + [""]
    groups = {}
    for s in report["settings"]:
        groups.setdefault(s["group"], []).append(s)
    for g, title in GROUPS.items():
        if g not in groups:
            continue
        lines += [f"## {title}", "", "| Setting | " + " | ".join(c[1] for c in cols) + " | UNet evals / img |",
                  "|---" * (len(cols) + 2) + "|"]
        gt = report.get("ground_truth", {}).get("2" if g == "two_subject" else "1")
        if gt and g in ("frontier", "two_subject"):
            lines.append("| ground-truth render of the prompt's scene (ceiling) | "
                         + " | ".join(_fmt(gt, c[0]) for c in cols) + " | - |")
        for s in groups[g]:
            g_ = s["guidance"]
            label = s["label"] + (f" (gamma_scope {g_['gamma_scope']}, T_stop {g_['t_stop']})"
                                  if s["name"] in ("amg", "tstop", "realcustom") else "")
            label += f" (= {s['same_as']})" if s["same_as"] else ""
            lines.append(f"| {label} | " + " | ".join(_fmt(s["summary"], c[0]) for c in cols)
                         + f" | {s['unet_evaluations_per_image']} |")
        lines.append("")
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot(report: dict, path: str | Path, width: int = 900, height: int = 640) -> None:
    """Similarity (y) against controllability (x) with 95% intervals: the unmasked frontier (t2i = s 0
    and the four scales) as a line, the masked settings as labelled points."""
    pts = {s["name"]: s for s in report["settings"] if s["subjects"] == 1 and "controllability" in s["summary"]
           and "similarity" in s["summary"]}
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    L, R, T, B = 70, width - 230, 62, height - 60
    gt = report.get("ground_truth", {}).get("1", {})
    gt = gt if "controllability" in gt and "similarity" in gt else None
    shown = list(pts.values()) + ([dict(summary=gt)] if gt else [])
    xs = [v for s in shown for v in (s["summary"]["controllability"]["lo"], s["summary"]["controllability"]["hi"])]
    ys = [v for s in shown for v in (s["summary"]["similarity"]["lo"], s["summary"]["similarity"]["hi"])]

    def span(v):
        if not v:
            return 0.0, 1.0
        lo, hi = max(0.0, math.floor(min(v) * 10) / 10), min(1.0, math.ceil(max(v) * 10) / 10)
        return (lo, hi) if hi > lo else (max(0.0, lo - 0.1), min(1.0, hi + 0.1))
    (x0, x1), (y0, y1) = span(xs), span(ys)
    X = lambda v: L + (v - x0) / (x1 - x0) * (R - L)
    Y = lambda v: B - (v - y0) / (y1 - y0) * (B - T)
    d.rectangle([L, T, R, B], outline="black")
    def ticks(lo, hi):
        step = next(s for s in (0.02, 0.05, 0.1, 0.2) if (hi - lo) / s <= 12)
        return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    for horiz, vals in ((False, ticks(x0, x1)), (True, ticks(y0, y1))):
        for v in vals:
            if horiz:
                d.line([L, Y(v), R, Y(v)], fill=(230, 230, 230))
                d.text((L - 8, Y(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
            else:
                d.line([X(v), T, X(v), B], fill=(230, 230, 230))
                d.text((X(v), B + 8), f"{v:.2f}", fill="black", font=small, anchor="mt")
    d.text(((L + R) / 2, height - 22), "controllability (background / position / other objects correct)",
           fill="black", font=font, anchor="mm")
    d.text((12, T - 24), "similarity to the reference (appearance)", fill="black", font=font)
    d.text(((L + R) / 2, 14), "ShapeWorld customization: similarity vs controllability (95% intervals)",
           fill="black", font=font, anchor="mm")
    front = [n for n in SETTING_NAMES if n in pts and (n == "t2i" or n.startswith("unmasked_"))]
    colors = {"frontier": (40, 90, 200), "mask": (210, 40, 40), "gamma": (230, 140, 20), "early_stop": (40, 160, 60),
              "realcustom": (130, 40, 170), "ground_truth": (0, 0, 0)}

    def point(s, color, label):
        cx, cy = s["summary"]["controllability"], s["summary"]["similarity"]
        d.line([X(cx["lo"]), Y(cy["mean"]), X(cx["hi"]), Y(cy["mean"])], fill=color)
        d.line([X(cx["mean"]), Y(cy["lo"]), X(cx["mean"]), Y(cy["hi"])], fill=color)
        r = 5
        d.ellipse([X(cx["mean"]) - r, Y(cy["mean"]) - r, X(cx["mean"]) + r, Y(cy["mean"]) + r], fill=color)
        right = X(cx["mean"]) > R - 90   # labels near the right edge go to the left of the point
        d.text((X(cx["mean"]) + (-7 if right else 7), Y(cy["mean"]) - 7), label, fill=color, font=small,
               anchor="rs" if right else "ls")

    if len(front) > 1:
        d.line([(X(pts[n]["summary"]["controllability"]["mean"]), Y(pts[n]["summary"]["similarity"]["mean"]))
                for n in front], fill=colors["frontier"], width=2)
    for n in front:
        point(pts[n], colors["frontier"], "t2i" if n == "t2i" else f"s={pts[n]['init_mask']}")
    for s in pts.values():
        if s["group"] != "frontier" and not s["same_as"]:
            point(s, colors.get(s["group"], (0, 0, 0)), s["name"])
    if gt:
        point(dict(summary=gt), (0, 0, 0), "ground truth")
    ly = T
    for g, c in colors.items():
        d.rectangle([R + 20, ly + 3, R + 32, ly + 15], fill=c)
        d.text((R + 40, ly), {"frontier": "unmasked frontier", "mask": "AMG / mask ablations", "gamma": "gamma_scope",
                              "early_stop": "early stop", "realcustom": "RealCustom",
                              "ground_truth": "rendered target (ceiling)"}[g], fill="black", font=small)
        ly += 22
    img.save(path)


def sample_grid(extra: dict, report: dict, path: str | Path, rows: int = 4, tile: int = 96) -> None:
    """Rows: the first cases (first seed); columns: the reference(s), then every setting sampled."""
    font = _font(11)
    blocks = []
    for pool, n_ref in ((extra["single"], 1), (extra["two"], 2)):
        names = [s["name"] for s in report["settings"] if s["subjects"] == n_ref and not s["same_as"]]
        if not pool or not names:
            continue
        cases = pool[:rows]
        header = ["ref"] if n_ref == 1 else ["ref 1", "ref 2"]
        cols = header + names
        W, H = len(cols) * (tile + 4) + 4, len(cases) * (tile + 4) + 24
        block = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(block)
        for j, name in enumerate(cols):
            d.text((4 + j * (tile + 4) + tile / 2, 10), name[:16], fill="black", font=font, anchor="mm")
        for i, case in enumerate(cases):
            size = report["image_size"]
            tiles = list(case.reference_images(size))
            k = i * len(extra["seeds"])      # images are in (case, seed) order
            tiles += [extra["images"][name][k] for name in names]
            for j, t in enumerate(tiles):
                block.paste(Image.fromarray(t).resize((tile, tile), Image.NEAREST),
                            (4 + j * (tile + 4), 20 + i * (tile + 4)))
        blocks.append(block)
    if not blocks:
        return
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + 8 * len(blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height + 8
    out.save(path)


def write_report(report: dict, extra: dict, out: str | Path) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md``, ``frontier.png`` and ``samples.png`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "results.json", markdown=out / "results.md", plot=out / "frontier.png",
                 grid=out / "samples.png")
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    sample_grid(extra, report, paths["grid"])
    return paths
