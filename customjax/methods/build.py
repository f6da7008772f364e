"""From a method config (``configs/*.py``) to modules and parameters: the base pipeline (a
diffusers folder, or a random tiny one), the reference encoders (Hugging Face folders, or random
tiny ones), the adapter (from a checkpoint, or freshly initialised), and the UNet's visual K/V."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from customjax.adapters.ccp import CCPConfig, CrossLayerCrossScaleProjector
from customjax.adapters.features import (IMAGENET_MEAN, IMAGENET_STD, PUBLIC_DEEP, PUBLIC_FEATURES, SIGLIP_MEAN,
                                         SIGLIP_STD, Encoder, FeatureConfig)
from customjax.adapters.scoring import AdaptiveScoring, ScoringConfig
from customjax.control.spec import ControlConfig, ExtraKV
from customjax.guidance.mask import MaskConfig
from customjax.methods import realcustom, realcustompp
from customjax.methods.common import with_control
from customjax.models.vit import (CLIP_MEAN, CLIP_STD, CLIP_VISION, DINOV2, SIGLIP_VISION, CLIPVisionConfig, CLIPVisionModel,
                                  Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel)
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.dual_branch import DualBranchConfig
from customjax.weights.loaders import load_pretrained, param_shapes
from customjax.zoo import _random, random_pipeline

log = logging.getLogger(__name__)

# Tiny random encoders for the `tiny` variants: 28px views, 14px patches (2 x 2 tokens).
TINY_SIGLIP = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=28, patch_size=14)
TINY_DINO = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                         patch_size=14, num_register_tokens=2)
TINY_CLIP = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=14)


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a sampler or trainer needs. ``params``: {"unet", "vae", "text_encoders",
    "image" (encoders + adapter, by name)}."""

    method: str
    pipe: Any
    unet: Any                      # the UNet module with the visual K/V set
    image_side: Any                # realcustompp.ImageSide | realcustom.ImageSide
    params: dict


def _encoder(path: str, spec, tiny_cfg, module_cls, dtype, key):
    if path:
        module, params, _ = load_pretrained(path, spec, dtype=dtype)
        return module, params
    return module_cls(tiny_cfg, dtype), _random(param_shapes(spec, tiny_cfg), key, 0.05)


def first_tokenizer(config: ml_collections.ConfigDict):
    """The pipeline's (first) tokenizer alone, cheaply, to check prompts before anything loads."""
    import tempfile

    from customjax.tokenizer import load_tokenizer
    from customjax.zoo import write_char_tokenizer

    if config.model.path:
        return load_tokenizer(Path(config.model.path) / "tokenizer")
    folder = Path(tempfile.mkdtemp(prefix="customjax-tok-"))
    write_char_tokenizer(folder)
    return load_tokenizer(folder)


