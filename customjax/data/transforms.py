"""Grain transforms of the training pipeline (module-level and picklable, for multi-worker loading).

Per element: :class:`ParseRecord` (msgpack -> :class:`~customjax.data.records.Example`),
:class:`Augment` (decode, pick views, target crop/flip, Eq. 11 reference crop),
:class:`DropSkipped` (a grain ``Filter`` that drops and counts bad records), optionally
:class:`Tokenize`; per batch :class:`ToFloat`.

Bad data never raises: a transform returns a :class:`Skipped` sentinel (reason + record) that
:class:`DropSkipped` removes. Skip counting works with any number of worker processes because the
count travels *in the data*: each worker's filter keeps the number of records it dropped since the
last element it let through and writes it into that element's ``skipped`` field (int32 vector over
:data:`SKIP_REASONS`). Summing ``batch["skipped"]`` over the batches a loader yields therefore
counts every dropped record once, except those a worker drops after its last yielded element (only
possible at the end of a finite pass). The ``bad_frame`` / ``bad_mask`` entries count frames and masks
replaced inside records that were still used; :data:`RECORD_SKIP_REASONS` are the dropped records.

Randomness is a pure function of ``(seed, global element index)`` (:func:`element_rng`), never of the
worker or process that computes it.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from customjax.data import curriculum, images
from customjax.data.records import Example, RecordError, decode

SKIP_REASONS = ("bad_record", "undecodable", "truncated", "too_small", "bad_frame", "bad_mask")
RECORD_SKIP_REASONS = SKIP_REASONS[:4]
_REASON_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}
_LOG_FIRST = 20  # skipped records logged per process

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Sentinel for a record that cannot be used: ``reason`` in :data:`RECORD_SKIP_REASONS`, ``where`` names it."""

    reason: str
    where: str
    message: str = ""


