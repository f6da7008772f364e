"""The training input pipeline: a per-process, deterministic, checkpointable grain pipeline.

:func:`make_loader` returns a ``grain.IterDataset``; ``it = iter(ds)`` yields local batches (dicts of
numpy arrays, leading dimension ``global_batch_size // process_count``), and ``it.get_state()`` /
``it.set_state(state)`` (a JSON-able dict; or orbax with ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore``) resume it with the same subsequent batches. Close iterators of pipelines
with workers (``it.close()``) to release their processes. :func:`customjax.data.training.make_train_loader` builds the
pipeline from a method config and wraps it in a :class:`TrainLoader` (``peek``, skip totals).

Determinism and sharding. Global element ``g`` is a pure function of ``(seed, g)`` (record choice
by :class:`~customjax.data.mixture.Mixture`, augmentation by :func:`~customjax.data.transforms.element_rng`)
and belongs to step ``step_offset + g // global_batch_size`` (which drives Eqs. 10-11). Process
``p`` of ``P`` reads positions ``[p * B, (p + 1) * B)`` of every global batch (``B`` the local batch):
the processes read disjoint elements, and the global batch of a step is the same for any number
of processes and workers. A skipped record shifts the later elements of that worker's stream by one
(it is replaced by the next element, whose step is at most one batch later).

Per batch: ``image`` (B, H, W, 3) float32 in [-1, 1] (or, from precomputed latents, ``latent_mean`` /
``latent_logvar`` (B, h, w, c) in their stored dtype); ``reference`` (B, R, R, 3) float32 in [0, 1];
``caption`` (B,) str; ``is_multiview`` (B,) bool; ``step`` (B,) int32; ``index`` (B,) int64;
``original_size`` / ``crop_top_left`` (B, 2) int32 (SDXL micro-conditioning); ``skipped`` (B, 6) int32
(see :mod:`~customjax.data.transforms`); ``mask`` (B, H, W) float32 with ``with_mask``. Captions are
tokenized on the host by the training loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Mapping, Sequence

import grain
import numpy as np

from customjax.data import curriculum, transforms
from customjax.data.mixture import INFINITE, Mixture
from customjax.data.records import KINDS
from customjax.data.sources import as_source

log = logging.getLogger(__name__)

MAX_SKIP_RATIO = 0.5  # raise when more than this fraction of a window of 1000 elements is skipped
READ_THREADS = 2       # decoding threads of the in-process pipeline (num_workers=0)


class StepAligned(grain.sources.RandomAccessDataSource):
    """Index ``i`` of this process's pipeline -> the mixture element it must read.

    grain hands worker ``w`` of ``W`` the indices ``i = w (mod W)`` and interleaves the workers'
    batches round-robin, so local batch ``n = (i // W // B) * W + i % W`` holds ``i`` at position
    ``j = (i // W) % B``; it reads global element ``n * G + p * B + j``. For a finite pass
    (``aligned=False``) process ``p`` reads elements ``p, p + P, p + 2P, ...`` below ``mixture.length``.
    """

    def __init__(self, mixture: Mixture, process_index: int, process_count: int, num_workers: int,
                 local_batch_size: int, aligned: bool = True):
        self.mixture, self.p, self.P = mixture, process_index, process_count
        self.W, self.B, self.aligned = max(num_workers, 1), local_batch_size, aligned
        self.G = local_batch_size * process_count
        n = len(mixture)
        self._len = n // process_count if aligned else max(0, (n - process_index + process_count - 1) // process_count)

    def global_index(self, i: int) -> int:
        if not self.aligned:
            return i * self.P + self.p
        k = i // self.W
        n = (k // self.B) * self.W + i % self.W
        return n * self.G + self.p * self.B + k % self.B

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        return self.mixture[self.global_index(int(i))]

    def __repr__(self) -> str:
        return f"StepAligned({self.mixture!r}, process={self.p}/{self.P}, workers={self.W}, aligned={self.aligned})"


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def make_loader(
    sources: Mapping[str, object],
    *,
    global_batch_size: int,
    image_size: int | Sequence[int],
    reference_size: int | None = None,
    total_steps: int,
    recipe: str | curriculum.Recipe = "curriculum",
    seed: int = 0,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    step_offset: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    min_size: int = 0,
    random_crop: bool = False,
    hflip: bool = True,
    with_mask: bool = False,
    latents: bool = False,
    subject_reference: bool = False,
) -> grain.IterDataset:
    """The pipeline of local batches (see the module docstring).

    Args:
      sources: ``{"text_image": data, "multiview": data}``, ``data`` a shard folder / glob / file, a
        list of them, or a record source (e.g. :class:`~customjax.data.sources.TfdsSource`); kinds the
        recipe does not read may be omitted.
      global_batch_size: batch over all processes; must divide by ``process_count``.
      image_size: target size ``H`` or ``(H, W)``; ``reference_size`` the reference side (default ``H``).
      total_steps: ``S_total`` of Eqs. 10-11; ``step_offset`` is added to the step derived from the index.
      recipe: a :class:`~customjax.data.curriculum.Recipe` or preset name (``table10_no1`` ..
        ``table10_no6``, ``curriculum``, ``text_image``).
      num_epochs: ``None`` for an endless stream; else a finite pass over the (single) source kind,
        ``num_epochs`` times, not step-aligned (evaluation, auditing).
      min_size: images whose short side is smaller are skipped (``too_small``); the pipeline raises when
        more than :data:`MAX_SKIP_RATIO` of a window of 1000 elements is skipped.
      num_workers: grain worker processes per host (0: in-process, :data:`READ_THREADS` threads decode).
      latents: the sources hold records written by :mod:`customjax.data.precompute` at ``image_size``
        (:func:`~customjax.data.precompute.latent_sources` checks that); batches carry the target's
        precomputed VAE posterior ``latent_mean`` / ``latent_logvar`` (B, h, w, c) instead of ``image``.
        The target is then the centre crop, unflipped (``random_crop`` and ``hflip`` are ignored, with
        a log line when set); the reference is cut from the stored frames as usual (Eq. 11).
      subject_reference: multiview references are cut to the subject's mask first
        (:class:`~customjax.data.transforms.Augment`).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} does not divide by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if latents and (random_crop or hflip):
        log.info("precomputed latents: the target is the centre crop, unflipped; random_crop=%s / hflip=%s "
                 "do not apply", random_crop, hflip)
        random_crop = hflip = False
    local_batch = global_batch_size // process_count
    recipe = curriculum.recipe(recipe)
    srcs = {kind: as_source(data) for kind, data in sources.items()}
    size = _pair(image_size)
    length = INFINITE
    if num_epochs is not None:
        kinds = [k for k in recipe.needs if k in srcs]
        if len(kinds) != 1:
            raise ValueError(f"a finite pass (num_epochs) needs a single-kind recipe, got {recipe.data!r}")
        length = num_epochs * len(srcs[kinds[0]])
    mixture = Mixture(srcs, recipe, total_steps, global_batch_size, seed=seed, step_offset=step_offset,
                      shuffle=shuffle, length=length)
    view = StepAligned(mixture, process_index, process_count, num_workers, local_batch, aligned=num_epochs is None)
    augment = transforms.Augment(
        image_size=size, reference_size=int(reference_size or size[0]), total_steps=total_steps, seed=seed,
        recipe=recipe, min_size=min_size, random_crop=random_crop, hflip=hflip, with_mask=with_mask,
        latents=latents, subject_reference=subject_reference)

    ds = grain.MapDataset.source(view).map(transforms.ParseRecord(latents=latents)).map(augment)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * local_batch))
    ds = ds.filter(transforms.DropSkipped())
    # Fail instead of spinning when (almost) everything is bad; grain checks windows of 1000 elements.
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(
        filter_warn_threshold_ratio=0.1, filter_raise_threshold_ratio=MAX_SKIP_RATIO))
    ds = ds.batch(local_batch, drop_remainder=drop_remainder).map(transforms.ToFloat())
    if num_workers > 0:
        _mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=2))
    return ds


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app (tests, notebooks) mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class SkipCounter:
    """Host-side totals of the ``skipped`` field of the batches seen: ``update(batch)`` per batch."""

    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(transforms.SKIP_REASONS), np.int64))

    def update(self, batch) -> None:
        self.counts += np.asarray(batch["skipped"]).reshape(-1, len(transforms.SKIP_REASONS)).sum(0)

    @property
    def by_reason(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(transforms.SKIP_REASONS, self.counts)}

    @property
    def records(self) -> int:
        """Records dropped (excluding replaced frames / masks)."""
        return int(sum(self.by_reason[r] for r in transforms.RECORD_SKIP_REASONS))


