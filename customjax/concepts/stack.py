"""Many concepts in one jitted step: the trainer's step (:func:`customjax.trainer.make_train_step`)
vmapped over a leading concept axis of the state, the per-concept frozen entries (learnt words that
a stage does not train) and the batch, the concept axis split over the mesh's ``data`` axis. Each
concept's optimisation is exactly its own (no reduction crosses the axis), so a stack of C concepts
gives the parameters of C separate runs (tests/test_finetune.py), in the time of fewer.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PER_CONCEPT = ("tokens", "text")   # frozen-tree entries with a concept axis (learnt words, a fine-tuned text encoder)


def stack(trees: Sequence[Any]) -> Any:
    """Trees of equal structure -> one tree with a leading concept axis (PRNG keys too)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def pad_to(n: int, devices: int) -> int:
    """The stack size: ``n`` concepts rounded up to a multiple of the devices on the concept axis."""
    return -(-n // devices) * devices


def frozen_axes(frozen: dict) -> dict:
    return {k: (0 if k in PER_CONCEPT else None) for k in frozen}


def stacked_step(step):
    """``step(state, frozen, batch)`` over a leading concept axis of the state, of ``frozen``'s
    :data:`PER_CONCEPT` entries and of the batch; metrics get the axis too."""
    def run(state, frozen, batch):
        return jax.vmap(step, in_axes=(0, frozen_axes(frozen), 0))(state, frozen, batch)
    return run


def batch_spec(ndim: int, over: str) -> P:
    """``over="concepts"``: the concept axis (0) on ``data``; ``"batch"`` (one model for all concepts,
    CLIF): the examples' axis (1) on ``data``."""
    return P("data", *([None] * (ndim - 1))) if over == "concepts" else P(None, "data", *([None] * (ndim - 2)))


def compile_stacked(step, mesh, state: Any, frozen: dict, batch_shapes: dict, over: str = "concepts"):
    """jit of :func:`stacked_step` with the concept axis on ``data`` (state, per-concept frozen
    entries, batch), shared frozen parameters replicated, metrics replicated; the state is donated.
    ``over="batch"``: one stack entry, replicated, its batch split over ``data`` (:func:`batch_spec`).
    Returns (jitted step, state shardings, frozen shardings)."""
    rep = NamedSharding(mesh, P())
    on_axis = lambda tree: jax.tree_util.tree_map(   # noqa: E731
        lambda a: NamedSharding(mesh, P("data", *([None] * (np.ndim(a) - 1)))) if over == "concepts" else rep, tree)
    state_sh = on_axis(state)
    frozen_sh = {k: (on_axis(v) if k in PER_CONCEPT else jax.tree_util.tree_map(lambda a: rep, v))
                 for k, v in frozen.items()}
    batch_sh = jax.tree_util.tree_map(lambda a: NamedSharding(mesh, batch_spec(np.ndim(a), over)), batch_shapes)
    jitted = jax.jit(stacked_step(step), in_shardings=(state_sh, frozen_sh, batch_sh),
                     out_shardings=(state_sh, rep), donate_argnums=(0,))
    return jitted, state_sh, frozen_sh


def place_batch(batch: dict, mesh, over: str = "concepts") -> dict:
    """Host arrays with a leading concept axis, the same whole batch on every process (the batches are
    a pure function of the step) -> arrays split over ``data`` (:func:`batch_spec`); each process fills
    its own shards."""
    def put(a):
        a = np.asarray(a)
        sh = NamedSharding(mesh, batch_spec(a.ndim, over))
        if jax.process_count() == 1:
            return jax.device_put(a, sh)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])
    return jax.tree_util.tree_map(put, batch)
