"""Concept folders and the per-step batches of per-concept fine-tuning.

A concept folder holds a few images of one concept (``*.png`` / ``*.jpg`` / ``*.jpeg`` / ``*.webp``,
read in name order), optionally ``masks/<image stem>.png`` (the concept's pixels),
``regions/<image stem>/<caption>.png`` (masks of captioned parts of the concept, e.g. ``red_hat.png``:
"red hat"; CLIF's R-Aug) and ``concept.json`` (``{"class": "dog"}``: the class word of DreamBooth /
Custom Diffusion prompts, CLIF's super-category).
Images are centre-cropped to a square and resized.

Batches are a pure function of (seed, step, the concept's name) (:class:`ConceptBatches`): a resumed run
continues with exactly the batches it would have seen, and a concept trained in a stack sees what it
sees alone (its training noise too: :func:`concept_seed`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from customjax.data.images import ImageError, open_mask, open_rgb
from customjax.tokenizer import tokenize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class Concept:
    name: str                      # the folder's name
    images: np.ndarray             # (N, S, S, 3) float32 in [0, 1]
    masks: np.ndarray | None       # (N, S, S) float32 in [0, 1], or None
    class_word: str                # "" when the folder names none
    files: tuple[str, ...]
    regions: tuple = ()            # per image: ((caption, mask (S, S) float32), ...); () without regions/


def _square(im: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return im.crop(box).resize((size, size), resample)


def read_concept(folder: str | Path, size: int, class_word: str = "") -> Concept:
    """The images (and masks) of a concept folder at ``size`` px; errors name the file at fault."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"concept folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    images, masks = [], []
    mask_dir = folder / "masks"
    for f in files:
        try:
            im, _ = open_rgb(f.read_bytes(), str(f))
        except ImageError as e:
            raise ValueError(f"concept image {f}: {e}") from None
        images.append(np.asarray(_square(im, size), np.float32) / 255.0)
        if mask_dir.is_dir():
            m = mask_dir / f"{f.stem}.png"
            if not m.is_file():
                raise FileNotFoundError(f"{mask_dir} has masks but none for {f.name} (expected {m})")
            mk = open_mask(m.read_bytes(), str(m))
            if mk.size != im.size:
                raise ValueError(f"mask {m} is {mk.size[0]}x{mk.size[1]}, its image {f} {im.size[0]}x{im.size[1]}")
            masks.append(np.asarray(_square(mk, size, Image.BILINEAR), np.float32) / 255.0)
    regions = _regions(folder, files, size) if (folder / "regions").is_dir() else ()
    meta = folder / "concept.json"
    if meta.is_file():
        d = json.loads(meta.read_text())
        unknown = sorted(set(d) - {"class"})
        if unknown:
            raise ValueError(f"{meta}: unknown keys {unknown} (known: class)")
        class_word = class_word or str(d.get("class", ""))
    return Concept(folder.name, np.stack(images), np.stack(masks) if masks else None, class_word,
                   tuple(str(f) for f in files), regions)


def _regions(folder: Path, files: list[Path], size: int) -> tuple:
    """``regions/<image stem>/<caption>.png`` of each image (captions from the file names, ``_`` for
    spaces), at ``size`` px like their images; a sub-folder naming no image is an error."""
    root = folder / "regions"
    stems = {f.stem for f in files}
    stray = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in stems)
    if stray:
        raise ValueError(f"{root}: sub-folders {stray} name no image of the concept ({sorted(stems)})")
    out = []
    for f in files:
        d = root / f.stem
        parts = []
        for m in sorted(d.glob("*.png")) if d.is_dir() else []:
            mk = open_mask(m.read_bytes(), str(m))
            im_size = Image.open(f).size
            if mk.size != im_size:
                raise ValueError(f"region mask {m} is {mk.size[0]}x{mk.size[1]}, its image {f} {im_size[0]}x{im_size[1]}")
            parts.append((m.stem.replace("_", " "), np.asarray(_square(mk, size, Image.BILINEAR), np.float32) / 255.0))
        out.append(tuple(parts))
    return tuple(out)


def concept_seed(name: str) -> int:
    """A concept's own random stream (batches, noise), from its name: the same alone or in any stack."""
    import zlib
    return zlib.crc32(name.encode())


def concept_phrase(form: str, token: str, class_word: str) -> str:
    """The words that name the concept in a prompt: ``form`` with ``{token}`` and ``{class}``
    ("{token}": Textual Inversion; "{token} {class}": DreamBooth, Custom Diffusion)."""
    if "{class}" in form and not class_word:
        raise ValueError(f"concept.phrase={form!r} needs the concept's class word (--class_word or concept.json)")
    return form.replace("{token}", token).replace("{class}", class_word).strip()


