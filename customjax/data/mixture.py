"""The curriculum data mixture (Eq. 10) as a stateless map from global element index to record.

Element ``g`` belongs to training step ``step_offset + g // global_batch_size``. The kind is decided
per training step, as the paper's Eq. 10 (the probability that the batch of step S_cur is a
multiview batch): every element of step ``s`` is multiview when ``u(seed, s) < P_multiview(s)``
(or the recipe's ablation rule), so a batch holds one kind of data; an element's
record within that kind is ``perm_epoch(g mod n)`` with ``epoch = g // n`` and ``perm_epoch`` a
seeded bijection of ``[0, n)`` (a Feistel network with cycle walking: O(1) memory for any ``n``).
Within each window of ``n`` consecutive indices the elements that pick a kind read distinct records
of it. Nothing depends on state, so any element can be recomputed from ``(seed, g)`` alone.
"""

from __future__ import annotations

import grain

from customjax.data import curriculum
from customjax.data.records import KINDS
from customjax.data.sources import describe, where

_M64 = (1 << 64) - 1
INFINITE = 1 << 62  # length of an endless pipeline


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def hash64(*values: int) -> int:
    """A 64-bit hash of a tuple of integers."""
    h = 0
    for v in values:
        h = _splitmix(h ^ (int(v) & _M64))
    return h


def uniform(*values: int) -> float:
    """A uniform number in [0, 1) determined by the integers."""
    return (hash64(*values) >> 11) / float(1 << 53)


def permute(index: int, n: int, key: int) -> int:
    """``index``'s image under a seeded bijection of ``[0, n)`` (4-round Feistel + cycle walking)."""
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range [0, {n})")
    if n <= 2:
        return index if n == 1 or hash64(key) & 1 == 0 else 1 - index
    half = ((n - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    x = index
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (hash64(key, r, right) & mask)
        x = (left << half) | right
        if x < n:
            return x


_KIND_SALT, _EPOCH_SALT = 0x6B696E64, 0x65706F63


class Mixture(grain.sources.RandomAccessDataSource):
    """Global element index -> ``{"record", "kind", "step", "index", "where"}`` of the curriculum mixture.

    ``sources`` maps kinds to record sources; kinds the recipe does not need may be missing. With
    ``shuffle=False`` record ``g mod n`` is read instead of a permuted one.
    """

    def __init__(self, sources: dict, recipe: curriculum.Recipe, total_steps: int, global_batch_size: int,
                 seed: int = 0, step_offset: int = 0, shuffle: bool = True, length: int = INFINITE):
        unknown = set(sources) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown source kinds {sorted(unknown)}; use {KINDS}")
        for kind in recipe.needs:
            if kind not in sources or len(sources[kind]) == 0:
                raise ValueError(f"recipe {recipe} reads {kind} data but no (non-empty) {kind} source was given")
        self.sources = {k: sources[k] for k in KINDS if k in sources and k in recipe.needs}
        self.recipe, self.total_steps, self.global_batch_size = recipe, int(total_steps), int(global_batch_size)
        self.seed, self.step_offset, self.shuffle, self.length = int(seed), int(step_offset), shuffle, int(length)
        self._only = next(iter(self.sources)) if len(self.sources) == 1 else None

    def __len__(self) -> int:
        return self.length

    def step(self, index: int) -> int:
        return self.step_offset + index // self.global_batch_size

    def kind(self, index: int) -> str:
        if self._only is not None:
            return self._only
        step = self.step(index)
        p = self.recipe.p_multiview(step, self.total_steps)
        return "multiview" if uniform(self.seed, _KIND_SALT, step) < p else "text_image"

    def record_index(self, kind: str, index: int) -> int:
        n = len(self.sources[kind])
        if not self.shuffle:
            return index % n
        return permute(index % n, n, hash64(self.seed, _EPOCH_SALT, KINDS.index(kind), index // n))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"element {index} out of range [0, {self.length})")
        kind = self.kind(index)
        source = self.sources[kind]
        r = self.record_index(kind, index)
        return {"record": source[r], "kind": kind, "step": self.step(index), "index": index,
                "where": where(source, r)}

    def __repr__(self) -> str:
        srcs = ", ".join(f"{k}={describe(s)}" for k, s in self.sources.items())
        return (f"Mixture({srcs}, recipe={self.recipe}, total_steps={self.total_steps}, "
                f"global_batch_size={self.global_batch_size}, seed={self.seed}, step_offset={self.step_offset}, "
                f"shuffle={self.shuffle}, length={self.length})")
