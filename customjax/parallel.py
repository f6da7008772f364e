"""One device mesh and the shardings the samplers and the trainer use.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
devices also split the large parameters). Batches split over both; a parameter of at least
``min_size`` elements is split along ``fsdp`` on its largest dimension that divides, others are
replicated. With ``fsdp = 1`` this is plain data parallelism; on one device, nothing is split.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (or the given) devices; ``fsdp`` must divide their count."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the device count {n}")
    return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), BATCH)


def data_mesh(devices: list | None = None) -> Mesh:
    """All devices on the batch axes (``fsdp = 1``)."""
    return make_mesh(1, devices)


def batch_size_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_spec(ndim: int) -> P:
    return P(BATCH, *([None] * (ndim - 1)))


def shard_batch(tree: Any, mesh: Mesh, whole: bool = False) -> Any:
    """Places arrays with their leading (batch) axis split over ``data`` x ``fsdp``
    (``jax.make_array_from_process_local_data``). Each process passes its consecutive part of the
    global batch (leading axis ``global // process_count``; the train loader's layout), or with
    ``whole=True`` every process passes the same whole global batch. With one process both are the
    whole batch."""
    n = batch_size_divisor(mesh)
    procs = 1 if whole else jax.process_count()

    def put(a):
        if not isinstance(a, jax.Array):
            a = np.asarray(a)
        shape = (a.shape[0] * procs,) + tuple(a.shape[1:])
        if shape[0] % n:
            raise ValueError(f"batch of {shape[0]} does not split over {n} devices; use a multiple of {n}")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(a.ndim)), a, shape)
    return jax.tree_util.tree_map(put, tree)


def batch_shapes(tree: Any, whole: bool = False) -> Any:
    """The global ``jax.ShapeDtypeStruct`` of each array that :func:`shard_batch` builds from
    ``tree`` (host arrays; nothing is placed)."""
    procs = 1 if whole else jax.process_count()

    def shape(a):
        a = a if hasattr(a, "dtype") else np.asarray(a)
        return jax.ShapeDtypeStruct((a.shape[0] * procs,) + tuple(a.shape[1:]), a.dtype)
    return jax.tree_util.tree_map(shape, tree)


def to_host(tree: Any, mesh: Mesh) -> Any:
    """numpy copies of arrays that may be split across processes (e.g. fsdp parameters): every
    process must call it (one collective); each gets the whole values."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    tree = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2 ** 18) -> P:
    """``fsdp`` on the largest dimension divisible by the fsdp size, for large tensors."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape)) < min_size:
        return P()
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[d] % n == 0:
            return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def param_shardings(tree: Any, mesh: Mesh, min_size: int = 2 ** 18) -> Any:
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, param_spec(np.shape(a), mesh, min_size)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))