class TrainLoader:
    """An iterator of local batches over a :func:`make_loader` pipeline, for the training loop.

    ``peek()`` returns the next batch without consuming it (for shapes); ``get_state()`` (JSON-able)
    and ``set_state()`` checkpoint the position (a peeked batch is not yet consumed); ``skips``
    totals the ``skipped`` field of the batches consumed. ``close()`` stops worker processes.
    """

    def __init__(self, dataset: grain.IterDataset):
        self.dataset = dataset
        self._it = iter(dataset)
        self._peeked = None  # (state before the batch, batch)
        self.skips = SkipCounter()

    def peek(self) -> dict:
        if self._peeked is None:
            state = self._it.get_state()
            self._peeked = (state, next(self._it))
        return self._peeked[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._peeked is not None:
            batch, self._peeked = self._peeked[1], None
        else:
            batch = next(self._it)
        self.skips.update(batch)
        return batch

    def get_state(self) -> dict:
        return self._peeked[0] if self._peeked is not None else self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._peeked = None
        self._it.set_state(state)

    def close(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()


def cache_dir() -> pathlib.Path:
    """Where generated datasets are kept: ``$CUSTOMJAX_CACHE``, else ``$XDG_CACHE_HOME/customjax``, else
    ``~/.cache/customjax``."""
    if os.environ.get("CUSTOMJAX_CACHE"):
        return pathlib.Path(os.environ["CUSTOMJAX_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "customjax"


def generated_sources(generator: str, n: int, size: int, seed: int) -> dict:
    """``{kind: shard folder}`` of a generated training set (``generator``: a name registered in
    :mod:`customjax.data.generators`; ``n`` text-image pairs and ``max(n // 4, 2)`` multiview objects of ``size`` px),
    written once under :func:`cache_dir` in a folder named by the arguments and a hash of the
    generator's code (a changed generator writes a new folder). It is written into a temporary sibling and renamed into place, so concurrent
    processes (hosts, resumed runs) never see a partial folder; the first rename wins."""
    import importlib

    from customjax.data.generators import get_generator

    gen = get_generator(generator)
    h = hashlib.sha256()
    for module in (*gen.modules, "customjax.data.records"):  # the code that writes the bytes
        h.update(pathlib.Path(importlib.import_module(module).__file__).read_bytes())
    tag = h.hexdigest()[:12]
    root = cache_dir() / "data"
    final = root / f"{generator}-n{n}-size{size}-seed{seed}-{tag}"
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
        try:
            gen.write(tmp, n, max(n // 4, 2), size, seed)  # a quarter as many multiview objects
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # not a lost race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {kind: str(final / kind) for kind in KINDS if (final / kind).is_dir()}


def train_sources(config) -> dict:
    """``{kind: data}`` of the raw training data of a method config: ``config.data.text_image`` /
    ``multiview`` shard paths, or (both empty) a generated dataset (:func:`generated_sources`, the
    same on every process and every call) of the registered ``config.data.generator``
    (:mod:`customjax.data.generators`): ``config.data.examples`` text-image pairs and a quarter as many
    multiview objects at ``config.data.size`` px (0: ``config.train.image_size``)."""
    d = config.data
    sources = {k: d.get(k) for k in ("text_image", "multiview") if d.get(k)}
    if sources:
        return sources
    if not d.get("generator", ""):
        raise ValueError("config.data.text_image / config.data.multiview are empty and config.data.generator "
                         "names no generated dataset")
    size = int(d.get("size", 0)) or int(config.train.image_size)
    return generated_sources(d.generator, int(d.get("examples", 64)), size, int(config.seed))