class ConceptBatches:
    """Host batches for a stack of C concepts: ``batches(step)`` -> arrays with leading axes (C, B).

    Entries: ``latent_mean`` / ``latent_logvar`` (C, B, h, w, c) (2B with ``prior``: B class images follow): the VAE posterior of each example's
    image (flipped or not), from ``posteriors`` = (mean, logvar) (C, N, F, h, w, c) made once
    (:func:`posteriors`; F = 2 with ``concept.hflip``: [image, flipped]), ``ids`` (one (C, B, T) array), ``caption`` (B strings, concept
    0's, for logs); with auxiliary words (Contrastive Inversion): ``index`` (C, B) the image of each
    example, ``target_ids`` (the caption without A_i*), ``aux_ids`` (C, B, N, T) the prompts of the
    words A_j* alone; ``extra`` entries (e.g. ``image_embeds``, (C, N, P)) are repeated over B."""

    def __init__(self, concepts: Sequence[Concept], tokenizer, config, posteriors, *,
                 aux: Sequence[Sequence[str]] = (), extra: dict | None = None, prior=None):
        c = config.concept
        self.concepts, self.tokenizer, self.seed = list(concepts), tokenizer, int(config.seed)
        self.batch, self.templates, self.hflip = int(config.train.batch), tuple(c.templates), bool(c.hflip)
        self.phrases = [concept_phrase(c.phrase, c.token, k.class_word) for k in self.concepts]
        self.aux = [list(a) for a in aux]
        self.extra = extra or {}
        self.mean, self.logvar = (np.asarray(a) for a in posteriors)
        if self.mean.shape[2] != (2 if self.hflip else 1):
            raise ValueError(f"posteriors of {self.mean.shape[2]} flips; concept.hflip={self.hflip}")
        counts = {len(k.images) for k in self.concepts}
        if self.aux and len(counts) > 1:
            raise ValueError(f"concepts stacked with auxiliary words need equal image counts; got "
                             f"{ {k.name: len(k.images) for k in self.concepts} }")
        if self.aux:
            self.aux_ids = tokenize(tokenizer, [" ".join(a) for a in self.aux])        # (N, T): A_j* alone
        # DreamBooth's prior preservation: (mean, logvar) (C, M, h, w, c) of each concept's class images
        # made by the base, and their prompts per concept; B of them follow the B examples
        self.prior = prior
        if prior is not None:
            self.prior_ids = tokenize(tokenizer, list(prior[2]))                        # (C, T)

    def for_stage(self, stage, needs: Sequence[str]) -> "ConceptBatches":
        """The same batches in every stage."""
        return self

    def __call__(self, step: int) -> dict:
        B = self.batch
        out: dict = {"latent_mean": [], "latent_logvar": [], "ids": [], "index": [], "target_ids": []}
        captions = []
        for c, k in enumerate(self.concepts):
            rng = np.random.default_rng([self.seed, 7, step, concept_seed(k.name)])
            u_img, tmpl = rng.random(B), rng.integers(len(self.templates), size=B)
            flip = (rng.random(B) < 0.5) & self.hflip
            idx = (u_img * len(k.images)).astype(np.int64)
            out["latent_mean"].append(self.mean[c, idx, flip.astype(np.int64)])
            out["latent_logvar"].append(self.logvar[c, idx, flip.astype(np.int64)])
            target = [self.templates[t].format(self.phrases[c]) for t in tmpl]
            if self.aux:
                caps = [self.templates[t].format(f"{self.phrases[c]} {' '.join(self.aux[i])}") for t, i in zip(tmpl, idx)]
                out["target_ids"].append(tokenize(self.tokenizer, target))
            else:
                caps = target
            ids = tokenize(self.tokenizer, caps)
            if self.prior is not None:
                j = rng.integers(self.prior[0].shape[1], size=B)
                out["latent_mean"][-1] = np.concatenate([out["latent_mean"][-1], self.prior[0][c, j]])
                out["latent_logvar"][-1] = np.concatenate([out["latent_logvar"][-1], self.prior[1][c, j]])
                ids = np.concatenate([ids, np.repeat(self.prior_ids[c:c + 1], B, axis=0)])
            out["ids"].append(ids)
            out["index"].append(idx.astype(np.int32))
            captions.append(caps)
        arrays = {"latent_mean": np.stack(out["latent_mean"]), "latent_logvar": np.stack(out["latent_logvar"]),
                  "ids": (np.stack(out["ids"]),)}
        if self.aux:
            arrays.update(index=np.stack(out["index"]), target_ids=(np.stack(out["target_ids"]),),
                          aux_ids=(np.broadcast_to(self.aux_ids, (len(self.concepts), B) + self.aux_ids.shape).copy(),))
        for name, v in self.extra.items():      # (C, ...) -> (C, B, ...)
            arrays[name] = np.repeat(np.asarray(v)[:, None], B, axis=1)
        arrays["caption"] = captions[0]
        return arrays


