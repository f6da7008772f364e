"""One device mesh and the shardings the samplers and the trainer use."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over all (or the given) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places arrays with their leading (batch) axis split over ``data``; the batch must divide."""
    n = mesh.shape["data"]

    def put(a):
        if a is None:
            return a
        if a.shape[0] % n:
            raise ValueError(f"batch of {a.shape[0]} does not split over {n} devices; use a multiple of {n}")
        return jax.device_put(a, NamedSharding(mesh, P("data")))
    return jax.tree_util.tree_map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))
