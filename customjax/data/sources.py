"""Random-access record sources for the training pipeline.

A *record source* has ``__len__`` and ``__getitem__(i)`` returning a record: msgpack bytes of
:mod:`customjax.data.records`, an :class:`~customjax.data.records.Example`, or a
:class:`~customjax.data.transforms.Skipped`; optionally ``where(i)`` naming record ``i`` for error
messages. Any object with that interface works; this module provides:

* :class:`ArrayRecordSource`: the shards written by :mod:`customjax.data.convert` (through
  ``grain.sources.ArrayRecordDataSource``);
* :class:`TfdsSource`: a TFDS dataset prepared with ``file_format="array_record"``, read through
  ``builder.as_data_source`` without TensorFlow (features must be tensors / text: encoded image
  bytes as ``Tensor(shape=(), dtype=np.object_)`` or uint8 pixel tensors; ``tfds.features.Image``
  needs TensorFlow to decode).
"""

from __future__ import annotations

import bisect
import os
from typing import Sequence

import grain
import numpy as np

from customjax.data.records import KINDS, Example, RecordError, find_shards


def describe(source) -> str:
    """A short, stable description of a record source (its repr unless it is a plain container)."""
    if isinstance(source, (list, tuple, dict)) or type(source).__repr__ is object.__repr__:
        return f"<{type(source).__name__} of {len(source)} records>"
    return repr(source)


def where(source, index: int) -> str:
    """A human-readable name of record ``index`` of ``source``."""
    fn = getattr(source, "where", None)
    return fn(index) if fn is not None else f"{describe(source)}[{index}]"


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """The msgpack records of ArrayRecord shards (a folder, a glob, a file or a list of files), in file order."""

    def __init__(self, path: str | os.PathLike | Sequence):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = find_shards(path)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        counts = []
        for p in self.paths:
            reader = ArrayRecordReader(p)
            try:
                counts.append(int(reader.num_records()))
            finally:
                reader.close()
        self._starts = list(np.cumsum([0] + counts[:-1]))
        self._len = int(sum(counts))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> bytes:
        return self._source[index]

    def where(self, index: int) -> str:
        f = bisect.bisect_right(self._starts, index) - 1
        return f"{self.paths[f]}#{index - self._starts[f]}"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {self._len} records, first={self.paths[0]!r})"


def _text(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _frame(value):
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.item() if value.shape == () else value
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    a = np.asarray(value)
    if a.dtype != np.uint8:
        raise RecordError(f"frame of dtype {a.dtype}; need encoded bytes or uint8 pixels")
    return a


class TfdsSource(grain.sources.RandomAccessDataSource):
    """Examples of a TFDS dataset in the array_record file format, converted to :class:`Example`.

    ``builder_dir`` is the prepared version folder (``<data_dir>/<name>/<version>``). ``image_key``
    holds one frame (text-image) or a sequence of frames (multiview): encoded image bytes or uint8
    pixels. ``mask_key`` (optional) holds one mask per frame likewise. No TensorFlow is needed as
    long as no feature uses ``tfds.features.Image`` (or other TF-decoded features).
    """

    def __init__(self, builder_dir: str | os.PathLike, split: str = "train", *, kind: str = "text_image",
                 image_key: str = "image", caption_key: str = "caption", mask_key: str | None = None,
                 object_id_key: str | None = None):
        import tensorflow_datasets as tfds

        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        self.builder_dir, self.split, self.kind = str(builder_dir), split, kind
        self.keys = dict(image=image_key, caption=caption_key, mask=mask_key, object_id=object_id_key)
        builder = tfds.builder_from_directory(self.builder_dir)
        if builder.info.file_format is None or builder.info.file_format.value != "array_record":
            raise ValueError(f"{self.builder_dir}: file format {builder.info.file_format}; "
                             "random access without TensorFlow needs file_format='array_record'")
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        return f"tfds:{self.builder_dir}[{self.split}][{index}]"

    def __getitem__(self, index: int):
        from customjax.data.transforms import Skipped

        w = self.where(index)
        try:
            d = self._source[index]
            k = self.keys
            raw = d[k["image"]]
            if self.kind == "multiview":
                frames = tuple(_frame(f) for f in raw)
                masks = tuple(_frame(m) for m in d[k["mask"]]) if k["mask"] else None
            else:
                frames = (_frame(raw),)
                masks = (_frame(d[k["mask"]]),) if k["mask"] else None
            return Example(kind=self.kind, caption=_text(d[k["caption"]]) if k["caption"] else "", frames=frames,
                           masks=masks, object_id=_text(d[k["object_id"]]) if k["object_id"] else "", source=w)
        except (KeyError, RecordError, UnicodeDecodeError, TypeError, ValueError) as e:
            return Skipped("bad_record", w, f"{type(e).__name__}: {e}")

    def __repr__(self) -> str:
        return f"TfdsSource({self.builder_dir!r}, split={self.split!r}, kind={self.kind!r})"


def as_source(data):
    """A record source from a path (folder / glob / file of ArrayRecord shards) or a list of paths; any
    other object with ``__len__`` and ``__getitem__`` (a record source, or a list of records) as is."""
    if isinstance(data, (str, os.PathLike)):
        return ArrayRecordSource(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return ArrayRecordSource(list(data))
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (bytes, str)):
        return data
    raise TypeError(f"cannot make a record source from {type(data).__name__}")
