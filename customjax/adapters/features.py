"""The reference-image features that RealCustom++'s projector reads (seed 004, Sec. III-C1):
SigLIP and DINOv2 run side by side on the same views and their patch tokens are concatenated
along the channels (c0 = 1152 + 1024 = 2176 for SigLIP-so400m-patch14-384 and DINOv2-L/14).

  deep    (B, n, c0)     the last hidden states, on the global view (image_size px)
  shallow (B, L*n, c0)   L intermediate layers of each encoder on the global view, concatenated
                         per layer along the channels, then the layers along the tokens
  high    (B, 4n, c0)    the image at scale * image_size px, split into scale^2 views of
                         image_size px, each encoded (deep features), concatenated along the tokens

At 384 px with patch 14 both encoders give a 27 x 27 grid (n = 729: the patch embedding is a VALID
strided convolution, so the grid is floor(384 / 14) and the last 6 pixel rows and columns are not
seen, as in transformers and timm); DINOv2's CLS and register tokens are dropped (SigLIP has none),
so the two token sequences line up position by position. Position embeddings are resized when the
view's grid differs from the model's own (DINOv2-L's 37 x 37 at 518 px -> 27 x 27; see
:mod:`customjax.models.vit`).

Layers are numbered by transformer block, from 0: "block j" is the output of block j, i.e.
``hidden_states[j + 1]`` (timm's ``get_intermediate_layers`` numbering, as the public code), taken
without the final LayerNorm. The paper's layers are SigLIP {7, 13, 19} and DINOv2 {4, 10, 16}.
``Encoder.deep=None`` takes ``last_hidden_state`` (after the final LayerNorm); the public code takes
the output of the penultimate block instead (``PUBLIC_DEEP``: SigLIP 25 of 27, DINOv2 22 of 24, no
LayerNorm).

Views (``FeatureConfig``): the paper resizes to image_size for the global view and splits the
scale * image_size view into quadrant crops. The public code (``PUBLIC_FEATURES``) instead resizes
the reference to 768 px (bilinear), takes the global view from it (bilinear, align_corners=True),
splits it by a strided rearrange ``b c (h 2) (w 2) -> (b 2 2) c h w`` (four interleaved
sub-images, not crops; ``split="polyphase"``, tokens ordered ``(l hp wp)``) and passes every view
through 8-bit PIL images (``quantize``: x -> floor(255 x) / 255).

Pixels in are NHWC floats in [0, 1]; each encoder's normalisation is applied here (``Encoder``:
SigLIP mean = std = 0.5, DINOv2 ImageNet mean / std, CLIP its own). The encoders are a list
(``Encoder``: module, normalisation, shallow and deep blocks): RealCustom++'s SigLIP + DINOv2, or
one encoder alone (the ShapeWorld base model's CLIP).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from customjax.models.pixels import RESIZES, normalize, resize_images  # noqa: F401  (part of this API)
from customjax.models.vit import CLIPVisionModel, SiglipVisionModel

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("crops", "polyphase")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """The views of a reference. image_size: the encoders' view (384). scale: the high-resolution view
    is scale * image_size, split into scale^2 views. split: "crops" (paper) | "polyphase" (public).
    resize: how views are resized: "bicubic" (antialiased), "bilinear" (torch ``F.interpolate``,
    align_corners=False, no antialias). global_from_high: take the global view from the
    high-resolution one (bilinear, align_corners=True, as the public code) instead of from the input.
    quantize: round views to 8 bits by truncation (the public code's PIL round trip)."""

    image_size: int = 384
    scale: int = 2
    split: str = "crops"
    resize: str = "bicubic"
    global_from_high: bool = False
    quantize: bool = False

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"FeatureConfig.split={self.split!r}; choose one of {SPLITS}")
        if self.resize not in RESIZES:
            raise ValueError(f"FeatureConfig.resize={self.resize!r}; choose one of {RESIZES}")
        if self.scale < 1 or self.image_size < 1:
            raise ValueError(f"FeatureConfig: image_size={self.image_size}, scale={self.scale} must be positive")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One reference encoder: ``name`` (its parameters' key, and its name in errors), ``module`` (a
    ViT of :mod:`customjax.models.vit`), ``mean`` / ``std`` (its input normalisation), ``shallow``
    (the blocks of the shallow features; the same count L for every encoder), ``deep`` (the block of
    the deep features, None for ``last_hidden_state``)."""

    name: str
    module: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shallow: tuple[int, ...] = ()
    deep: int | None = None


def check_encoders(encoders: Sequence[Encoder]) -> None:
    """At least one encoder, distinct names, and the same number of shallow blocks for each."""
    if not encoders:
        raise ValueError("no reference encoder given")
    if len({e.name for e in encoders}) < len(encoders):
        raise ValueError(f"reference encoders need distinct names, got {[e.name for e in encoders]}")
    if len({len(e.shallow) for e in encoders}) > 1:
        raise ValueError("the encoders' shallow blocks "
                         f"({', '.join(f'{e.name} {e.shallow}' for e in encoders)}) must name the same number of layers")


# The released RealCustom++ encoder ("ShallowDeepPatchfySiglipDinoEncoder"): its views, and its deep
# blocks, feature_index [25] (SigLIP) / [22] (DINOv2); the shallow variant's blocks [7, 13, 19] /
# [4, 10, 16] are the paper's.
PUBLIC_FEATURES = FeatureConfig(split="polyphase", resize="bilinear", global_from_high=True, quantize=True)
PUBLIC_DEEP = {"siglip": 25, "dino": 22}


@flax.struct.dataclass
class ReferenceFeatures:
    """deep (B, n, c0); shallow (B, L*n, c0) or None; high (B, scale^2 * n, c0) or None."""

    deep: jax.Array
    shallow: jax.Array | None
    high: jax.Array | None


# ----------------------------------------------------------------------------------------------
# Preprocessing


def reference_views(images: jax.Array, config: FeatureConfig = FeatureConfig()) -> tuple[jax.Array, jax.Array]:
    """(global view (B, S, S, C), high-resolution views (B, scale^2, S, S, C)) of [0, 1] images,
    S = image_size. Crops go row by row (top-left, top-right, ...); polyphase views are ordered
    by (row offset, column offset), as the public rearrange."""
    c, S, k = config, config.image_size, config.scale
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}")
    big = resize_images(images, S * k, c.resize)
    glob = (resize_images(big, S, "bilinear_align_corners") if c.global_from_high
            else resize_images(images, S, c.resize))
    B, C = images.shape[0], images.shape[-1]
    if c.split == "crops":
        views = big.reshape(B, k, S, k, S, C).transpose(0, 1, 3, 2, 4, 5)
    else:
        views = big.reshape(B, S, k, S, k, C).transpose(0, 2, 4, 1, 3, 5)
    views = views.reshape(B, k * k, S, S, C)
    if c.quantize:
        glob, views = (jnp.floor(jnp.clip(v, 0.0, 1.0) * 255.0) / 255.0 for v in (glob, views))
    return glob, views


# ----------------------------------------------------------------------------------------------
# Encoding


def _layers(what: str, model: nn.Module, params: Any, pixels: jax.Array, blocks: tuple[int, ...],
            deep: int | None) -> tuple[list[jax.Array], jax.Array]:
    """Patch tokens (prefix tokens dropped) of the given blocks and of the deep layer.

    The patch grid of an S px view is (S // patch)^2 (VALID convolution: 384 px at patch 14 is
    27 x 27, the last 6 pixels unseen). CLIP and SigLIP get ``interpolate_pos_encoding`` only when
    that grid differs from the model's own (image_size // patch); DINOv2 resizes by itself."""
    cfg = model.config
    h, w = pixels.shape[1:3]
    if h != w:
        raise ValueError(f"{what}: views must be square, got {h}x{w}px")
    n_layers = cfg.num_hidden_layers
    for j in (*blocks, *(() if deep is None else (deep,))):
        if not 0 <= j < n_layers:
            raise ValueError(f"{what}: block {j} does not exist (the model has blocks 0..{n_layers - 1})")
    side = h // cfg.patch_size
    if side < 1:
        raise ValueError(f"{what}: a view of {h}px is smaller than the patch size {cfg.patch_size}")
    kw = ({"interpolate_pos_encoding": side != cfg.image_size // cfg.patch_size}
          if isinstance(model, (SiglipVisionModel, CLIPVisionModel)) else {})
    out = model.apply({"params": params}, pixels, **kw)
    grid = side ** 2
    prefix = out.last_hidden_state.shape[1] - grid
    if prefix < 0:
        raise ValueError(f"{what}: {out.last_hidden_state.shape[1]} tokens for a {grid}-patch grid")
    patches = lambda x: x[:, prefix:]
    shallow = [patches(out.hidden_states[j + 1]) for j in blocks]
    return shallow, patches(out.last_hidden_state if deep is None else out.hidden_states[deep + 1])


def reference_features(images: jax.Array, encoders: Sequence[Encoder], params: Mapping[str, Any],
                       config: FeatureConfig = FeatureConfig(), *, shallow: bool = True,
                       high: bool = True) -> ReferenceFeatures:
    """The CCP's inputs from reference images (B, H, W, 3) in [0, 1].

    ``encoders``: run side by side on the same views, their patch tokens concatenated along the
    channels in this order (RealCustom++: SigLIP, DINOv2; the ShapeWorld base: one CLIP);
    ``params[encoder.name]``: their parameters. ``shallow`` / ``high`` = False skip those features
    (no high-resolution views are encoded then)."""
    c = config
    check_encoders(encoders)
    B = images.shape[0]
    glob, views = reference_views(images, c)
    k2 = views.shape[1]
    pixels = jnp.concatenate([glob, views.reshape(B * k2, *views.shape[2:])]) if high else glob

    layers, deeps = [], []
    for e in encoders:
        sh, dp = _layers(e.name, e.module, params[e.name], normalize(pixels, e.mean, e.std),
                         e.shallow if shallow else (), e.deep)
        if deeps and dp.shape[1] != deeps[0].shape[1]:
            raise ValueError(f"{encoders[0].name} gives {deeps[0].shape[1]} patch tokens and {e.name} "
                             f"{dp.shape[1]} at {c.image_size}px; their patch grids must agree")
        layers.append([x[:B] for x in sh])
        deeps.append(dp)
    cat = lambda xs: jnp.concatenate([x.astype(xs[0].dtype) for x in xs], axis=-1)
    deep_all = cat(deeps)                                                      # (B [+ B k2], n, c0)
    deep = deep_all[:B]
    shallow_f = jnp.concatenate([cat(xs) for xs in zip(*layers)], axis=1) if shallow and layers[0] else None
    high_f = None
    if high:
        n, c0 = deep.shape[1:]
        loc = deep_all[B:].reshape(B, k2, n, c0)
        if c.split == "polyphase":
            loc = loc.transpose(0, 2, 1, 3)                                     # public order (l hp wp)
        high_f = loc.reshape(B, k2 * n, c0)
    return ReferenceFeatures(deep, shallow_f, high_f)