def posteriors(pipe, vae_params, concepts: Sequence[Concept], hflip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, logvar) (C, N, F, h, w, c): the VAE posterior of every concept image, F = 2 with its
    horizontal flip; made once, so a training step runs no VAE encoder."""
    means, logvars = [], []
    for k in concepts:
        views = [k.images] + ([k.images[:, :, ::-1]] if hflip else [])
        m, lv = zip(*(encode_images(pipe, vae_params, v) for v in views))
        means.append(np.stack(m, 1))
        logvars.append(np.stack(lv, 1))
    return np.stack(means), np.stack(logvars)


def encode_images(pipe, vae_params, images: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(mean, logvar) (N, h, w, c): the VAE posterior of ``images`` (N, S, S, 3) in [0, 1], ``chunk`` at a time."""
    import jax.numpy as jnp

    enc = _encoder(pipe.vae)
    out = [enc(vae_params, jnp.asarray(np.ascontiguousarray(images[i:i + chunk]))) for i in range(0, len(images), chunk)]
    return np.concatenate([np.asarray(m) for m, _ in out]), np.concatenate([np.asarray(lv) for _, lv in out])


_ENCODERS: dict = {}


def _encoder(vae):
    """One jitted VAE encoder per VAE module (compiled once per image shape)."""
    import jax
    if id(vae) not in _ENCODERS:
        _ENCODERS[id(vae)] = (vae, jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method="encode")))
    return _ENCODERS[id(vae)][1]


class JointBatches:
    """Host batches of concepts learnt together in one model (CLIF), from their curated examples
    (:mod:`customjax.concepts.augment`): one stack entry (leading axis 1) of B examples, a pure function of
    (seed, step). ``for_stage(stage, needs)``: a stage whose method needs ``image_embeds`` (Eq. 5) draws
    B distinct examples of the contrastive kinds, with ``ids``, ``image_embeds`` (``embed`` of their images,
    computed once) and ``same`` (B, B) (equal captions); any other stage draws from the diffusion kinds,
    with ``latent_mean`` / ``latent_logvar`` (``encode`` of their images, once) and ``ids``."""

    def __init__(self, items, tokenizer, config, encode, embed):
        from customjax.concepts.augment import CONTRASTIVE, DIFFUSION

        self.seed, self.default_batch, self.tokenizer = int(config.seed), int(config.train.batch), tokenizer
        self.sets = {"contrastive": [x for x in items if x.kind in CONTRASTIVE],
                     "diffusion": [x for x in items if x.kind in DIFFUSION]}
        self.make = {"contrastive": embed, "diffusion": encode}
        self.cache: dict = {}

    def for_stage(self, stage, needs: Sequence[str]):
        import functools

        kind = "contrastive" if "image_embeds" in needs else "diffusion"
        items, B = self.sets[kind], int(stage.batch or self.default_batch)
        if not items:
            raise ValueError(f"stage {stage.name}: the curation made no {kind} examples (config.curation)")
        if kind == "contrastive" and B > len(items):
            raise ValueError(f"stage {stage.name}: batch {B} is more than the {len(items)} curated contrastive "
                             f"examples; lower config.stages.{stage.name}.batch or curate more")
        if kind not in self.cache:
            images = np.stack([x.image for x in items])
            self.cache[kind] = (tokenize(self.tokenizer, [x.caption for x in items]), self.make[kind](images))
        return functools.partial(self._batch, kind, B)

    def _batch(self, kind: str, B: int, step: int) -> dict:
        items = self.sets[kind]
        ids, made = self.cache[kind]
        rng = np.random.default_rng([self.seed, 11, step, kind == "contrastive"])
        caps = None
        if kind == "contrastive":
            idx = rng.choice(len(items), B, replace=False)
            caps = [items[i].caption for i in idx]
            same = np.all(ids[idx][:, None] == ids[idx][None], -1)        # equal captions: equal token ids
            out = {"ids": (ids[idx][None],), "image_embeds": np.asarray(made)[idx][None], "same": same[None]}
        else:
            idx = rng.integers(len(items), size=B)
            caps = [items[i].caption for i in idx]
            out = {"latent_mean": made[0][idx][None], "latent_logvar": made[1][idx][None], "ids": (ids[idx][None],)}
        out["caption"] = caps
        return out
