"""From a method config (``configs/*.py``) to modules and parameters, through the registered
method (:mod:`customjax.methods.registry`): the base pipeline (a diffusers folder, or a random tiny
one), the method's image side (reference encoders and adapter), the UNet with the method's extra
K/V set; the trainable tree, adapter files, and what the dual-branch sampler reads."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from customjax.base_model import base_pipeline
from customjax.control.spec import ControlConfig
from customjax.guidance.mask import MaskConfig
from customjax.methods.common import abstract, with_control
from customjax.methods.protocol import Method
from customjax.methods.registry import get as get_method
from customjax.sampling.dual_branch import DualBranchConfig

ADAPTER_FILE = "adapter.safetensors"


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a sampler or trainer needs. ``method``: the registered :class:`Method`;
    ``image_side``: its static modules (encoders, adapter); ``params``: {"unet", "vae",
    "text_encoders", "image" (encoders + adapter, by name)}."""

    method: Method
    pipe: Any
    unet: Any                      # the UNet module with the method's extra K/V set
    image_side: Any
    params: dict


def build(config: ml_collections.ConfigDict) -> Built:
    """Modules and parameters for ``config`` (adapter parameters initialised; see
    :func:`load_adapter` for a trained checkpoint). With ``config.model.abstract`` every parameter
    is a ``jax.ShapeDtypeStruct`` (the real-size traces)."""
    method = get_method(config.method)
    key = jax.random.key(config.seed)
    k_ctrl, k_a, k_b, k_c = jax.random.split(key, 4)
    pipe, params = base_pipeline(config)
    side = method.image_side(config, pipe, (k_a, k_b, k_c))
    extra = () if side.extra_kv is None else (side.extra_kv,)
    unet, unet_p = with_control(pipe.unet, params["unet"], ControlConfig(extra_kv=extra, lora=side.lora),
                                k_ctrl, std=config.init_std, shapes_only=abstract(config))
    unet_p = method.init_extra_kv(unet_p)
    image = method.init_image(side.modules, side.params, params, pipe)
    return Built(method, pipe, unet, side.modules, dict(params, unet=unet_p, image=image))


def guidance_config(config: ml_collections.ConfigDict) -> DualBranchConfig:
    g = config.guidance
    gamma = g.gamma_scope if isinstance(g.gamma_scope, float) else tuple(g.gamma_scope)
    return DualBranchConfig(
        mask=MaskConfig(cross_factors=tuple(g.cross_factors), self_factors=tuple(g.self_factors),
                        mask_factor=g.mask_factor, gamma_scope=gamma, norm=g.norm, multi=g.multi),
        t_stop=g.t_stop, cfg=g.cfg, w=g.w, w_t=g.w_t, w_i=g.w_i, visual_scale=g.visual_scale,
        references=g.references, masked=get_method(config.method).masked and g.get("masked", True),
        uncond_image=g.get("uncond_image", "none"), record_masks=config.sample.record_masks,
        location=get_method(config.method).location)


def reference_size(config: ml_collections.ConfigDict) -> int:
    """The side (px) the reference images are resized to before the method reads them."""
    return get_method(config.method).reference_size(config)


class SamplingSide(NamedTuple):
    """A method's image side for the dual-branch sampler. ``tokens(images)`` / ``null_tokens(images)``:
    the reference tokens (B, N, D) of images (B, ref_size, ref_size, 3) in [0, 1] and the
    unconditional branch's; ``visual``: the sampler's per-step visual function; ``ref_size``:
    :func:`reference_size`; ``text_tokens``: the per-step S+ tokens, or None."""

    tokens: Callable
    null_tokens: Callable
    visual: Callable
    ref_size: int
    text_tokens: Callable | None = None


def sampling_side(built: Built, config: ml_collections.ConfigDict, image_params: dict | None = None) -> SamplingSide:
    """The sampler's view of ``built``'s method; ``image_params`` (default ``built.params["image"]``)."""
    m, mods = built.method, built.image_side
    p = built.params["image"] if image_params is None else image_params
    return SamplingSide(lambda images: m.reference_tokens(mods, p, images),
                        lambda images: m.null_tokens(mods, p, images),
                        m.visual(mods, config), m.reference_size(config), m.text_tokens(mods, config))


