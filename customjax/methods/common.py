"""What the methods share: a loaded UNet with control parameters added."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from customjax.control.params import attach
from customjax.control.spec import ControlConfig
from customjax.models.unet import dummy_inputs


def with_control(unet: Any, params: Any, control: ControlConfig, key: jax.Array,
                 std: float = 0.02) -> tuple[Any, Any]:
    """(controlled module, params): ``unet.clone(control=control)`` and the loaded ``params`` plus
    every parameter that ``control`` adds, drawn from N(0, std^2) (``lora_up`` zero, so LoRA starts
    as the identity)."""
    module = unet.clone(control=control)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(module.config)))["params"]
    have = traverse_util.flatten_dict(params)
    flat = traverse_util.flatten_dict(shapes)
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    for k in sorted(k for k in flat if k not in have):
        flat[k] = jnp.asarray(np.zeros(flat[k].shape, np.float32) if "lora_up" in k
                              else std * rng.standard_normal(flat[k].shape, np.float32))
    return module, attach(params, traverse_util.unflatten_dict(flat))
