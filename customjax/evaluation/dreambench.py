"""The DreamBench protocol (Ruiz et al. 2023, DreamBooth Sec. 4.1) on a subjects folder the user supplies.

Layout (google/dreambooth's ``dataset/``): one folder per subject with its images, and
``prompts_and_classes.txt`` beside them: a ``Classes`` section (``subject_name,class`` lines) and the
``Object Prompts`` / ``Live Subject Prompts`` lists (``'a {0} {1} in the jungle'.format(unique_token,
class_token)``); live subjects are those whose class is in ``live_classes`` (cats and dogs). A plain text
file with one ``{0} {1}`` template per line (used for every subject) works as the prompt list too; classes
then come from each subject folder's ``concept.json`` (``{"class": ...}``, as ``customjax.finetune`` reads).

Generation: every subject x prompt x ``images_per_prompt`` seeds (DreamBench: 25 prompts x 4 images), and
``images_per_prompt`` reconstructions with ``a photo of a {0} {1}`` (RealCustom++ Sec. IV-A's similarity
prompt). A method's phrase replaces ``{0} {1}``: an adapter's is the class word (its reference is the
subject's first image), a fine-tuned concept's its learnt phrase.

Scores per image (DreamBooth's definitions):
  * CLIP-T: cosine of the image's and the prompt's CLIP embeddings, the prompt with the class word only
    (``a dog in the jungle``);
  * CLIP-I / DINO-I: the mean cosine of the image's embedding to each real image of its subject (the
    average pairwise similarity; DINO: the CLS token of ``facebook/dino-vits16``);
  * with masks (``<subject>/masks/<image stem>.png`` for the real images and, for the samples,
    ``--sample_masks DIR/<method>/<key>.png``, e.g. from Grounded SAM): the segmented variants of
    CustomContrast (Sec. 4.1): both images keep their subject on white, cropped to the mask's bounding
    box padded to a square; R-CI / R-DI over the reconstructions, E-CI / E-DI over the editing prompts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from customjax.evaluation.methods import Job, Subject

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_CLASSES = ("cat", "dog")
RECONSTRUCTION = "a photo of a {0} {1}"
_FORMAT = re.compile(r"^'(?P<t>.*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$")


@dataclasses.dataclass(frozen=True)
class Prompts:
    classes: dict[str, str]          # subject -> class (empty for a plain list)
    objects: tuple[str, ...]
    live: tuple[str, ...]


def read_prompts(path: str | Path) -> Prompts:
    """``prompts_and_classes.txt`` (see the module docstring) or a plain list of ``{0} {1}`` templates."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt list {path} does not exist")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    if not any(_FORMAT.match(ln) for ln in lines):
        plain = tuple(ln for ln in lines if ln and not ln.startswith("#"))
        for i, t in enumerate(plain):
            _check_template(t, f"{path} line {i + 1}")
        if not plain:
            raise ValueError(f"{path}: no prompt templates")
        return Prompts({}, plain, plain)
    classes, objects, live, section = {}, [], [], None
    for i, ln in enumerate(lines):
        low = ln.lower()
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "objects"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif low == "prompts":
            section = None
        elif section == "classes" and "," in ln and ln != "subject_name,class":
            name, cls = (x.strip() for x in ln.split(",", 1))
            classes[name] = cls
        elif section in ("objects", "live") and _FORMAT.match(ln):
            t = _FORMAT.match(ln).group("t")
            _check_template(t, f"{path} line {i + 1}")
            (objects if section == "objects" else live).append(t)
    if not objects:
        raise ValueError(f"{path}: no 'Object Prompts' list of '...'.format(unique_token, class_token) lines")
    return Prompts(classes, tuple(objects), tuple(live or objects))


def _check_template(t: str, where: str) -> None:
    if "{0} {1}" not in t or t.count("{") != 2:
        raise ValueError(f"{where}: template {t!r} must hold '{{0}} {{1}}' (the identifier, then the class) once")


def template(t: str) -> str:
    """A DreamBench template as a :class:`~customjax.evaluation.methods.Job` template: ``{0} {1}`` -> ``{0}``
    (the method's whole phrase)."""
    return t.replace("{0} {1}", "{0}")


