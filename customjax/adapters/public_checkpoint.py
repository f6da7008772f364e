"""The public RealCustom++ SDXL checkpoint (``RealCustom_highres.pth``) on our parameter trees,
both ways, strictly.

The released pipeline loads that file into its UNet with ``load_state_dict(strict=False)``, so
its keys are UNet-relative PyTorch names:

  <attn2>.to_k_vision.weight, <attn2>.to_v_vision.weight     (inner, 2048), bias-free, in every
      cross-attention of the UNet (70 in SDXL), e.g.
      ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k_vision.weight`` (640, 2048)
  encoder_hidden_states_vision_projection.<projector key>    the projector
      (``ProjectorHighResMinAttn(vision_dim=2176, out_dim=2048, dim_head=64)``):
      min_attention.norm1.{weight,bias} (2176,)   min_attention.norm2.{weight,bias} (2176,)
      min_attention.to_{q,k,v}.weight (2176, 2176)
      projector.0.{weight (8704, 2176), bias}     projector.2.{weight (2048, 8704), bias}
      projector.4.{weight (2048, 2048), bias}     projector.5.{weight, bias} (2048,)  (LayerNorm)
      projector_base.{weight (2048, 2176), bias}

How they map:
  * UNet keys by the generic rule of ``customjax.weights.convert`` (``.N`` -> ``_N``, Linear
    ``weight`` -> transposed ``kernel``): the K/V above is
    ``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k_vision/kernel`` (2048, 640) of a UNet
    built with ``ControlConfig(extra_kv=(ExtraKV("vision", 2048),))``.
  * projector keys: the prefix is removed, then the same rule; ``projector.0.weight`` ->
    ``projector_0/kernel``, ``min_attention.norm1.weight`` -> ``min_attention/norm1/scale`` of
    ``CrossLayerCrossScaleProjector(PUBLIC_CCP)``.
  * export writes the inverse; the one rename is ``projector_N`` / ``projector2_N`` /
    ``projector_base_N`` -> ``.N`` (the generic inverse only splits list-holding names).

By default only the visual K/V of the UNet are read or written; ``include_base=True`` takes a
file that carries the whole UNet (base weights too) against the full UNet tree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from customjax.weights.convert import KeyedMismatchError, convert, to_torch_state, torch_key
from customjax.weights.safetensors_io import load_file, save_file

PROJECTOR_PREFIX = "encoder_hidden_states_vision_projection."
_SEQUENTIAL = re.compile(r"^(projector2?|projector_base)_(\d+)(?=\.)")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class PublicCheckpointError(KeyedMismatchError):
    """A checkpoint whose keys or shapes do not match the public layout our trees expect; every
    problem is listed by its public key."""

    layout = "the RealCustom++ layout"


# ----------------------------------------------------------------------------------------------
# Key names


def _projector_name(key: str) -> str:
    """Our derived PyTorch name (``projector_0.weight``) -> the public key."""
    return PROJECTOR_PREFIX + _SEQUENTIAL.sub(r"\1.\2", key)


def projector_key(path: str) -> str:
    """Projector parameter path (``projector_0/kernel``) -> public key
    (``encoder_hidden_states_vision_projection.projector.0.weight``)."""
    return _projector_name(torch_key(path))


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    s = tuple(shape)
    if leaf == "kernel" and len(s) == 2:
        return s[::-1]
    if leaf == "kernel" and len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    return s


def vision_params(unet_params: Any, kv_name: str = "vision") -> dict:
    """The subtree of ``to_k_<kv_name>`` / ``to_v_<kv_name>`` parameters of a UNet tree."""
    tags = {f"to_k_{kv_name}", f"to_v_{kv_name}"}
    flat = traverse_util.flatten_dict(unet_params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if tags & set(k)})


def _unet_part(unet_params: Any, include_base: bool, kv_name: str) -> dict:
    part = unet_params if include_base else vision_params(unet_params, kv_name)
    if not part:
        raise ValueError(f"the UNet tree has no to_k_{kv_name} / to_v_{kv_name} parameters; build the UNet "
                         f"with ControlConfig(extra_kv=(ExtraKV({kv_name!r}, out_dim),))")
    return part


def public_key_shapes(unet_params: Any, projector_params: Any, *, include_base: bool = False,
                      kv_name: str = "vision") -> dict[str, tuple[str, tuple]]:
    """Public key -> (our parameter path, PyTorch-layout shape) for the given trees (arrays or
    ``jax.ShapeDtypeStruct``); the UNet part is its visual K/V only unless ``include_base``."""
    out: dict[str, tuple[str, tuple]] = {}
    parts = ((_unet_part(unet_params, include_base, kv_name), torch_key, "unet/"),
             (projector_params, projector_key, "projector/"))
    for tree, key_fn, tag in parts:
        for k, v in traverse_util.flatten_dict(tree).items():
            path = "/".join(k)
            key = key_fn(path)
            if key in out:
                raise ValueError(f"two parameters map to the public key {key!r}")
            out[key] = (tag + path, _torch_shape(np.shape(v), k[-1]))
    return out


# ----------------------------------------------------------------------------------------------
# Reading


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat key -> array dict from a ``.safetensors`` file (torch-free) or a PyTorch pickle
    (``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``, read with ``torch.load(weights_only=True)``, which
    needs PyTorch installed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors "
                         f"or one of {_TORCH_SUFFIXES}")
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a PyTorch pickle needs PyTorch (pip install torch); without it, "
                          "convert the file to .safetensors elsewhere and load that") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else [type(obj).__name__]
        raise ValueError(f"{path}: expected a flat state dict of tensors, found {kinds}")
    return {str(k): _torch_to_numpy(v) for k, v in obj.items()}


def load_public_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], *, unet_target: Any,
                           projector_target: Any, include_base: bool = False, kv_name: str = "vision",
                           rename: Callable[[str], str] | None = None,
                           name: str | None = None) -> tuple[dict, dict]:
    """Loads a RealCustom++ checkpoint onto (UNet parameters, projector parameters), strictly.

    Args:
      checkpoint: a file (see :func:`read_checkpoint`) or a key -> array mapping.
      unet_target: the UNet's parameter tree with the visual K/V (shapes suffice, e.g. from
        ``jax.eval_shape`` of ``UNet2DConditionModel(cfg, control=ControlConfig(extra_kv=(ExtraKV("vision",
        2048),))).init``).
      projector_target: the projector's parameter tree (``CrossLayerCrossScaleProjector(PUBLIC_CCP)``).
      include_base: the file carries the whole UNet; fill every UNet parameter from it.
      rename: applied to every checkpoint key first (e.g. to strip a ``module.`` prefix).

    Returns (UNet parameters: the visual K/V subtree, or the whole UNet with ``include_base``;
    projector parameters), float32. Every checkpoint tensor must be used, every parameter filled
    and every shape agree, else :class:`PublicCheckpointError` lists each offending key.
    """
    name = name or (str(checkpoint) if not isinstance(checkpoint, Mapping) else "RealCustom++ checkpoint")
    state = dict(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    if rename is not None:
        renamed: dict[str, Any] = {}
        for k, v in state.items():
            nk = rename(k)
            if nk in renamed:
                raise ValueError(f"{name}: rename maps two checkpoint keys to {nk!r}")
            renamed[nk] = v
        state = renamed

    unet_part = _unet_part(unet_target, include_base, kv_name)
    expected = public_key_shapes(unet_part, projector_target, include_base=True, kv_name=kv_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, expected[k][0], expected[k][1], tuple(np.shape(state[k])))
                  for k in sorted(set(expected) & set(state)) if tuple(np.shape(state[k])) != expected[k][1]]
    if missing or unexpected or mismatched:
        base = [k for k in unexpected if not k.startswith(PROJECTOR_PREFIX) and f"_{kv_name}." not in k]
        hint = (f"  ({len(base)} unexpected keys look like base UNet weights: pass include_base=True with the "
                "full UNet tree as unet_target to load them too)") if base and not include_base else ""
        raise PublicCheckpointError(name, missing, unexpected, mismatched, hint)

    proj_state = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    unet_state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    unet = convert(unet_state, unet_part, name=f"{name} (UNet)")
    proj = convert(proj_state, projector_target, name=f"{name} (projector)")
    as_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
    return as_jax(unet), as_jax(proj)


# ----------------------------------------------------------------------------------------------
# Writing


def export_public(unet_params: Any, projector_params: Any, *, include_base: bool = False,
                  kv_name: str = "vision") -> dict[str, np.ndarray]:
    """Our trainable tree under the public key names and PyTorch layouts (the inverse of
    :func:`load_public_checkpoint`): the UNet's visual K/V (or every UNet parameter with
    ``include_base``) and the projector, prefixed ``encoder_hidden_states_vision_projection.``."""
    unet = to_torch_state(_unet_part(unet_params, include_base, kv_name))
    proj = to_torch_state(projector_params, rename=_projector_name)
    clash = set(unet) & set(proj)
    if clash:
        raise ValueError(f"UNet and projector parameters export to the same keys: {sorted(clash)[:5]}")
    return {**unet, **proj}


def save_public(path: str | os.PathLike, unet_params: Any, projector_params: Any, *,
                include_base: bool = False, kv_name: str = "vision") -> Path:
    """Writes :func:`export_public` to a safetensors file (torch-free)."""
    path = Path(path)
    save_file(export_public(unet_params, projector_params, include_base=include_base, kv_name=kv_name), path)
    return path