def element_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of global element ``index`` (Philox keyed by seed and index)."""
    return np.random.Generator(np.random.Philox(key=((int(seed) & (2**64 - 1)) << 64) | (int(index) & (2**64 - 1))))


def skip_vector(**counts: int) -> np.ndarray:
    v = np.zeros(len(SKIP_REASONS), np.int32)
    for reason, n in counts.items():
        v[_REASON_INDEX[reason]] += n
    return v


class ParseRecord(grain.transforms.Map):
    """``{"record": bytes | Example | Skipped, "kind", "where", ...}`` -> the same with an :class:`Example`,
    or a :class:`Skipped` (``bad_record``) for bytes that are not a schema record or of the wrong kind.
    With ``latents`` also ``"latents"``: the record's precomputed VAE posteriors
    (:func:`customjax.data.precompute.read_latents`; a record without them is ``bad_record``)."""

    def __init__(self, latents: bool = False):
        self.latents = latents

    def map(self, element):
        rec, where = element["record"], element["where"]
        if isinstance(rec, Skipped):
            return rec
        try:
            example = rec if isinstance(rec, Example) else decode(rec, where)
            if self.latents:
                from customjax.data.precompute import read_latents

                lat = read_latents(rec, where) if isinstance(rec, (bytes, bytearray)) else None
                if lat is None:
                    raise RecordError(f"{where}: no precomputed latents (write them with customjax.data.precompute)")
        except RecordError as e:
            return Skipped("bad_record", where, str(e))
        if example.kind != element["kind"]:
            return Skipped("bad_record", where, f"a {example.kind} record in a {element['kind']} source")
        out = {**element, "record": example}
        if self.latents:
            out["latents"] = lat
        return out


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.Map):
    """Decodes an example into fixed-shape uint8 arrays (see :class:`ToFloat` for the float outputs).

    * target ``image`` (H, W, 3): resized to cover ``image_size``, centre or random crop, random flip;
    * ``reference`` (R, R, 3): for multiview a different frame than the target when one decodes (the
      re-contextualisation pair), else the same frame; the centre square is resized to ``R * r`` and
      an R x R window cropped at random, with ``r`` from the recipe's crop mode (Eq. 11);
    * ``mask`` (H, W) of the target frame (all 255 without a mask) when ``with_mask``.

    Also ``caption``, ``is_multiview``, ``step``, ``index``, SDXL's ``original_size`` / ``crop_top_left``,
    and ``skipped`` (frames / masks replaced). Returns :class:`Skipped` for unusable records.

    With ``latents`` (records of :mod:`customjax.data.precompute`, parsed by ``ParseRecord(latents=True)``)
    the target is not cut from the frame: ``latent_mean`` / ``latent_logvar`` (h, w, c) of the chosen
    target frame replace ``image`` (they were computed from its centre crop, unflipped; ``random_crop``
    and ``hflip`` must be off). Frames and the reference are chosen exactly as without.
    """

    image_size: tuple[int, int]
    reference_size: int
    total_steps: int
    seed: int = 0
    recipe: curriculum.Recipe = curriculum.Recipe()
    min_size: int = 0
    random_crop: bool = False
    hflip: bool = True
    reference_hflip: bool = False
    with_mask: bool = False
    mask_reference: bool = False
    latents: bool = False

    def __post_init__(self):
        if self.latents and (self.random_crop or self.hflip):
            raise ValueError("precomputed latents are centre crops: random_crop and hflip must be off")

    def map(self, element):
        if isinstance(element, Skipped):
            return element
        ex: Example = element["record"]
        step, where = int(element["step"]), element["where"]
        rng = element_rng(self.seed, element["index"])
        multiview = ex.kind == "multiview"
        order = rng.permutation(len(ex.frames)) if multiview else np.arange(1)
        ratio = self.recipe.crop_ratio(step, self.total_steps, rng)
        target_offset = tuple(rng.uniform(size=2)) if self.random_crop else (0.5, 0.5)
        reference_offset = tuple(rng.uniform(size=2))
        flip_target = self.hflip and rng.uniform() < 0.5
        flip_reference = self.reference_hflip and rng.uniform() < 0.5
        (H, W), R = self.image_size, self.reference_size
        side = max(R, round(R * ratio))

        def scale(h, w):  # the largest resize factor any crop of this frame needs
            return max(H / h, W / w, side / min(h, w))

        decoded, errors = [], []
        for fi in order:
            name = ex.names[fi] if ex.names else str(fi)
            fwhere = f"{where} frame {name}" if multiview else where
            try:
                decoded.append((int(fi),) + images.open_rgb(ex.frames[fi], fwhere, min_size=self.min_size, scale=scale))
            except images.ImageError as e:
                errors.append(e)
            if len(decoded) == 2:
                break
        if not decoded:
            e = errors[0]
            return Skipped(e.reason, where, str(e))
        ti, t_im, t_size = decoded[0]
        ri, r_im, r_size = decoded[-1]
        skipped = skip_vector(bad_frame=len(errors))

        box, top_left = images.cover_crop_box(t_size, (H, W), target_offset)
        if self.latents:
            lat = element["latents"]
            if tuple(lat["image_size"]) != (H, W):
                raise ValueError(f"{where}: latents precomputed at {tuple(lat['image_size'])}, training at {(H, W)}")
            if lat["mean"][ti] is None:
                return Skipped("bad_record", where, f"frame {ti} has no precomputed latents")
            out = {"latent_mean": lat["mean"][ti], "latent_logvar": lat["logvar"][ti]}
        else:
            out = {"image": np.asarray(images.crop_resize(t_im, t_size, box, (H, W)))}
        masks = ex.masks or (None,) * len(ex.frames)
        if self.with_mask:
            mask = np.full((H, W), 255, np.uint8)
            if masks[ti] is not None:
                try:
                    m = images.open_mask(masks[ti], f"{where} frame {ti}")
                    mask = np.asarray(images.crop_resize(m, t_size, box, (H, W), images.Image.BILINEAR))
                except images.ImageError:
                    skipped[_REASON_INDEX["bad_mask"]] += 1
            out["mask"] = mask
        r_box = images.reference_crop_box(r_size, R, ratio, reference_offset)
        reference = images.crop_resize(r_im, r_size, r_box, (R, R))
        if self.mask_reference and masks[ri] is not None:
            try:
                m = images.crop_resize(images.open_mask(masks[ri], f"{where} frame {ri}"), r_size, r_box, (R, R),
                                       images.Image.BILINEAR)
                reference = images.Image.composite(reference, images.Image.new("RGB", (R, R), (255, 255, 255)), m)
            except images.ImageError:
                skipped[_REASON_INDEX["bad_mask"]] += 1
        out["reference"] = np.asarray(reference)
        if flip_target:
            out["image"] = out["image"][:, ::-1]
            if "mask" in out:
                out["mask"] = out["mask"][:, ::-1]
        if flip_reference:
            out["reference"] = out["reference"][:, ::-1]
        out = {k: np.ascontiguousarray(v) for k, v in out.items()}
        out.update(
            caption=ex.caption, is_multiview=np.bool_(multiview), step=np.int32(step),
            index=np.int64(element["index"]), original_size=np.array(t_size, np.int32),
            crop_top_left=np.array(top_left, np.int32), skipped=skipped)
        return out


class DropSkipped(grain.transforms.Filter):
    """Drops :class:`Skipped` sentinels and adds the number dropped since the previous kept element (of
    this worker) to the kept element's ``skipped`` vector. Must run sequentially (after
    ``to_iter_dataset``), once per worker: each worker process owns a copy."""

    def __init__(self):
        self._pending = np.zeros(len(SKIP_REASONS), np.int32)
        self._logged = 0

    def filter(self, element) -> bool:
        if isinstance(element, Skipped):
            self._pending[_REASON_INDEX[element.reason]] += 1
            if self._logged < _LOG_FIRST:
                self._logged += 1
                msg = element.message
                if not msg.startswith(element.where):
                    msg = f"{element.where}: {msg}"
                log.warning("skipped a record (%s): %s", element.reason, msg)
            return False
        element["skipped"] = element["skipped"] + self._pending
        self._pending = np.zeros_like(self._pending)
        return True


class Tokenize(grain.transforms.Map):
    """Adds ``input_ids`` (and ``input_ids_2``, ... for more tokenizers, e.g. SDXL's two) of the caption;
    tokenizers load lazily from their folders in each worker."""

    def __init__(self, paths):
        self.paths = (paths,) if isinstance(paths, str) else tuple(str(p) for p in paths)
        self._tokenizers = None

    def __getstate__(self):
        return {"paths": self.paths, "_tokenizers": None}

    def map(self, element):
        from customjax.tokenizer import load_tokenizer, tokenize

        if self._tokenizers is None:
            self._tokenizers = [load_tokenizer(p) for p in self.paths]
        for i, tok in enumerate(self._tokenizers):
            element["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenize(tok, element["caption"])[0]
        return element


class ToFloat(grain.transforms.Map):
    """uint8 -> float32: ``image`` to [-1, 1] (the diffusion target), ``reference`` and ``mask`` to [0, 1]."""

    def map(self, element):
        if "image" in element:
            element["image"] = element["image"].astype(np.float32) / 127.5 - 1.0
        element["reference"] = element["reference"].astype(np.float32) / 255.0
        if "mask" in element:
            element["mask"] = element["mask"].astype(np.float32) / 255.0
        return element
