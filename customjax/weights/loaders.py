"""Loading a Flax model and its parameters from a diffusers or Hugging Face model folder.

Each model file exports a :class:`ModelSpec` that says how to build the module from the
folder's ``config.json``, what inputs initialise it, and which checkpoint names differ from ours.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from customjax.weights.convert import convert
from customjax.weights.folder import load_state_dict, read_config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How one model family maps onto a checkpoint folder.

    config_from_dict: ``config.json`` dict -> our config dataclass (errors on unsupported settings).
    build: (config, dtype) -> linen module.
    dummy_inputs: config -> positional args for ``module.init`` (small shapes; only traced).
    rename: checkpoint key -> our key, for names that differ from the generic rule.
    skip: checkpoint keys that are not parameters of this model (buffers, other towers).
    """

    config_from_dict: Callable[[dict], Any]
    build: Callable[[Any, Any], Any]
    dummy_inputs: Callable[[Any], tuple]
    rename: Callable[[str], str] | None = None
    skip: Callable[[str], bool] | None = None


def param_shapes(spec: ModelSpec, config: Any, dtype: Any = jnp.float32) -> Any:
    """The parameter tree of a model as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    module = spec.build(config, dtype)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *spec.dummy_inputs(config)))["params"]


def init_params(spec: ModelSpec, config: Any, key: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters, as ``module.init`` gives them."""
    module = spec.build(config, dtype)
    return jax.jit(lambda k: module.init(k, *spec.dummy_inputs(config)))(key)["params"]


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def load_pretrained(folder: str | os.PathLike, spec: ModelSpec, *, dtype: Any = jnp.float32,
                    variant: str | None = None, abstract: bool = False) -> tuple[Any, Any, Any]:
    """(module, params, config) from a model folder; strict, see :func:`convert`.

    ``dtype`` is the compute dtype; parameters are always float32.

    ``abstract=True`` reads the folder's ``config.json`` alone: ``params`` is the parameter tree
    as float32 ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape`` of the init), nothing is
    allocated and no weight file is looked for or read. For shapes-only work at the real sizes
    (parameter counts, memory plans, ``jax.jit(...).lower``) from a folder of configs.
    """
    config = spec.config_from_dict(read_config(folder))
    module = spec.build(config, dtype)
    # Weights are found (and memory-mapped) before the init is traced: a folder without them fails fast.
    state = None if abstract else load_state_dict(folder, variant)
    shapes = param_shapes(spec, config, dtype)
    if abstract:
        return module, shapes, config
    params = convert(state, shapes, name=str(folder), rename=spec.rename, skip=spec.skip)
    return module, jax.tree_util.tree_map(jnp.asarray, params), config
