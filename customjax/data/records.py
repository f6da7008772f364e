"""The training record schema and its ArrayRecord shards.

One record is one *example*: a text-image pair (one frame) or a multiview object (all of its
frames, so that picking a reference and a target view is a local operation on one record).
Records are serialised with msgpack (language-neutral; no pickle) as a map with these keys:

=============  ===================  =========================================================
key            msgpack type         meaning
=============  ===================  =========================================================
``v``          int                  schema version (1)
``kind``       str                  ``"text_image"`` or ``"multiview"``
``caption``    str                  caption (UTF-8), may be empty
``frames``     array of bin         encoded images (JPEG/PNG/... bytes exactly as stored)
``names``      array of str         one name per frame (file stem), same length as ``frames``
``masks``      array of (bin|nil)   per-frame subject mask (encoded, single channel) or nil;
                                    the key is absent when there are no masks at all
``object_id``  str                  multiview object id (``""`` for text-image pairs)
``source``     str                  where the example came from (path), for error messages
``latents``    map (optional)       precomputed VAE posteriors of the frames (:func:`with_latents`,
                                    written by :mod:`customjax.data.precompute`)
=============  ===================  =========================================================

Shards are ``<name>-00000-of-00004.array_record`` (ArrayRecord, ``group_size:1`` so that every
record is individually seekable); record ``i`` of a conversion goes to shard ``i % num_shards``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from typing import Sequence

import msgpack
import numpy as np

SCHEMA_VERSION = 1
KINDS = ("text_image", "multiview")
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the record."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One decoded-from-msgpack (not yet image-decoded) training example.

    ``frames`` holds encoded image bytes, or uint8 arrays (H, W[, C]) when the example comes from
    a source that stores pixels (e.g. a tfds dataset); ``masks`` is ``None`` or one entry per frame.
    """

    kind: str
    caption: str
    frames: tuple
    names: tuple = ()
    masks: tuple | None = None
    object_id: str = ""
    source: str = ""

    def __post_init__(self):
        where = self.source or "<example>"
        if self.kind not in KINDS:
            raise RecordError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if not self.frames:
            raise RecordError(f"{where}: no frames")
        if self.names and len(self.names) != len(self.frames):
            raise RecordError(f"{where}: {len(self.names)} names for {len(self.frames)} frames")
        if self.masks is not None and len(self.masks) != len(self.frames):
            raise RecordError(f"{where}: {len(self.masks)} masks for {len(self.frames)} frames")


def to_map(example: Example) -> dict:
    """The msgpack map of ``example`` (frames must be encoded bytes): :func:`encode` packs it."""
    for i, f in enumerate(example.frames):
        if not isinstance(f, (bytes, bytearray)):
            raise RecordError(f"{example.source or '<example>'}: frame {i} is {type(f).__name__}, not encoded bytes")
    payload = {
        "v": SCHEMA_VERSION,
        "kind": example.kind,
        "caption": example.caption,
        "frames": [bytes(f) for f in example.frames],
        "names": list(example.names) or [str(i) for i in range(len(example.frames))],
        "object_id": example.object_id,
        "source": example.source,
    }
    if example.masks is not None:
        payload["masks"] = [None if m is None else bytes(m) for m in example.masks]
    return payload


def encode(example: Example) -> bytes:
    """The msgpack bytes of ``example`` (frames must be encoded bytes)."""
    return msgpack.packb(to_map(example), use_bin_type=True)


def unpack(data: bytes, where: str = "<record>") -> dict:
    """The msgpack map of a record (schema version checked); raises :class:`RecordError` naming ``where``."""
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise RecordError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise RecordError(f"{where}: record is a {type(d).__name__}, not a map")
    if d.get("v") != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema version {d.get('v')!r}, expected {SCHEMA_VERSION}")
    return d


def from_map(d: dict, where: str = "<record>") -> Example:
    """The :class:`Example` of an :func:`unpack` ed record map; raises :class:`RecordError` naming ``where``."""
    try:
        frames, masks, names = d["frames"], d.get("masks"), d.get("names", [])
        if not isinstance(d["caption"], str) or not isinstance(frames, list) or not isinstance(names, list):
            raise TypeError("caption must be a str, frames and names lists")
        if not all(isinstance(f, bytes) for f in frames) or (
                masks is not None and not all(m is None or isinstance(m, bytes) for m in masks)):
            raise TypeError("frames and masks must be binary")
        return Example(
            kind=d["kind"], caption=d["caption"], frames=tuple(frames), names=tuple(map(str, names)),
            masks=None if masks is None else tuple(masks), object_id=str(d.get("object_id", "")),
            source=str(d.get("source", "")) or where)
    except KeyError as e:
        raise RecordError(f"{where}: missing key {e}") from None
    except TypeError as e:
        raise RecordError(f"{where}: {e}") from None


