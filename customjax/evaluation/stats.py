"""Means with 95% bootstrap intervals, resampling groups (subjects, subject pairs) with replacement."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap(values: Sequence, groups: Sequence | None = None, n: int = 2000, seed: int = 0) -> dict | None:
    """{"mean", "lo", "hi", "n", "groups"} of ``values`` (None entries dropped): the mean over values
    and a 95% percentile interval of the mean over groups resampled with replacement (each group's
    values averaged first, so a subject with more images does not weigh more in the interval);
    ``groups=None``: every value is its own group. None when no value is left."""
    v = np.asarray([np.nan if x is None else float(x) for x in values], np.float64)
    g = np.arange(len(v)) if groups is None else np.asarray(list(groups))
    if len(g) != len(v):
        raise ValueError(f"bootstrap: {len(v)} values but {len(g)} groups")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if not len(v):
        return None
    ids = list(dict.fromkeys(g.tolist()))
    per = np.array([v[g == i].mean() for i in ids])
    rng = np.random.default_rng(seed)
    boots = per[rng.integers(len(per), size=(n, len(per)))].mean(1)
    return dict(mean=float(v.mean()), lo=float(np.percentile(boots, 2.5)), hi=float(np.percentile(boots, 97.5)),
                n=int(len(v)), groups=len(ids))


def paired(a: Sequence, b: Sequence, groups: Sequence, n: int = 2000, seed: int = 0) -> dict | None:
    """The bootstrap of ``a - b`` over the same images (pairs with a None dropped)."""
    d = [None if x is None or y is None else float(x) - float(y) for x, y in zip(a, b, strict=True)]
    return bootstrap(d, groups, n, seed)


def separates(s: dict | None) -> str:
    """'>' when the interval lies above 0, '<' below, '~' when it covers 0 (or is missing)."""
    if not s:
        return "~"
    return ">" if s["lo"] > 0 else "<" if s["hi"] < 0 else "~"


def fmt(s: dict | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` or ``-``."""
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"