def base_pipeline(config: ml_collections.ConfigDict) -> tuple[Any, dict]:
    """(pipeline, params) of the base model: the diffusers folder ``config.model.path``, or a random
    ``config.model.random`` pipeline of scale ``config.model.random_scale`` when the path is empty.
    A missing folder raises FileNotFoundError with ``config.model.missing_hint`` (how to make it)."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.path:
        try:
            return load_stable_diffusion(config.model.path, dtype=dtype)
        except FileNotFoundError as e:
            hint = config.model.get("missing_hint", "")
            if not hint:
                raise
            raise FileNotFoundError(f"config.model.path: {e}; {hint}") from e
    scale = config.model.get("random_scale", "tiny")
    log.warning("config.model.path is empty: using a random %s %s pipeline", scale, config.model.random)
    return random_pipeline(config.model.random, scale, seed=config.seed, std=0.1 if scale == "tiny" else 0.02,
                           dtype=dtype)


def reference_encoders(config: ml_collections.ConfigDict, dtype: Any, keys: tuple[jax.Array, jax.Array]
                       ) -> tuple[tuple[Encoder, ...], dict]:
    """RealCustom++'s reference encoders and their parameters by name: SigLIP + DINOv2
    (``encoders.kind="siglip_dino"``), or one CLIP image encoder (``"clip"``, ShapeWorld); each
    from its folder (``encoders.<name>``) or random and tiny. ``encoders.public``: the released
    code's deep blocks (``PUBLIC_DEEP``) for SigLIP and DINOv2; a CLIP, which the release does not
    have, keeps its last hidden state."""
    enc = config.encoders
    if enc.get("kind", "siglip_dino") == "clip":
        specs = [("clip", CLIP_VISION, TINY_CLIP, CLIPVisionModel, CLIP_MEAN, CLIP_STD, enc.siglip_shallow)]
    else:
        specs = [("siglip", SIGLIP_VISION, TINY_SIGLIP, SiglipVisionModel, SIGLIP_MEAN, SIGLIP_STD, enc.siglip_shallow),
                 ("dino", DINOV2, TINY_DINO, Dinov2Model, IMAGENET_MEAN, IMAGENET_STD, enc.dino_shallow)]
    encoders, params = [], {}
    for (name, spec, tiny, cls, mean, std, shallow), key in zip(specs, keys):
        module, params[name] = _encoder(enc[name], spec, tiny, cls, dtype, key)
        deep = PUBLIC_DEEP.get(name) if enc.public else None
        if deep is not None and deep >= module.config.num_hidden_layers:
            raise ValueError(f"config.encoders.public: the released features read {name} block {deep}, "
                             f"but this {name} has {module.config.num_hidden_layers} layers")
        encoders.append(Encoder(name, module, mean, std, tuple(shallow), deep))
    return tuple(encoders), params


def build(config: ml_collections.ConfigDict) -> Built:
    """Modules and parameters for ``config`` (adapter parameters initialised; see
    :func:`load_adapter` for a trained checkpoint)."""
    dtype = jnp.dtype(config.model.dtype)
    key = jax.random.key(config.seed)
    k_pipe, k_ctrl, k_a, k_b, k_c = jax.random.split(key, 5)
    pipe, params = base_pipeline(config)
    cross_dim = pipe.unet.config.cross_attention_dim[0]
    enc = config.encoders
    if config.method == "realcustompp":
        encoders, image = reference_encoders(config, dtype, (k_a, k_b))
        c0 = sum(e.module.config.hidden_size for e in encoders)
        ccp = CrossLayerCrossScaleProjector(CCPConfig(
            vision_dim=c0, out_dim=cross_dim, dim_head=config.ccp.dim_head, cross_layer=config.ccp.cross_layer,
            cross_scale=config.ccp.cross_scale, combine=config.ccp.combine, deep_proj=config.ccp.deep_proj), dtype)
        feats = FeatureConfig(image_size=enc.image_size, scale=enc.scale)
        if enc.public:  # the released code's views (see adapters/features.py)
            feats = dataclasses.replace(PUBLIC_FEATURES, image_size=enc.image_size, scale=enc.scale)
        side = realcustompp.ImageSide(encoders, ccp, feats)
        n = (enc.image_size // encoders[0].module.config.patch_size) ** 2
        args = [jnp.zeros((1, n, c0))]
        args += [jnp.zeros((1, n * len(encoders[0].shallow), c0)) if ccp.config.cross_layer else None]
        args += [jnp.zeros((1, n * enc.scale ** 2, c0)) if ccp.config.cross_scale else None]
        image["ccp"] = jax.jit(ccp.init)(k_c, *args)["params"]
    elif config.method == "realcustom":
        clip, cp = _encoder(enc.clip, CLIP_VISION, TINY_CLIP, CLIPVisionModel, dtype, k_a)
        scoring = AdaptiveScoring(ScoringConfig(fusion=config.scoring.fusion), dtype)
        side = realcustom.ImageSide(clip, scoring)
        n = (clip.config.image_size // clip.config.patch_size) ** 2 + 1
        z = jnp.zeros((1, 4, 4, pipe.unet.config.in_channels))
        sc = jax.jit(scoring.init)(k_c, jnp.zeros((1, n, clip.config.hidden_size)),
                                   jnp.zeros((1, 2, cross_dim)), z, jnp.ones((1,)))["params"]
        image = {"clip": cp, "scoring": sc}
    else:
        raise ValueError(f"config.method={config.method!r}: use 'realcustompp' or 'realcustom'")
    token_dim = cross_dim if config.method == "realcustompp" else side.clip.config.hidden_size
    unet, unet_p = with_control(pipe.unet, params["unet"], ControlConfig(extra_kv=(ExtraKV("vision", token_dim),)),
                                k_ctrl, std=config.init_std)
    return Built(config.method, pipe, unet, side, dict(params, unet=unet_p, image=image))


def guidance_config(config: ml_collections.ConfigDict) -> DualBranchConfig:
    g = config.guidance
    gamma = g.gamma_scope if isinstance(g.gamma_scope, float) else tuple(g.gamma_scope)
    return DualBranchConfig(
        mask=MaskConfig(cross_factors=tuple(g.cross_factors), self_factors=tuple(g.self_factors),
                        mask_factor=g.mask_factor, gamma_scope=gamma, norm=g.norm, multi=g.multi),
        t_stop=g.t_stop, cfg=g.cfg, w=g.w, w_t=g.w_t, w_i=g.w_i, visual_scale=g.visual_scale,
        references=g.references, record_masks=config.sample.record_masks)


# The entry of params["image"] that a method's per-step visual function reads (None: none).
SAMPLER_ADAPTER = {"realcustompp": None, "realcustom": "scoring"}


def reference_size(config: ml_collections.ConfigDict) -> int:
    """The side (px) the reference images are resized to before the image side reads them:
    ``encoders.image_size``, times ``encoders.scale`` for RealCustom++ (its high-resolution views)."""
    enc = config.encoders
    return enc.image_size * (enc.get("scale", 1) if config.method == "realcustompp" else 1)


class SamplingSide(NamedTuple):
    """A method's image side for the dual-branch sampler. ``tokens(side, params["image"], images)``:
    reference tokens of images (B, ref_size, ref_size, 3) in [0, 1]; ``visual``: the sampler's
    per-step visual function; ``adapter``: the entry of ``params["image"]`` that ``visual`` reads
    (None: none); ``ref_size``: :func:`reference_size`."""

    tokens: Callable
    visual: Callable
    adapter: str | None
    ref_size: int


def sampling_side(built: Built, config: ml_collections.ConfigDict) -> SamplingSide:
    if built.method == "realcustompp":
        tokens, visual = realcustompp.reference_tokens, realcustompp.constant_visual
    else:
        tokens, visual = realcustom.reference_tokens, realcustom.ScoringVisual(built.image_side.scoring,
                                                                                config.scoring.gamma_num)
    return SamplingSide(tokens, visual, SAMPLER_ADAPTER[built.method], reference_size(config))


def sampler_params(built: Built, params: dict | None = None) -> dict:
    """The parameters the dual-branch sampler reads, {"unet", "vae", "text_encoders", "adapter"},
    from a tree shaped as ``built.params`` (default: ``built.params`` itself)."""
    p = built.params if params is None else params
    adapter = SAMPLER_ADAPTER[built.method]
    return {"unet": p["unet"], "vae": p["vae"], "text_encoders": p["text_encoders"],
            "adapter": p["image"][adapter] if adapter else None}


def trainable_tree(built: Built) -> dict:
    """The parameters a method trains: {"unet": visual K/V only, "image": adapter only}."""
    pred = realcustompp.is_trainable if built.method == "realcustompp" else realcustom.is_trainable
    flat = traverse_util.flatten_dict({"unet": built.params["unet"], **{k: v for k, v in built.params["image"].items()}})
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if pred(k[1:] if k[0] == "unet" else k)})


def load_adapter(built: Built, checkpoint: str | os.PathLike) -> Built:
    """Loads trained adapter weights from ``checkpoint``: a folder holding ``adapter.safetensors``
    (our export: keys ``unet.<torch key>`` and ``<ccp|scoring>.<torch key>``), or the public
    RealCustom++ checkpoint (a ``.safetensors`` / ``.pth`` file, or a folder with one)."""
    from customjax.weights.convert import convert
    from customjax.weights.safetensors_io import load_file

    path = Path(checkpoint)
    ours = path / "adapter.safetensors" if path.is_dir() else path
    if ours.name == "adapter.safetensors" and ours.is_file():
        state = load_file(ours)
        target = trainable_tree(built)
        loaded = convert(state, target, name=str(ours))
    else:
        if built.method != "realcustompp":
            raise ValueError(f"{checkpoint}: no adapter.safetensors, and public checkpoints exist only for RealCustom++")
        from customjax.adapters.public_checkpoint import load_public_checkpoint
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if len(files) != 1:
            raise FileNotFoundError(f"{checkpoint}: expected adapter.safetensors or one public checkpoint file, found {files}")
        tree = trainable_tree(built)
        u, c = load_public_checkpoint(files[0], unet_target=tree["unet"], projector_target=built.params["image"]["ccp"])
        loaded = {"unet": u, "ccp": c}
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


def save_adapter(built: Built, folder: str | os.PathLike) -> Path:
    """Writes the trainable tree as ``folder/adapter.safetensors`` (PyTorch-style keys)."""
    from customjax.weights.convert import to_torch_state
    from customjax.weights.safetensors_io import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_torch_state(trainable_tree(built))
    save_file(state, folder / "adapter.safetensors", metadata={"method": built.method})
    return folder / "adapter.safetensors"
