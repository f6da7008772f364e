"""RealCustom++ (seed 004): SigLIP + DINOv2 features of the reference -> the cross-layer
cross-scale projector (Eqs. 5-9) -> visual tokens f_ci, fed to the bias-free ``to_k_vision`` /
``to_v_vision`` of every cross-attention layer (Eq. 4 in training, Eqs. 14 / 17 at inference).

Trainable: the projector (``ccp``) and the visual K/V projections; everything else frozen. Data:
a reference per example (a different view of the subject for multiview examples, Sec. III-C2).
Sampling: the projector tokens at every step, narrowed by the adaptive mask (Eqs. 12-15);
``guidance.cfg = "one_scale"`` (Eq. 15). Checkpoints: ours, or the released SDXL file
(:mod:`customjax.adapters.public_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from customjax.adapters.ccp import CCPConfig, CrossLayerCrossScaleProjector
from customjax.adapters.features import (IMAGENET_MEAN, IMAGENET_STD, PUBLIC_DEEP, PUBLIC_FEATURES, SIGLIP_MEAN,
                                         SIGLIP_STD, Encoder, FeatureConfig, ReferenceFeatures, check_encoders,
                                         reference_features)
from customjax.control.spec import ExtraKV
from customjax.methods.common import abstract, encoder, init
from customjax.methods.protocol import Condition, ImageSide, Method, jit_method
from customjax.models.vit import CLIP_MEAN, CLIP_STD


@dataclasses.dataclass(frozen=True)
class Modules:
    """The reference encoders and the projector (static; parameters live apart, by name:
    ``{"<encoder name>": ..., "ccp": ...}``). ``encoders``: SigLIP and DINOv2, or one CLIP image
    encoder alone (the ShapeWorld base model's)."""

    encoders: tuple[Encoder, ...]
    ccp: CrossLayerCrossScaleProjector
    features: FeatureConfig = FeatureConfig()

    def __post_init__(self):
        check_encoders(self.encoders)


def reference_encoders(config, keys: tuple[jax.Array, jax.Array]) -> tuple[tuple[Encoder, ...], dict]:
    """The reference encoders and their parameters by name: SigLIP + DINOv2
    (``encoders.kind="siglip_dino"``), or one CLIP image encoder (``"clip"``, ShapeWorld); each
    from its folder (``encoders.<name>``) or random and tiny. ``encoders.public``: the released
    code's deep blocks (``PUBLIC_DEEP``) for SigLIP and DINOv2; a CLIP keeps its last hidden state."""
    enc = config.encoders
    if enc.get("kind", "siglip_dino") == "clip":
        specs = [("clip", CLIP_MEAN, CLIP_STD, enc.siglip_shallow)]
    else:
        specs = [("siglip", SIGLIP_MEAN, SIGLIP_STD, enc.siglip_shallow),
                 ("dino", IMAGENET_MEAN, IMAGENET_STD, enc.dino_shallow)]
    encoders, params = [], {}
    for (name, mean, std, shallow), key in zip(specs, keys):
        module, params[name] = encoder(config, name, enc[name], key)
        deep = PUBLIC_DEEP.get(name) if enc.public else None
        if deep is not None and deep >= module.config.num_hidden_layers:
            raise ValueError(f"config.encoders.public: the released features read {name} block {deep}, "
                             f"but this {name} has {module.config.num_hidden_layers} layers")
        encoders.append(Encoder(name, module, mean, std, tuple(shallow), deep))
    return tuple(encoders), params


def projector_inputs(side: Modules, params: Mapping[str, Any], images: jax.Array) -> ReferenceFeatures:
    """The projector's inputs for reference images (B, H, W, 3) in [0, 1] (the shallow / high
    features only when the projector reads them); ``params[encoder.name]``: the encoders' parameters."""
    c: CCPConfig = side.ccp.config
    return reference_features(images, side.encoders, params, side.features, shallow=c.cross_layer,
                              high=c.cross_scale)


class RealCustomPP(Method):
    name = "realcustompp"
    paper = "RealCustom++ (seed 004)"
    adapter = "ccp"

    def image_side(self, config, pipe, keys):
        enc = config.encoders
        encoders, params = reference_encoders(config, keys[:2])
        c0 = sum(e.module.config.hidden_size for e in encoders)
        cross_dim = pipe.unet.config.cross_attention_dim[0]
        ccp = CrossLayerCrossScaleProjector(CCPConfig(
            vision_dim=c0, out_dim=cross_dim, dim_head=config.ccp.dim_head, cross_layer=config.ccp.cross_layer,
            cross_scale=config.ccp.cross_scale, combine=config.ccp.combine, deep_proj=config.ccp.deep_proj),
            jnp.dtype(config.model.dtype))
        feats = FeatureConfig(image_size=enc.image_size, scale=enc.scale)
        if enc.public:  # the released code's views (see adapters/features.py)
            feats = dataclasses.replace(PUBLIC_FEATURES, image_size=enc.image_size, scale=enc.scale)
        n = (enc.image_size // encoders[0].module.config.patch_size) ** 2
        args = [jnp.zeros((1, n, c0))]
        args += [jnp.zeros((1, n * len(encoders[0].shallow), c0)) if ccp.config.cross_layer else None]
        args += [jnp.zeros((1, n * enc.scale ** 2, c0)) if ccp.config.cross_scale else None]
        params["ccp"] = init(ccp, keys[2], *args, shapes_only=abstract(config))
        return ImageSide(Modules(encoders, ccp, feats), params, ExtraKV(self.kv_name, cross_dim))

    def reference_size(self, config) -> int:
        """The high-resolution view's side: ``encoders.image_size * encoders.scale``."""
        return int(config.encoders.image_size * config.encoders.scale)

    def condition(self, modules, frozen, trainable, batch, x, key, config):
        f = jax.lax.stop_gradient(projector_inputs(modules, frozen, batch["reference"]))
        tokens = modules.ccp.apply({"params": trainable["ccp"]}, f.deep, f.shallow, f.high).tokens
        return Condition(tokens[:, None])

    @jit_method
    def reference_tokens(self, modules, params, images):
        f = projector_inputs(modules, params, images)
        return modules.ccp.apply({"params": params["ccp"]}, f.deep, f.shallow, f.high).tokens

    def load_checkpoint(self, built, path, target):
        """The released SDXL checkpoint (``RealCustom_highres.pth`` or a safetensors copy): a file,
        or a folder holding exactly one."""
        from customjax.adapters.public_checkpoint import load_public_checkpoint
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                     if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected adapter.safetensors or one public RealCustom++ checkpoint "
                                    f"file, found {[f.name for f in files]}")
        u, c = load_public_checkpoint(files[0], unet_target=target["unet"], projector_target=target["ccp"])
        return {"unet": u, "ccp": c}

    def save_released(self, path, trainable):
        """The released key names (``...attn2.to_k_vision.weight``, ``encoder_hidden_states_vision_projection.*``),
        for a projector of the released structure (``:public``)."""
        from customjax.adapters.public_checkpoint import save_public
        return save_public(path, trainable["unet"], trainable["ccp"])


METHOD = RealCustomPP()
