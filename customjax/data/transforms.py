"""Grain transforms of the training pipeline (module-level and picklable, for multi-worker loading).

Per element: :class:`ParseRecord` (msgpack -> :class:`~customjax.data.records.Example`),
:class:`Augment` (decode, pick views, target crop/flip, Eq. 11 reference crop),
:class:`DropSkipped` (a grain ``Filter`` that drops and counts bad records); per batch :class:`ToFloat`.

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
from customjax.data.records import Example, RecordError, from_map, read_latents, unpack

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
    (:func:`customjax.data.records.read_latents`, from the same unpacked map; a record without them
    is ``bad_record``)."""

    def __init__(self, latents: bool = False):
        self.latents = latents

    def map(self, element):
        rec, where = element["record"], element["where"]
        if isinstance(rec, Skipped):
            return rec
        lat = None
        try:
            if isinstance(rec, Example):
                example = rec
            else:
                d = unpack(rec, where)
                example = from_map(d, where)
                if self.latents:
                    lat = read_latents(d, where)
            if self.latents and lat is None:
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

    * target ``image`` (H, W, 3): resized to cover ``image_size``, centre or random crop, random flip
      (:func:`~customjax.data.images.target_crop` of the frame decoded at the target's own scale);
    * ``reference`` (R, R, 3): for multiview a different frame than the target when one decodes (the
      re-contextualisation pair), else the same frame; the centre square is resized to ``R * r`` and
      an R x R window cropped at random, with ``r`` from the recipe's crop mode (Eq. 11);
    * ``mask`` (H, W) of the target frame (all 255 without a mask) when ``with_mask``.
    * ``subject_reference``: a multiview reference frame with a mask is first cut to its subject
      (:func:`~customjax.data.images.subject_cutout`: object-centric, on a neutral fill), as the
      reference images users give at sampling time; the Eq. 11 crop then applies to the cut-out.

    Also ``caption``, ``is_multiview``, ``step``, ``index``, SDXL's ``original_size`` / ``crop_top_left``,
    and ``skipped`` (frames / masks replaced). Returns :class:`Skipped` for unusable records.

    With ``latents`` (records of :mod:`customjax.data.precompute`, parsed by ``ParseRecord(latents=True)``)
    the target is not cut from the frame: ``latent_mean`` / ``latent_logvar`` (h, w, c) of the chosen
    target frame replace ``image`` (precompute encoded its :func:`~customjax.data.images.target_crop` at the
    centre, unflipped), and only the target frame's header is read. The caller guarantees
    ``random_crop`` and ``hflip`` are off and the latents are at ``image_size`` (:func:`make_loader`,
    :func:`~customjax.data.precompute.latent_sources`). Frames, references, masks and sizes are exactly
    those of the image path.
    """

    image_size: tuple[int, int]
    reference_size: int
    total_steps: int
    seed: int = 0
    recipe: curriculum.Recipe = curriculum.Recipe()
    min_size: int = 0
    random_crop: bool = False
    hflip: bool = True
    with_mask: bool = False
    latents: bool = False
    subject_reference: bool = False

    def _target(self, ex: Example, fi: int, where: str, lat):
        """(frame index, decoded image or None with latents, original size) of a target candidate."""
        (H, W), frame = self.image_size, ex.frames[fi]
        if not self.latents:
            return (fi, *images.open_target(frame, where, (H, W), min_size=self.min_size))
        size = images.oriented_size(frame, where, min_size=self.min_size)
        if lat["mean"][fi] is None:  # precompute could not decode it: raise the reason the image path would
            images.open_target(frame, where, (H, W), min_size=self.min_size)
            raise images.ImageError("bad_record", f"{where}: no precomputed latents")
        return fi, None, size

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
        (H, W), R = self.image_size, self.reference_size
        side = max(R, round(R * ratio))
        target_scale = images.target_scale((H, W))

        cut = self.subject_reference and multiview and ex.masks is not None

        def reference_scale(h, w):  # also covers the target's need: one decode when they share a frame
            if cut:   # the cut-out's size depends on the mask's box, unknown before decoding: no reduction
                return 1.0
            return max(target_scale(h, w), side / min(h, w))

        def frame_where(fi):
            return f"{where} frame {ex.names[fi] if ex.names else fi}" if multiview else where

        lat = element.get("latents")
        target = reference = None  # (frame index, image, original size)
        errors = []
        for fi in map(int, order):
            try:
                if target is None:
                    target = self._target(ex, fi, frame_where(fi), lat)
                else:
                    reference = (fi, *images.open_rgb(ex.frames[fi], frame_where(fi), min_size=self.min_size,
                                                      scale=reference_scale))
                    break
            except images.ImageError as e:
                errors.append(e)
        if target is None:
            e = errors[0]
            return Skipped(e.reason, where, str(e))
        ti, t_im, t_size = target
        if reference is None:  # one usable frame: the reference comes from the target's frame
            unreduced = t_im is not None and t_im.size == (t_size[1], t_size[0])
            if unreduced or (t_im is not None and reference_scale(*t_size) <= target_scale(*t_size)):
                reference = target  # decoding at reference_scale would give the same pixels
            else:
                try:
                    reference = (ti, *images.open_rgb(ex.frames[ti], frame_where(ti), min_size=self.min_size,
                                                      scale=reference_scale))
                except images.ImageError as e:
                    return Skipped(e.reason, where, str(e))
        ri, r_im, r_size = reference
        skipped = skip_vector(bad_frame=len(errors))
        if cut and ex.masks[ri] is not None:
            try:
                cutout = images.subject_cutout(r_im, images.open_mask(ex.masks[ri], frame_where(ri)))
            except images.ImageError:
                cutout = None
            if cutout is None:   # undecodable or empty: the whole frame, counted
                skipped[_REASON_INDEX["bad_mask"]] += 1
            else:
                r_im, r_size = cutout

        box, top_left = images.cover_crop_box(t_size, (H, W), target_offset)
        if self.latents:
            out = {"latent_mean": lat["mean"][ti], "latent_logvar": lat["logvar"][ti]}
        else:
            out = {"image": images.target_crop(t_im, t_size, (H, W), target_offset)[0]}
        if self.with_mask:
            mask = np.full((H, W), 255, np.uint8)
            if ex.masks is not None and ex.masks[ti] is not None:
                try:
                    m = images.open_mask(ex.masks[ti], f"{where} frame {ti}")
                    mask = np.asarray(images.crop_resize(m, t_size, box, (H, W), images.Image.BILINEAR))
                except images.ImageError:
                    skipped[_REASON_INDEX["bad_mask"]] += 1
            out["mask"] = mask
        r_box = images.reference_crop_box(r_size, R, ratio, reference_offset)
        out["reference"] = np.asarray(images.crop_resize(r_im, r_size, r_box, (R, R)))
        if flip_target:
            out["image"] = out["image"][:, ::-1]
            if "mask" in out:
                out["mask"] = out["mask"][:, ::-1]
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


class ToFloat(grain.transforms.Map):
    """uint8 -> float32: ``image`` to [-1, 1] (the diffusion target), ``reference`` and ``mask`` to [0, 1]."""

    def map(self, element):
        if "image" in element:
            element["image"] = element["image"].astype(np.float32) / 127.5 - 1.0
        element["reference"] = element["reference"].astype(np.float32) / 255.0
        if "mask" in element:
            element["mask"] = element["mask"].astype(np.float32) / 255.0
        return element
