"""Precomputed VAE latents: run the frozen VAE encoder over the training data once, so that training
does not encode the target image every step.

    python -m customjax.data.precompute --config configs/realcustompp.py:sdxl --out /data/latents \\
        --config.model.path /weights/sdxl --config.data.text_image /data/laion --config.data.multiview /data/mv
    python -m customjax.train --config configs/realcustompp.py:sdxl --config.data.latents /data/latents ...

The command reads the data the training config reads (``config.data``: its shard paths, or the
synthetic tiny data) and the VAE it trains with (``config.model``, same dtype), and writes per kind
``OUT/<kind>/<kind>-partNNNNN-SSSSS-of-SSSSS.array_record`` plus ``OUT/precompute-partNNNNN.json``
(settings, counts and a fingerprint of the VAE parameters, which training checks). Split a large
dataset over independent jobs (hosts) with ``--part K --num_parts N``: part K covers records
``[K n / N, (K + 1) n / N)`` of each kind, so the parts together keep the original record order.

Record format: the record of :mod:`customjax.data.records`, unchanged (caption, the encoded
frames, masks, ...), plus one key ``latents`` (:func:`~customjax.data.records.with_latents`,
:func:`~customjax.data.records.read_latents`), a map::

    {"v": 1, "image_size": [H, W], "shape": [h, w, c], "dtype": "float16",
     "mean": [bin | nil per frame], "logvar": [bin | nil per frame]}

``mean`` / ``logvar`` are the raw (unscaled) parameters of the VAE posterior of every frame's
centre crop at the training resolution ``config.train.image_size`` (``nil``: the frame does not
decode), row-major ``shape`` arrays of ``dtype`` (``--dtype``, float16 by default; float32 gives
the exact values). Storing the posterior rather than one draw keeps training stochastic as
before (the train step draws ``z = mean + exp(logvar / 2) * eps`` with its own key and scales it),
and ``mean`` alone decodes to the image. The frames stay in the record because the reference is
still cut from them every step (RealCustom++'s Eq. 11 crop changes with the step, so reference
encoder features cannot be precomputed); a precomputed shard is also a valid plain shard.

Training with ``config.data.latents=OUT`` reads ``OUT/<kind>`` instead of ``config.data.<kind>``;
its batches carry ``latent_mean`` / ``latent_logvar`` instead of ``image``. The target is then
always the centre crop, unflipped: ``data.random_crop`` and ``data.hflip`` (image-side
augmentation of the target) are ignored. Everything else (mixture, curriculum, references,
captions, condition dropout) is unchanged; with float32 latents and the same VAE a step computes
the same loss as the image path with ``data.hflip=False``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from customjax.data.records import (
    KINDS, LATENTS_VERSION, Example, RecordError, ShardedWriter, decode, find_shards, with_latents)

log = logging.getLogger(__name__)

FORMAT_VERSION = LATENTS_VERSION
DTYPES = ("float16", "bfloat16", "float32")
MANIFEST_GLOB = "precompute-part*.json"


def read_manifests(folder: str | os.PathLike) -> list[dict]:
    manifests = [json.loads(p.read_text()) for p in sorted(Path(folder).glob(MANIFEST_GLOB))]
    if not manifests:
        raise FileNotFoundError(f"{folder}: no {MANIFEST_GLOB}; write precomputed latents with "
                                "python -m customjax.data.precompute")
    return manifests


def latent_sources(folder: str | os.PathLike, image_size: tuple[int, int] | None = None) -> dict:
    """``{kind: shard folder}`` of a precompute output, checked against the training ``image_size``
    and for complete parts."""
    manifests = read_manifests(folder)
    n = {m["num_parts"] for m in manifests}
    parts = sorted(m["part"] for m in manifests)
    if len(n) != 1 or parts != list(range(n.pop())):
        raise ValueError(f"{folder}: incomplete precompute, parts {parts} of {[m['num_parts'] for m in manifests]}")
    sizes = {tuple(m["image_size"]) for m in manifests}
    if image_size is not None and sizes != {tuple(image_size)}:
        raise ValueError(f"{folder}: latents precomputed at image size {sorted(sizes)}, but "
                         f"config.train.image_size is {tuple(image_size)}; precompute again at that size")
    out = {}
    for kind in KINDS:
        if (Path(folder) / kind).is_dir():
            try:
                find_shards(Path(folder) / kind)
            except FileNotFoundError:
                continue
            out[kind] = str(Path(folder) / kind)
    return out


def vae_fingerprint(params) -> str:
    """A short hash of VAE parameters (names, shapes, dtypes, values): training checks that the
    latents came from its VAE."""
    from flax import traverse_util

    h = hashlib.sha256()
    for k, v in sorted(traverse_util.flatten_dict(params).items()):
        a = np.asarray(v)
        h.update(f"{'/'.join(k)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def check_vae(folder: str | os.PathLike, vae_params) -> None:
    """Raises when the latents in ``folder`` were computed with other VAE parameters."""
    got = vae_fingerprint(vae_params)
    for m in read_manifests(folder):
        if m["vae_fingerprint"] != got:
            raise ValueError(f"{folder}: latents were computed with another VAE (fingerprint {m['vae_fingerprint']}, "
                             f"this run's {got}: other weights or model.dtype); precompute again")


# ----------------------------------------------------------------------------------------------------------
# The command.


def load_vae(config):
    """(VAE module, parameters) of the base model training uses (:func:`customjax.base_model.base_pipeline`)."""
    from customjax.base_model import base_pipeline

    pipe, params = base_pipeline(config)
    return pipe.vae, params["vae"]


def center_crop(frame, where: str, size: tuple[int, int]) -> np.ndarray:
    """The training transform's target without augmentation (:func:`~customjax.data.images.target_crop` at
    the centre of the frame decoded by :func:`~customjax.data.images.open_target`), uint8 (H, W, 3);
    raises :class:`~customjax.data.images.ImageError`."""
    from customjax.data import images

    im, orig = images.open_target(frame, where, size)
    return images.target_crop(im, orig, size)[0]


def _encoded_frames(example: Example) -> Example:
    """``example`` with pixel-array frames / masks (e.g. from TFDS) PNG-encoded, so it can be written."""
    import io

    from PIL import Image

    def png(a):
        if a is None or isinstance(a, (bytes, bytearray)):
            return a
        buf = io.BytesIO()
        a = np.asarray(a)
        Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
        return buf.getvalue()

    masks = None if example.masks is None else tuple(png(m) for m in example.masks)
    return Example(kind=example.kind, caption=example.caption, frames=tuple(png(f) for f in example.frames),
                   names=example.names, masks=masks, object_id=example.object_id, source=example.source)


def precompute(config, out: str | os.PathLike, *, batch: int = 16, dtype: str = "float16", part: int = 0,
               num_parts: int = 1, num_shards: int = 1) -> dict:
    """Writes part ``part`` of ``num_parts`` of the precomputed latents of ``config``'s data to ``out``;
    returns the manifest (also written to ``out/precompute-partNNNNN.json``)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from customjax import parallel
    from customjax.data import curriculum, images
    from customjax.data.loader import _pair, train_sources
    from customjax.data.sources import as_source, where as where_of
    from customjax.data.transforms import Skipped

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {DTYPES}")
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} not in [0, {num_parts})")
    t0 = time.time()
    out = Path(out)
    size = _pair(config.train.image_size)
    vae, vae_params = load_vae(config)
    mesh = parallel.data_mesh()
    n = parallel.batch_size_divisor(mesh)
    batch = max(batch, n)
    batch += -batch % n
    batch_sharding = NamedSharding(mesh, parallel.batch_spec(4))
    encode_fn = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"),
                        in_shardings=(NamedSharding(mesh, P()), batch_sharding),
                        out_shardings=(batch_sharding, batch_sharding))  # fetched shard by shard
    vae_params = parallel.replicate(vae_params, mesh)
    needs = curriculum.recipe(config.data.get("recipe", "curriculum")).needs
    counts: dict = {}
    for kind, data in train_sources(config).items():
        if kind not in needs:
            continue
        src = as_source(data)
        lo, hi = len(src) * part // num_parts, len(src) * (part + 1) // num_parts
        skipped = collections.Counter()
        queue: collections.deque = collections.deque()    # [example, means, logvars, frames left]
        frames: list = []                                 # (queue entry, frame index, pixels)

        def run(chunk):
            x = np.zeros((batch, *size, 3), np.float32)
            for j, (_, _, px) in enumerate(chunk):
                x[j] = px.astype(np.float32) / 127.5 - 1.0
            mean, logvar = jax.device_get(encode_fn(vae_params, x))
            for j, (entry, fi, _) in enumerate(chunk):
                entry[1][fi], entry[2][fi] = mean[j], logvar[j]
                entry[3] -= 1

        with ShardedWriter(out / kind, f"{kind}-part{part:05d}", num_shards) as writer:
            def flush():
                while queue and queue[0][3] == 0:
                    ex, means, logvars, _ = queue.popleft()
                    writer.write(with_latents(ex, size, means, logvars, dtype))

            for i in range(lo, hi):
                rec, where = src[i], where_of(src, i)
                if isinstance(rec, Skipped):
                    skipped[rec.reason] += 1
                    continue
                try:
                    ex = rec if isinstance(rec, Example) else decode(rec, where)
                except RecordError as e:
                    log.warning("skipped: %s", e)
                    skipped["bad_record"] += 1
                    continue
                entry = [_encoded_frames(ex), [None] * len(ex.frames), [None] * len(ex.frames), 0]
                pending = []
                for fi, frame in enumerate(ex.frames):
                    try:
                        pending.append((entry, fi, center_crop(frame, f"{where} frame {fi}", size)))
                    except images.ImageError as e:
                        skipped["bad_frame"] += 1
                        log.warning("frame without latents: %s", e)
                if not pending:
                    skipped["undecodable"] += 1
                    continue
                entry[3] = len(pending)
                queue.append(entry)
                frames.extend(pending)
                while len(frames) >= batch:
                    run(frames[:batch])
                    frames = frames[batch:]
                    flush()
            if frames:
                run(frames)
                frames = []
            flush()
            counts[kind] = dict(records=writer.count, source_records=hi - lo, skipped=dict(skipped),
                                source=repr(src))
        log.info("%s: %d records written, skipped %s", kind, counts[kind]["records"], dict(skipped))
    vae_cfg = vae.config
    manifest = dict(format=FORMAT_VERSION, part=part, num_parts=num_parts, image_size=list(size), dtype=dtype,
                    latent_channels=int(vae_cfg.latent_channels), model_path=config.model.path,
                    model_random=config.model.random if not config.model.path else "", model_dtype=config.model.dtype,
                    vae_fingerprint=vae_fingerprint(jax.device_get(vae_params)), kinds=counts,
                    seconds=round(time.time() - t0, 2))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"precompute-part{part:05d}.json").write_text(json.dumps(manifest, indent=2))
    return manifest