def sampler_params(built: Built, params: dict | None = None) -> dict:
    """The parameters the dual-branch sampler reads, {"unet", "vae", "text_encoders", "adapter"},
    from a tree shaped as ``built.params`` (default: ``built.params`` itself); ``adapter``: the
    method's adapter parameters (its per-step visual function reads them), or None."""
    p = built.params if params is None else params
    return {"unet": p["unet"], "vae": p["vae"], "text_encoders": p["text_encoders"],
            "adapter": p["image"].get(built.method.adapter)}


def trainable_tree(built: Built) -> dict:
    """The parameters the method trains: {"unet": its extra K/V (and what else it trains in the
    UNet), "<adapter>": its adapter}."""
    pred = built.method.is_trainable
    flat = traverse_util.flatten_dict({"unet": built.params["unet"], **built.params["image"]})
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if pred(k[1:] if k[0] == "unet" else k)})


def check_checkpoint(checkpoint: str | os.PathLike, method: str) -> Path | None:
    """Before any model is built: ``checkpoint`` exists, and when it is our export
    (``adapter.safetensors``, or a folder holding one) the method it records is ``method``. Returns
    the export file, or None for another format (read by the method itself)."""
    from customjax.weights.safetensors_io import read_metadata

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
    ours = path / ADAPTER_FILE if path.is_dir() else path
    if ours.name != ADAPTER_FILE or not ours.is_file():
        return None
    recorded = read_metadata(ours).get("method")
    if recorded and recorded != method:
        raise ValueError(f"{ours}: an adapter of method {recorded!r}; the config builds {method!r} "
                         f"(use configs/{recorded}.py)")
    return ours


def load_adapter(built: Built, checkpoint: str | os.PathLike) -> Built:
    """Loads trained adapter weights from ``checkpoint``: a folder holding ``adapter.safetensors``
    (our export, under the method's export names; its ``method`` metadata must name this method),
    or a checkpoint in a format the method reads itself (:meth:`Method.load_checkpoint`). A tensor
    that is not finite is refused by name."""
    import numpy as np

    from customjax.weights.safetensors_io import load_file

    ours = check_checkpoint(checkpoint, built.method.name)
    if ours is not None:
        loaded = built.method.load_state_dict(load_file(ours), trainable_tree(built), str(ours))
    else:
        loaded = built.method.load_checkpoint(built, Path(checkpoint), trainable_tree(built))
        if loaded is None:
            raise FileNotFoundError(f"{checkpoint}: no {ADAPTER_FILE}, and {built.method.name} reads no other "
                                    "checkpoint format")
    bad = ["/".join(k) for k, v in traverse_util.flatten_dict(loaded).items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{checkpoint}: non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]} (a diverged run?)")
    return with_trainable(built, loaded)


def with_trainable(built: Built, tree: Any) -> Built:
    """``built`` with the leaves of a trainable-shaped ``tree`` ({"unet": ..., "<adapter>": ...})
    replacing its parameters."""
    flat = traverse_util.flatten_dict({"unet": built.params["unet"], **built.params["image"]})
    for k, v in traverse_util.flatten_dict(tree).items():
        if k not in flat:
            raise KeyError(f"parameter {'/'.join(k)} is not in the model")
        flat[k] = jnp.asarray(v)
    merged = traverse_util.unflatten_dict(flat)
    image = {k: merged[k] for k in built.params["image"]}
    return dataclasses.replace(built, params=dict(built.params, unet=merged["unet"], image=image))


def save_adapter(built: Built, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Writes the trainable tree as ``folder/adapter.safetensors`` under the method's export names,
    with the method's name in the file's metadata."""
    from customjax.weights.safetensors_io import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = built.method.state_dict(jax.device_get(trainable_tree(built)))
    save_file(state, folder / ADAPTER_FILE, metadata={"method": built.method.name, **(metadata or {})})
    return folder / ADAPTER_FILE
