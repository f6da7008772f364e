"""Paired comparisons of a method's training objective (``benchmarks/reference_gain.py``,
``benchmarks/appearance_signal.py``): the objective jitted once for every adapter, its settings with
the reference used (:data:`WITH`) or dropped (:data:`DROPPED`), and the mean paired gain with its 95%
interval."""

from __future__ import annotations

from typing import Callable

import numpy as np

from customjax.methods.objective import ObjectiveConfig, loss_fn

WITH, DROPPED = ObjectiveConfig(0.0, 0.0, 0.0), ObjectiveConfig(0.0, 1.0, 0.0)


def jitted_objective(built) -> Callable:
    """``loss(train, frozen, batch, key, cfg)``: the scalar objective of ``built``; the frozen weights are
    an argument (not constants baked into the program) and ``cfg`` is static, so one compilation
    serves every adapter."""
    import jax

    return jax.jit(lambda tr, fr, b, k, cfg: loss_fn(tr, fr, b, k, built=built, cfg=cfg)[0], static_argnums=4)


def paired_gain(baseline: np.ndarray, losses: np.ndarray) -> dict:
    """``baseline - losses`` over paired draws (the same batch, noise and timestep): its mean, the
    half-width of its 95% interval (normal approximation) and the number of pairs."""
    d = np.asarray(baseline, np.float64) - np.asarray(losses, np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired_gain needs two 1-d arrays of the same length >= 2, got shape {d.shape}")
    return dict(gain=float(d.mean()), ci95=float(1.96 * d.std(ddof=1) / np.sqrt(len(d))), n=len(d))
