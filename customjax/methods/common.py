"""What the methods share: a loaded UNet with control parameters added, reference encoders from
folders (or random and tiny), parameters initialised or only shaped (``config.model.abstract``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from customjax.control.params import attach
from customjax.control.spec import ControlConfig
from customjax.models.unet import dummy_inputs
from customjax.models.vit import (CLIP_VISION, DINOV2, SIGLIP_VISION, CLIPVisionConfig, CLIPVisionModel, Dinov2Config,
                                  Dinov2Model, SiglipVisionConfig, SiglipVisionModel)
from customjax.weights.loaders import param_shapes
from customjax.zoo import _random as random_tree

# Tiny random encoders for the `tiny` variants: 28px views, 14px patches (2 x 2 tokens).
TINY_SIGLIP = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=28, patch_size=14)
TINY_DINO = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                         patch_size=14, num_register_tokens=2)
TINY_CLIP = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=14)
ENCODERS = {"siglip": (SIGLIP_VISION, TINY_SIGLIP, SiglipVisionModel),
            "dino": (DINOV2, TINY_DINO, Dinov2Model),
            "clip": (CLIP_VISION, TINY_CLIP, CLIPVisionModel)}


def abstract(config) -> bool:
    """Whether ``config`` builds with abstract parameters (``config.model.abstract``: shapes only)."""
    return bool(config.model.get("abstract", False))


def init(module, key: jax.Array, *args, shapes_only: bool = False) -> Any:
    """``module.init(key, *args)["params"]``, jitted, or its shapes (``shapes_only``)."""
    fn = lambda k: module.init(k, *args)["params"]
    return jax.eval_shape(fn, key) if shapes_only else jax.jit(fn)(key)


def encoder(config, kind: str, path: str, key: jax.Array, tiny: Any = None) -> tuple[Any, Any]:
    """(module, params) of a reference encoder ``kind`` ("siglip" | "dino" | "clip"): loaded from
    ``path`` (a Hugging Face folder, or a timm checkpoint of the released encoders), or random and
    tiny (``tiny``, default the kind's) when ``path`` is empty; shapes only when ``config.model.abstract``."""
    dtype = jnp.dtype(config.model.dtype)
    spec, default_tiny, cls = ENCODERS[kind]
    tiny = tiny or default_tiny
    if path:
        from customjax.weights.loaders import load_pretrained
        if abstract(config):
            module, params, _ = load_pretrained(path, spec, dtype=dtype, abstract=True)
            return module, params
        from customjax.weights.timm import load_vision_encoder
        return load_vision_encoder(path, kind, dtype=dtype)
    shapes = param_shapes(spec, tiny)
    return cls(tiny, dtype), shapes if abstract(config) else random_tree(shapes, key, 0.05)


def kv_copies(unet_params: Any, kv: str) -> Any:
    """``unet_params`` with every ``to_k_<kv>`` / ``to_v_<kv>`` a copy of the layer's ``to_k`` / ``to_v``
    in its own buffer (the trainable copy is donated to the train step, the frozen original is not);
    shapes stay shapes in abstract builds."""
    from customjax.control.params import duplicate_kv

    flat = traverse_util.flatten_dict(duplicate_kv(unet_params, kv))
    own = lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jnp.array(a, copy=True)  # noqa: E731
    names = (f"to_k_{kv}", f"to_v_{kv}")
    return traverse_util.unflatten_dict({k: own(v) if any(n in k for n in names) else v for k, v in flat.items()})


def with_control(unet: Any, params: Any, control: ControlConfig, key: jax.Array,
                 std: float = 0.02, shapes_only: bool = False) -> tuple[Any, Any]:
    """(controlled module, params): ``unet.clone(control=control)`` and the loaded ``params`` plus
    every parameter that ``control`` adds, drawn from N(0, std^2) (``lora_up`` zero, so LoRA starts
    as the identity); with ``shapes_only`` the added parameters are shapes."""
    module = unet.clone(control=control)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(module.config)))["params"]
    have = traverse_util.flatten_dict(params)
    flat = traverse_util.flatten_dict(shapes)
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    for k in sorted(k for k in flat if k not in have):
        if not shapes_only:
            flat[k] = jnp.asarray(np.zeros(flat[k].shape, np.float32) if "lora_up" in k
                                  else std * rng.standard_normal(flat[k].shape, np.float32))
    return module, attach(params, traverse_util.unflatten_dict(flat))
