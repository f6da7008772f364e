"""Training data: record shards, converters, sources, transforms, the curriculum (RealCustom++ Eqs. 10-11)
and the per-process grain pipeline.

Modules: :mod:`.records` (schema, ArrayRecord shards), :mod:`.convert` (folders / JSONL / multiview ->
shards, CLI), :mod:`.sources` (ArrayRecord, TFDS), :mod:`.curriculum` (Eqs. 10-11, Table X),
:mod:`.mixture` (index -> record), :mod:`.images` (robust decoding, crop geometry), :mod:`.transforms`
(grain transforms, skip counting), :mod:`.loader` (:func:`make_loader`), :mod:`.training` (a method
config's loader), :mod:`.synthetic` (test data).
"""

from customjax.data.curriculum import TABLE_X, Recipe, crop_ratio, crop_ratio_bound, multiview_probability, recipe
from customjax.data.loader import SkipCounter, TrainLoader, make_loader
from customjax.data.training import make_train_loader
from customjax.data.records import Example, ShardedWriter, decode, encode, read_shard
from customjax.data.sources import ArrayRecordSource, TfdsSource
from customjax.data.transforms import RECORD_SKIP_REASONS, SKIP_REASONS

__all__ = [
    "TABLE_X", "Recipe", "crop_ratio", "crop_ratio_bound", "multiview_probability", "recipe",
    "SkipCounter", "TrainLoader", "make_loader", "make_train_loader",
    "Example", "ShardedWriter", "decode", "encode", "read_shard",
    "ArrayRecordSource", "TfdsSource", "RECORD_SKIP_REASONS", "SKIP_REASONS",
]