def plain(t: str, cls: str) -> str:
    return " ".join(t.format("", cls).split())


def load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:       # PIL raises several types for a corrupt file
        raise ValueError(f"{path}: cannot read the image ({e})") from e


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L")) >= 128
    except Exception as e:
        raise ValueError(f"{path}: cannot read the mask ({e})") from e
    if m.shape != shape:
        raise ValueError(f"{path}: mask of {m.shape[0]}x{m.shape[1]}, its image is {shape[0]}x{shape[1]}")
    if not m.any():
        raise ValueError(f"{path}: the mask is empty")
    return m


@dataclasses.dataclass(frozen=True)
class BenchSubject:
    subject: Subject
    live: bool
    masks: tuple[np.ndarray, ...] | None      # per real image, or None


def read_subjects(folder: str | Path, prompts: Prompts, live_classes: Sequence[str] = LIVE_CLASSES,
                  only: Sequence[str] | None = None) -> dict[str, BenchSubject]:
    """The subject folders of a DreamBench-layout ``folder`` (those in the class list, or every folder
    with a ``concept.json`` class word for a plain prompt list)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"subjects folder {folder} does not exist")
    classes = dict(prompts.classes)
    if not classes:
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            f = d / "concept.json"
            if f.is_file():
                classes[d.name] = json.loads(f.read_text())["class"]
        if not classes:
            raise ValueError(f"{folder}: a plain prompt list needs each subject folder's concept.json with its class")
    names = list(only) if only else list(classes)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{folder}: subject(s) {unknown} are not in the class list ({sorted(classes)})")
    out = {}
    for name in names:
        d = folder / name
        if not d.is_dir():
            raise FileNotFoundError(f"{folder}: the class list names subject {name!r} but {d} does not exist")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise ValueError(f"{d}: no images ({', '.join(IMAGE_EXT)})")
        images = tuple(load_rgb(f) for f in files)
        masks = None
        if (d / "masks").is_dir():
            missing = [f.name for f in files if not (d / "masks" / f"{f.stem}.png").is_file()]
            if missing:
                raise FileNotFoundError(f"{d / 'masks'}: no mask for {missing} (masks/<image stem>.png for every image)")
            masks = tuple(load_mask(d / "masks" / f"{f.stem}.png", im.shape[:2]) for f, im in zip(files, images))
        out[name] = BenchSubject(Subject(name, classes[name], images[0], images), classes[name] in live_classes, masks)
    return out


def make_jobs(subjects: dict[str, BenchSubject], prompts: Prompts, images_per_prompt: int = 4,
              prompt_limit: int | None = None) -> list[Job]:
    """Every subject x editing prompt x seed (``{subject}.e{NN}.{seed}``), then the reconstructions
    (``{subject}.r.{seed}``)."""
    jobs = []
    for name, b in subjects.items():
        ts = (prompts.live if b.live else prompts.objects)[:prompt_limit]
        for p, t in enumerate(ts):
            for k in range(images_per_prompt):
                jobs.append(Job(f"{name}.e{p:02d}.{k}", (name,), k, template(t), plain(t, b.subject.cls),
                                dict(kind="edit", prompt_index=p)))
        for k in range(images_per_prompt):
            jobs.append(Job(f"{name}.r.{k}", (name,), k, template(RECONSTRUCTION), plain(RECONSTRUCTION, b.subject.cls),
                            dict(kind="reconstruction")))
    return jobs


def segment(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked subject on white, cropped to the mask's bounding box padded (white) to a square."""
    mask = np.asarray(mask, bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of {mask.shape}, image of {image.shape[:2]}")
    if not mask.any():
        return np.full((1, 1, 3), 255, np.uint8)
    out = np.where(mask[..., None], image, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    out = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = out.shape[:2]
    side = max(h, w)
    sq = np.full((side, side, 3), 255, np.uint8)
    sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = out
    return sq


def score(images: Sequence[np.ndarray], jobs: Sequence[Job], subjects: dict[str, BenchSubject], clip, dino,
          sample_masks: Sequence[np.ndarray | None] | None = None, cache: dict | None = None) -> list[dict]:
    """Per image: ``clip_t``, ``clip_i``, ``dino_i`` (None without that encoder), and with masks of both the
    real images and the sample: ``seg_clip_i`` / ``seg_dino_i`` (R- or E- by the job's kind)."""
    cache = {} if cache is None else cache

    def refs(enc, name: str, seg: bool) -> np.ndarray:
        key = (enc.name, name, seg)
        if key not in cache:
            b = subjects[name]
            imgs = [segment(i, m) for i, m in zip(b.subject.views, b.masks)] if seg else list(b.subject.views)
            cache[key] = enc.embed_images(imgs)
        return cache[key]

    rows = [dict(key=j.key, subject=j.subjects[0], kind=j.info.get("kind"), prompt_index=j.info.get("prompt_index"))
            for j in jobs]
    if clip is not None:
        e = clip.embed_images(list(images))
        t = clip.embed_text([j.plain for j in jobs])
        for r, ei, ti, j in zip(rows, e, t, jobs):
            r["clip_t"] = float(ei @ ti)
            r["clip_i"] = float(np.mean(refs(clip, j.subjects[0], False) @ ei))
    if dino is not None:
        e = dino.embed_images(list(images))
        for r, ei, j in zip(rows, e, jobs):
            r["dino_i"] = float(np.mean(refs(dino, j.subjects[0], False) @ ei))
    if sample_masks is not None:
        idx = [i for i, (m, j) in enumerate(zip(sample_masks, jobs)) if m is not None and subjects[j.subjects[0]].masks]
        segs = [segment(images[i], sample_masks[i]) for i in idx]
        for enc, k in ((clip, "seg_clip_i"), (dino, "seg_dino_i")):
            if enc is None or not idx:
                continue
            e = enc.embed_images(segs)
            for i, ei in zip(idx, e):
                rows[i][k] = float(np.mean(refs(enc, jobs[i].subjects[0], True) @ ei))
    return rows


# ---------------------------------------------------------------------------------------------------------
# The protocol object customjax.evaluate drives.

KINDS = (
    ("edit", "Editing prompts (DreamBench's 25 per subject)",
     (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"), ("seg_clip_i", "E-CI"), ("seg_dino_i", "E-DI"))),
    ("reconstruction", "Reconstruction (`a photo of a {0} {1}`)",
     (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"), ("seg_clip_i", "R-CI"), ("seg_dino_i", "R-DI"))),
)
METRICS = ("clip_t", "clip_i", "dino_i", "seg_clip_i", "seg_dino_i")


class DreamBenchProtocol:
    name = "dreambench"
    kinds = KINDS
    metrics = METRICS
    reference_kinds = ()
    steps, guidance = 50, 7.5

    def __init__(self, folder: str | Path, prompts: str | Path | None = None, clip: str | Path | None = None,
                 clip_tokenizer: str | Path | None = None, dino: str | Path | None = None, images_per_prompt: int = 4,
                 prompt_limit: int | None = None, live_classes: Sequence[str] = LIVE_CLASSES,
                 sample_masks: str | Path | None = None, only: Sequence[str] | None = None):
        from customjax.evaluation.encoders import load_clip_encoder, load_dino

        self.folder = Path(folder)
        self.prompt_file = Path(prompts) if prompts else self.folder / "prompts_and_classes.txt"
        self.prompts = read_prompts(self.prompt_file)
        self.bench = read_subjects(self.folder, self.prompts, live_classes, only)
        self.subjects = {n: b.subject for n, b in self.bench.items()}
        self.jobs = make_jobs(self.bench, self.prompts, images_per_prompt, prompt_limit)
        self.images_per_prompt, self.prompt_limit = images_per_prompt, prompt_limit
        self.clip_enc = load_clip_encoder(clip, clip_tokenizer) if clip else None
        self.dino_enc = load_dino(dino) if dino else None
        self.clip_folder, self.dino_folder = clip, dino
        self.sample_masks = Path(sample_masks) if sample_masks else None
        self._cache: dict = {}

    @staticmethod
    def default_base():
        raise ValueError("--protocol dreambench needs --base (the diffusers folder the concepts were fine-tuned on)")

    def rendered(self, jobs):
        raise ValueError("DreamBench has no rendered targets: a 'reference' method applies to ShapeWorld only")

    def score(self, images, jobs, base, method: str = "") -> list[dict]:
        masks = None
        if self.sample_masks is not None:
            masks = []
            for im, j in zip(images, jobs):
                f = self.sample_masks / method / f"{j.key}.png"
                masks.append(load_mask(f, im.shape[:2]) if f.is_file() else None)
        rows = score(images, jobs, self.bench, self.clip_enc, self.dino_enc, masks, self._cache)
        for r, j in zip(rows, jobs):
            r.update(group=j.subjects[0], seed=j.seed)
        return rows

    def shares(self, results: dict, rows_by: dict) -> None:
        """No ceiling on real weights: nothing to share."""

    def claims(self, rows_by: dict, results: dict) -> list[dict]:
        return []

    def settings(self) -> dict:
        from collections import Counter
        return dict(subjects=list(self.subjects), jobs=dict(Counter(j.info["kind"] for j in self.jobs)),
                    prompt_file=str(self.prompt_file), images_per_prompt=self.images_per_prompt,
                    prompt_limit=self.prompt_limit, clip=str(self.clip_folder), dino=str(self.dino_folder),
                    live=[n for n, b in self.bench.items() if b.live],
                    masked=[n for n, b in self.bench.items() if b.masks is not None],
                    sample_masks=str(self.sample_masks) if self.sample_masks else None)

    def markdown(self, r: dict) -> str:
        from customjax.evaluation.report import table

        s = r["settings"]
        lines = ["# DreamBench protocol", "",
                 f"{len(s['subjects'])} subjects from `{self.folder}`, prompts `{s['prompt_file']}` "
                 f"({s['images_per_prompt']} images per subject and prompt); text-to-image methods: {r['steps']} steps, "
                 f"guidance {r['guidance']}, base `{r['base']}`. CLIP: `{s['clip']}`; DINO: `{s['dino']}`. Device: "
                 f"{r['device']['kind']}. Command: `{r['command']}`.", "",
                 "Mean [95% bootstrap interval over subjects]. CLIP-T: image to the prompt with the class word; CLIP-I / "
                 "DINO-I: mean cosine to the subject's real images; E- / R-: the same on segmented subjects (masks of the "
                 "real images and of the samples).", ""]
        for kind, title, cols in self.kinds:
            lines += [f"## {title}", ""] + table(r["methods"], kind, cols, (("unet_evaluations", "UNet evals / img"),
                                                                          ("seconds_per_image", "s / img"))) + [""]
        return "\n".join(lines) + "\n"

    def plots(self, r: dict, out: Path) -> None:
        from customjax.evaluation.report import frontier

        y = "dino_i" if self.dino_enc is not None else "clip_i"
        pts = [dict(label=m["label"], x=m["summary"]["edit"]["clip_t"], y=m["summary"]["edit"][y])
               for m in r["methods"].values() if "edit" in m["summary"] and "clip_t" in m["summary"]["edit"]
               and y in m["summary"]["edit"]]
        if pts:
            frontier(pts, out / "frontier.png", "CLIP-T (controllability)", f"{'DINO-I' if y == 'dino_i' else 'CLIP-I'} "
                     "(similarity)", "DreamBench: similarity against controllability (95% intervals over subjects)")

    def sheet(self, r: dict, store, path: Path) -> None:
        from customjax.evaluation.report import sample_sheet

        rows = []
        for name in self.subjects:
            j = next(j for j in self.jobs if j.subjects[0] == name and j.info["kind"] == "edit")
            tiles = [("reference", self.subjects[name].reference)]
            tiles += [(m["short"], store.image(k, j.key)) for k, m in r["methods"].items() if store.has(k, j.key)]
            rows.append(dict(title=f"{j.plain} (seed {j.seed})", tiles=tiles))
        sample_sheet(rows, path, min_size=128)