def decode(data: bytes, where: str = "<record>") -> Example:
    """The :class:`Example` in msgpack ``data``; raises :class:`RecordError` naming ``where``."""
    return from_map(unpack(data, where), where)


# ----------------------------------------------------------------------------------------------------------
# Precomputed VAE posteriors (the ``latents`` key written by :mod:`customjax.data.precompute`; no JAX here:
# grain workers read them).

LATENTS_VERSION = 1


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def with_latents(example: Example, image_size: tuple[int, int], means: list, logvars: list, dtype: str) -> bytes:
    """The msgpack record of ``example`` plus its frames' posteriors (``None`` for a frame without),
    stored as ``dtype`` (see :mod:`customjax.data.precompute` for the format)."""
    payload = to_map(example)
    shape = next(m.shape for m in means if m is not None)
    dt = _np_dtype(dtype)
    pack = lambda a: None if a is None else np.ascontiguousarray(np.asarray(a, np.float32).astype(dt)).tobytes()
    payload["latents"] = {"v": LATENTS_VERSION, "image_size": list(image_size), "shape": list(shape), "dtype": dtype,
                          "mean": [pack(m) for m in means], "logvar": [pack(v) for v in logvars]}
    return msgpack.packb(payload, use_bin_type=True)


def read_latents(record: bytes | dict, where: str = "<record>") -> dict | None:
    """``{"image_size": (H, W), "mean": [array | None per frame], "logvar": [...]}`` of a record (bytes,
    or the map :func:`unpack` returned), or ``None`` when it has no ``latents``; raises
    :class:`RecordError` for a malformed one."""
    lat = (record if isinstance(record, dict) else unpack(record, where)).get("latents")
    if lat is None:
        return None
    try:
        if lat["v"] != LATENTS_VERSION:
            raise ValueError(f"latents format {lat['v']!r}, expected {LATENTS_VERSION}")
        shape, dt = tuple(int(x) for x in lat["shape"]), _np_dtype(lat["dtype"])
        arr = lambda b: None if b is None else np.frombuffer(b, dt).reshape(shape)
        mean, logvar = [arr(b) for b in lat["mean"]], [arr(b) for b in lat["logvar"]]
        if len(mean) != len(logvar) or [m is None for m in mean] != [v is None for v in logvar]:
            raise ValueError("mean and logvar do not match")
        return {"image_size": tuple(int(x) for x in lat["image_size"]), "mean": mean, "logvar": logvar}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RecordError(f"{where}: bad latents ({type(e).__name__}: {e})") from None


def shard_path(out_dir: str | os.PathLike, name: str, index: int, count: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{name}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def find_shards(path: str | os.PathLike | Sequence) -> list[str]:
    """Shard files from a directory (all ``*.array_record`` in it), a glob, a file, or a list."""
    if isinstance(path, (list, tuple)):
        return [p for item in path for p in find_shards(item)]
    p = str(path)
    if os.path.isdir(p):
        found = sorted(glob.glob(os.path.join(p, f"*{SHARD_SUFFIX}*")))
    elif any(c in p for c in "*?["):
        found = sorted(glob.glob(p))
    else:
        found = [p] if os.path.exists(p) else []
    if not found:
        raise FileNotFoundError(f"no ArrayRecord shards at {p}")
    return found


class ShardedWriter:
    """Writes encoded records round-robin into ``num_shards`` ArrayRecord files.

    Use as a context manager; ``paths`` lists the shard files, ``count`` the records written.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, num_shards: int = 1):
        from array_record.python.array_record_module import ArrayRecordWriter

        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        os.makedirs(out_dir, exist_ok=True)
        self.paths = [str(shard_path(out_dir, name, i, num_shards)) for i in range(num_shards)]
        self._writers = [ArrayRecordWriter(p, WRITER_OPTIONS) for p in self.paths]
        self.count = 0

    def write(self, example: Example | bytes) -> None:
        data = example if isinstance(example, (bytes, bytearray)) else encode(example)
        self._writers[self.count % len(self._writers)].write(bytes(data))
        self.count += 1

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._writers:
            self.close()


def read_shard(path: str | os.PathLike) -> list[Example]:
    """All examples of one shard (for inspection and tests; training reads through sources)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return [decode(b, f"{path}#{i}") for i, b in enumerate(reader.read_all())]
    finally:
        reader.close()