PROG = "customjax.data.precompute"


def main(argv) -> None:
    from absl import flags

    from customjax.cli import fail

    FLAGS = flags.FLAGS
    del argv
    if FLAGS.config is None:
        fail(PROG, "--config is required, e.g. --config configs/realcustompp.py:tiny")
    m = precompute(FLAGS.config, FLAGS.out, batch=FLAGS.batch, dtype=FLAGS.dtype, part=FLAGS.part,
                   num_parts=FLAGS.num_parts, num_shards=FLAGS.num_shards)
    print(json.dumps({k: m[k] for k in ("part", "num_parts", "image_size", "dtype", "kinds", "seconds")}))


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "method config file[:variant] (the training config)",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("batch", 16, "images per VAE call (a multiple of the device count)", lower_bound=1)
    flags.DEFINE_enum("dtype", "float16", DTYPES, "storage dtype of mean / logvar")
    flags.DEFINE_integer("part", 0, "this job's part (0 .. num_parts - 1)", lower_bound=0)
    flags.DEFINE_integer("num_parts", 1, "independent jobs that split the data", lower_bound=1)
    flags.DEFINE_integer("num_shards", 1, "ArrayRecord shards per kind and part", lower_bound=1)
    flags.register_multi_flags_validator(["part", "num_parts"], lambda f: f["part"] < f["num_parts"],
                                         "--part must be less than --num_parts")


if __name__ == "__main__":
    from absl import app

    from customjax.cli import parse_flags

    define_flags()
    app.run(main, flags_parser=parse_flags(PROG, ("config",)))
