"""Vision transformers used as image encoders: CLIP ViT, SigLIP, DINOv2 (with or without
register tokens) and ViT (DINO v1), after transformers' ``CLIPVisionModel[WithProjection]``,
``SiglipVisionModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``ViTModel``.

Pixel values are **NHWC** (B, H, W, C), already normalised by the model's image processor.
Every model returns a :class:`VisionOutput` with all hidden states (embeddings output first, as
transformers returns them). Parameters are float32; ``dtype`` is the compute dtype.

Position embeddings are resized to other input sizes with the bicubic kernels of torch's
``F.interpolate(mode="bicubic", align_corners=False)`` (with ``antialias=True`` for DINOv2 with
registers), reproduced exactly as weight matrices: see :func:`bicubic_matrix`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from customjax.models.clip_text import (MLP, Encoder, SelfAttention, check_act, check_heads, config_kwargs,
                                        require, tower_config, tower_rename, tower_skip)
from customjax.models.layers import multihead_attention, split_heads
from customjax.weights.loaders import ModelSpec


@struct.dataclass
class VisionOutput:
    """``last_hidden_state``: final-normed tokens (CLIP: the last layer's output, unnormed, as
    transformers); ``hidden_states``: embeddings output then every layer's output;
    ``pooler_output``: CLS (CLIP: post-LayerNorm, DINOv2: after the final norm) or SigLIP's
    attention-pooling head (``None`` without head); ``image_embeds``: CLIP's ``visual_projection``
    of the pooled output, ``None`` otherwise."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooler_output: jax.Array | None
    image_embeds: jax.Array | None = None


# ----------------------------------------------------------------------------------------------
# Bicubic resizing of position embeddings


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, *, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) matrix of torch's 1-D bicubic resampling, ``align_corners=False``.

    ``scale_factor`` is the one passed to ``F.interpolate`` (output/input); ``None`` means
    ``size=`` was passed and the scale is n_in/n_out. Without antialias: Keys cubic, a = -0.75,
    4 taps with indices clamped at the borders, source coordinates in float32 as torch computes
    them. With antialias: a = -0.5, the kernel widened by the downscale factor, out-of-range taps
    dropped and the weights renormalised; a dimension whose size does not change is copied.
    """
    m = np.zeros((n_out, n_in), np.float64)
    if antialias:
        if n_in == n_out:
            return np.eye(n_in)
        s = 1.0 / scale_factor if scale_factor else n_in / n_out
        support, inv = (2.0 * s, 1.0 / s) if s >= 1.0 else (2.0, 1.0)
        for i in range(n_out):
            center = s * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
            m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
        return m
    f = np.float32
    s = f(1.0 / scale_factor) if scale_factor else f(n_in) / f(n_out)
    for i in range(n_out):
        x = s * (f(i) + f(0.5)) - f(0.5)
        x0 = int(np.floor(x))
        t = float(x - f(x0))
        for k, w in enumerate((_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w
    return m


def resize_bicubic(grid: jax.Array, size: tuple[int, int], *, scale_factor: tuple[float, float] | None = None,
                   antialias: bool = False) -> jax.Array:
    """(H, W, C) -> (*size, C), as torch's bicubic ``F.interpolate`` on the NCHW equivalent (in float32)."""
    (h, w), (oh, ow) = grid.shape[:2], size
    sh, sw = scale_factor if scale_factor is not None else (None, None)
    mh = jnp.asarray(bicubic_matrix(h, oh, scale_factor=sh, antialias=antialias), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, ow, scale_factor=sw, antialias=antialias), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,hwc->owc", mh, grid.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,owc->opc", mw, out, precision=hi)


def interpolate_pos_embed(table: jax.Array, grid: tuple[int, int], *, offset: float = 0.0,
                          antialias: bool = False) -> jax.Array:
    """Square (N, D) patch position table -> (grid_h * grid_w, D).

    ``offset == 0`` resizes to the grid (``size=``, as transformers); ``offset > 0`` passes
    ``scale_factor=((grid + offset) / sqrt(N))`` as the original DINOv2 code (offset 0.1) did.
    """
    n = math.isqrt(table.shape[0])
    if n * n != table.shape[0]:
        raise ValueError(f"position embeddings of {table.shape[0]} patches are not a square grid")
    sf = None if not offset else ((grid[0] + offset) / n, (grid[1] + offset) / n)
    out = resize_bicubic(table.reshape(n, n, -1), grid, scale_factor=sf, antialias=antialias)
    return out.reshape(grid[0] * grid[1], -1)


def _check_image(what: str, pixel_values: jax.Array, channels: int) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != channels:
        raise ValueError(f"{what}: pixel_values must be NHWC with {channels} channels, "
                         f"got shape {pixel_values.shape}")


def _pos_for(what: str, table: jax.Array, height: int, width: int, patch: int, image_size: int,
             interpolate: bool, **kw) -> jax.Array:
    """The (tokens, D) patch position embeddings for an input of height x width pixels, resized
    unless it has the pretraining token count and is square (transformers' test).

    The grid is (height // patch, width // patch): the patch embedding is a VALID strided
    convolution, so trailing pixels that do not fill a patch are dropped (384 px at patch 14: 27,
    the last 6 pixels unseen), as in transformers and timm. Without ``interpolate`` the grid must be
    the model's own, (image_size // patch)^2 (transformers fails on any other token count)."""
    grid = (height // patch, width // patch)
    own = image_size // patch
    if min(grid) < 1:
        raise ValueError(f"{what}: input size {height}x{width} is smaller than the patch size {patch}")
    if not interpolate and grid != (own, own):
        raise ValueError(f"{what}: input size {height}x{width} gives a {grid[0]}x{grid[1]} patch grid, the model's "
                         f"{image_size}px gives {own}x{own}; pass interpolate_pos_encoding=True")
    if grid[0] * grid[1] == table.shape[0] and height == width:
        return table
    return interpolate_pos_embed(table, grid, **kw)


# ----------------------------------------------------------------------------------------------
# CLIP ViT


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` (defaults as there) plus ``with_projection``."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    with_projection: bool = False

    @classmethod
    def from_dict(cls, d: dict, with_projection: bool | None = None) -> "CLIPVisionConfig":
        """From a ``CLIPVisionModel[WithProjection]`` or full ``CLIPModel`` ``config.json``;
        ``with_projection=None`` decides from the folder (``CLIPModel`` or an ``architectures``
        entry ``CLIPVisionModelWithProjection``)."""
        what = "CLIP vision config"
        v, full = tower_config(d, tower="vision_config", full=("clip",), single=("clip_vision_model",), what=what)
        kw = config_kwargs(cls, v, what=what)
        kw.pop("with_projection", None)
        if full:
            config_kwargs(cls, d, what="CLIP config", ignore={"text_config", "vision_config",
                                                                "text_config_dict", "vision_config_dict"})
            if "projection_dim" in d:
                kw["projection_dim"] = d["projection_dim"]
        if with_projection is None:
            with_projection = full or "CLIPVisionModelWithProjection" in (d.get("architectures") or ())
        cfg = cls(**kw, with_projection=bool(with_projection))
        _check_vit(what, cfg)
        return cfg


def _check_vit(what: str, cfg: Any) -> None:
    for key in ("image_size", "patch_size"):
        value = getattr(cfg, key)
        require(isinstance(value, int) and value > 0, what, key, value, "only square sizes (one int) are supported")
    check_act(what, cfg.hidden_act)
    check_heads(what, cfg.hidden_size, cfg.num_attention_heads)


class CLIPVisionEmbeddings(nn.Module):
    """Class embedding + bias-free patch convolution + learned positions."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        c = self.config
        b, h, w, _ = pixel_values.shape
        cls = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5), (c.hidden_size,))
        patches = nn.Conv(c.hidden_size, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, padding="VALID",
                          use_bias=False, dtype=self.dtype, name="patch_embedding")(pixel_values)
        patches = patches.reshape(b, -1, c.hidden_size)
        n = (c.image_size // c.patch_size) ** 2 + 1
        table = nn.Embed(n, c.hidden_size, dtype=self.dtype, name="position_embedding").embedding
        pos = _pos_for("CLIP vision", table[1:], h, w, c.patch_size, c.image_size, interpolate_pos_encoding)
        pos = jnp.concatenate([table[:1], pos.astype(table.dtype)])
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        return x + pos.astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (sic), encoder, ``post_layernorm`` of the CLS token (``vision_model.*``)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False):
        c = self.config
        x = CLIPVisionEmbeddings(c, dtype=self.dtype, name="embeddings")(pixel_values, interpolate_pos_encoding)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        layers = Encoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, dtype=self.dtype, name="encoder")(x)
        pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(layers[-1][:, 0])
        return layers[-1], (x, *layers), pooled


class CLIPVisionModel(nn.Module):
    """CLIP image encoder; ``visual_projection`` -> ``image_embeds`` when ``config.with_projection``.

    ``pixel_values`` NHWC; other sizes than ``config.image_size`` need ``interpolate_pos_encoding``.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> VisionOutput:
        _check_image("CLIPVisionModel", pixel_values, self.config.num_channels)
        last, hidden, pooled = CLIPVisionTransformer(self.config, dtype=self.dtype, name="vision_model")(
            pixel_values, interpolate_pos_encoding)
        embeds = None
        if self.config.with_projection:
            embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                              name="visual_projection")(pooled)
        return VisionOutput(last, hidden, pooled, embeds)


def _dummy_image(cfg: Any) -> tuple:
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def clip_vision_spec(with_projection: bool | None = None) -> ModelSpec:
    """ModelSpec for a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or full ``CLIPModel``
    folder (the text tower's tensors are skipped and logged)."""
    return ModelSpec(
        config_from_dict=functools.partial(CLIPVisionConfig.from_dict, with_projection=with_projection),
        build=lambda cfg, dtype: CLIPVisionModel(cfg, dtype=dtype),
        dummy_inputs=_dummy_image,
        rename=tower_rename("vision_model", ("visual_projection",)),
        skip=tower_skip(("text_model", "text_projection", "logit_scale", "logit_bias")),
    )


CLIP_VISION = clip_vision_spec()
# CLIP's pixel normalisation (OpenAI CLIP, and the ShapeWorld CLIP trained here).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# SigLIP


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers ``SiglipVisionConfig`` (defaults as there); so400m-patch14-384 is hidden 1152,
    intermediate 4304, 27 layers, 16 heads, image 384, patch 14."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipVisionConfig":
        """From a ``SiglipVisionModel`` or full ``SiglipModel`` ``config.json``."""
        what = "SigLIP vision config"
        v, full = tower_config(d, tower="vision_config", full=("siglip",), single=("siglip_vision_model",),
                               what=what)
        if full:
            config_kwargs(cls, d, what="SigLIP config", ignore={"text_config", "vision_config"})
        cfg = cls(**config_kwargs(cls, v, what=what))
        _check_vit(what, cfg)
        return cfg


class SiglipVisionEmbeddings(nn.Module):
    """Patch convolution (with bias) + learned positions; no class token."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        c = self.config
        b, h, w, _ = pixel_values.shape
        x = nn.Conv(c.hidden_size, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, padding="VALID",
                    dtype=self.dtype, name="patch_embedding")(pixel_values).reshape(b, -1, c.hidden_size)
        n = (c.image_size // c.patch_size) ** 2
        table = nn.Embed(n, c.hidden_size, dtype=self.dtype, name="position_embedding").embedding
        pos = _pos_for("SigLIP vision", table, h, w, c.patch_size, c.image_size, interpolate_pos_encoding)
        return x + pos.astype(self.dtype)


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (batch_first) parameter layout: packed ``in_proj_weight``
    (3D, D) and ``in_proj_bias`` (3D,) kept as torch stores them, and an ``out_proj`` Linear."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, kv: jax.Array) -> jax.Array:
        d = q.shape[-1]
        w = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * d, d)).astype(self.dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,)).astype(self.dtype)
        wq, wk, wv = jnp.split(w, 3)
        bq, bk, bv = jnp.split(bias, 3)
        q, kv = q.astype(self.dtype), kv.astype(self.dtype)
        heads = lambda x, w_, b_: split_heads(x @ w_.T + b_, self.heads)
        out = multihead_attention(heads(q, wq, bq), heads(kv, wk, bk), heads(kv, wv, bv))
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class SiglipAttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (``head.*``): a learned ``probe`` query attends over
    the tokens, then a residual LayerNorm + MLP; returns (B, D)."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, c.hidden_size))
        h = TorchMultiheadAttention(c.num_attention_heads, dtype=self.dtype, name="attention")(
            jnp.broadcast_to(probe, (x.shape[0], 1, c.hidden_size)), x)
        y = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(h)
        return (h + MLP(c.intermediate_size, c.hidden_act, dtype=self.dtype, name="mlp")(y))[:, 0]


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder, ``post_layernorm`` on all tokens, pooling ``head`` (``vision_model.*``)."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> VisionOutput:
        c = self.config
        x = SiglipVisionEmbeddings(c, dtype=self.dtype, name="embeddings")(pixel_values, interpolate_pos_encoding)
        layers = Encoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, dtype=self.dtype, name="encoder")(x)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(layers[-1])
        pooled = SiglipAttentionPoolingHead(c, dtype=self.dtype, name="head")(last) if c.vision_use_head else None
        return VisionOutput(last, (x, *layers), pooled)


class SiglipVisionModel(nn.Module):
    """SigLIP image encoder; ``pixel_values`` NHWC; ``pooler_output`` from the attention-pooling head."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> VisionOutput:
        _check_image("SiglipVisionModel", pixel_values, self.config.num_channels)
        return SiglipVisionTransformer(self.config, dtype=self.dtype, name="vision_model")(
            pixel_values, interpolate_pos_encoding)


SIGLIP_VISION = ModelSpec(
    config_from_dict=SiglipVisionConfig.from_dict,
    build=lambda cfg, dtype: SiglipVisionModel(cfg, dtype=dtype),
    dummy_inputs=_dummy_image,
    rename=tower_rename("vision_model", ()),
    skip=tower_skip(("text_model", "logit_scale", "logit_bias")),
)


# ----------------------------------------------------------------------------------------------
# DINOv2


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """transformers ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` (defaults as there).

    ``interpolate_antialias`` is set from the model type (transformers resizes the position
    embeddings of the register variant with ``antialias=True``); ``interpolate_offset`` (ours, 0 by
    default = transformers) set to 0.1 reproduces the original DINOv2 code's ``scale_factor``.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "Dinov2Config":
        what = "DINOv2 config"
        model_type = d.get("model_type", "dinov2")
        require(model_type in ("dinov2", "dinov2_with_registers"), what, "model_type", model_type,
                "expected 'dinov2' or 'dinov2_with_registers'")
        backbone = {"apply_layernorm", "reshape_hidden_states", "out_features", "out_indices", "stage_names",
                    "intermediate_size"}  # backbone-only settings; the MLP width comes from mlp_ratio
        kw = config_kwargs(cls, d, what=what, ignore=backbone)
        kw.pop("interpolate_antialias", None)
        registers = model_type == "dinov2_with_registers"
        if registers:
            kw.setdefault("num_register_tokens", 4)
            kw["use_mask_token"] = True
        else:
            require(not kw.get("num_register_tokens"), what, "num_register_tokens", kw.get("num_register_tokens"),
                    "register tokens need model_type 'dinov2_with_registers'")
        cfg = cls(**kw, interpolate_antialias=registers)
        _check_vit(what, cfg)
        return cfg

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden


class Dinov2PatchEmbeddings(nn.Module):
    """``patch_embeddings.projection``: a strided convolution; (B, H, W, C) -> (B, h*w, D)."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Conv(c.hidden_size, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, padding="VALID",
                    dtype=self.dtype, name="projection")(pixel_values)
        return x.reshape(x.shape[0], -1, c.hidden_size)


class Dinov2Embeddings(nn.Module):
    """CLS token, patches (optionally replaced by ``mask_token``), positions resized to the input
    grid, then register tokens after CLS."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        c = self.config
        b, h, w, _ = pixel_values.shape
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size))
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, c.hidden_size)) if c.use_mask_token else None
        table = self.param("position_embeddings", init, (1, (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size))
        x = Dinov2PatchEmbeddings(c, dtype=self.dtype, name="patch_embeddings")(pixel_values)
        if bool_masked_pos is not None:
            if mask_token is None:
                raise ValueError("bool_masked_pos needs a model with use_mask_token=True")
            x = jnp.where(bool_masked_pos[..., None], mask_token.astype(x.dtype), x)
        pos = _pos_for("DINOv2", table[0, 1:], h, w, c.patch_size, c.image_size, True,
                       offset=c.interpolate_offset, antialias=c.interpolate_antialias)
        pos = jnp.concatenate([table[0, :1], pos.astype(table.dtype)])
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        if c.num_register_tokens:
            reg = self.param("register_tokens", nn.initializers.zeros, (1, c.num_register_tokens, c.hidden_size))
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, *reg.shape[1:])).astype(x.dtype), x[:, 1:]], 1)
        return x


class LayerScale(nn.Module):
    """Per-channel scale ``lambda1``."""

    value: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lam = self.param("lambda1", nn.initializers.constant(self.value), (x.shape[-1],))
        return x * lam.astype(x.dtype)


class SwiGLUFFN(nn.Module):
    """DINOv2-giant MLP: packed ``weights_in`` -> silu(gate) * up -> ``weights_out``."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(nn.Dense(2 * self.hidden, dtype=self.dtype, name="weights_in")(x), 2, axis=-1)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="weights_out")(jax.nn.silu(gate) * up)


class Dinov2Layer(nn.Module):
    """Pre-LN block with layer scale on both residual branches."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        attn = SelfAttention(c.num_attention_heads, out_name="o_proj", qkv_bias=c.qkv_bias, dtype=self.dtype,
                             name="attention")
        x = x + LayerScale(c.layerscale_value, name="layer_scale1")(attn(norm("norm1")(x)))
        mlp = (SwiGLUFFN(c.mlp_hidden, dtype=self.dtype, name="mlp") if c.use_swiglu_ffn
               else MLP(c.mlp_hidden, c.hidden_act, dtype=self.dtype, name="mlp"))
        return x + LayerScale(c.layerscale_value, name="layer_scale2")(mlp(norm("norm2")(x)))


class Dinov2Encoder(nn.Module):
    """``encoder.layer.N``; returns every layer's output."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    def setup(self):
        self.layer = [Dinov2Layer(self.config, dtype=self.dtype) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for layer in self.layer:
            x = layer(x)
            outs.append(x)
        return outs


class Dinov2Model(nn.Module):
    """DINOv2 (with registers when ``config.num_register_tokens``); ``pixel_values`` NHWC of any
    size (floor(size / patch) patches per side; position embeddings are resized as transformers
    does: DINOv2-L/14 reg4 at 384 px resizes its 37 x 37 grid to 27 x 27, bicubic, antialiased).

    ``bool_masked_pos`` (B, num_patches) replaces those patches by ``mask_token``. Token order:
    CLS, registers, patches; ``pooler_output`` is the normed CLS token.
    """

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> VisionOutput:
        c = self.config
        _check_image("Dinov2Model", pixel_values, c.num_channels)
        x = Dinov2Embeddings(c, dtype=self.dtype, name="embeddings")(pixel_values, bool_masked_pos)
        layers = Dinov2Encoder(c, dtype=self.dtype, name="encoder")(x)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(layers[-1])
        return VisionOutput(last, (x, *layers), last[:, 0])


_DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _dinov2_rename(key: str) -> str:
    """Checkpoint attention names (``attention.attention.query``, ``attention.output.dense``) ->
    the q/k/v/o_proj names transformers itself now uses internally, which we use too."""
    for old, new in _DINOV2_RENAMES:
        key = key.replace(old, new)
    return key


DINOV2 = ModelSpec(
    config_from_dict=Dinov2Config.from_dict,
    build=lambda cfg, dtype: Dinov2Model(cfg, dtype=dtype),
    dummy_inputs=_dummy_image,
    rename=_dinov2_rename,
    skip=lambda key: key.endswith("position_ids"),
)


# ----------------------------------------------------------------------------------------------
# ViT (DINO v1: facebook/dino-vits16, the DreamBench DINO-I encoder)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """transformers ``ViTConfig`` (defaults as there; ``facebook/dino-vits16`` is hidden 384, 12
    layers, 6 heads, patch 16, 224 px)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        what = "ViT config"
        require(d.get("model_type", "vit") == "vit", what, "model_type", d.get("model_type"), "expected 'vit'")
        # pooler settings: the pooler head is not part of this model (its tensors are skipped, logged);
        # encoder_stride is for ViTForMaskedImageModeling only
        kw = config_kwargs(cls, d, what=what, ignore={"encoder_stride", "pooler_output_size", "pooler_act"})
        cfg = cls(**kw)
        require(cfg.qkv_bias, what, "qkv_bias", cfg.qkv_bias, "only ViTs with query / key / value biases are supported")
        _check_vit(what, cfg)
        return cfg


class ViTModel(nn.Module):
    """transformers ``ViTModel`` without its pooler head; ``pooler_output`` is the final-normed CLS
    token (the DINO embedding DreamBench's DINO-I compares). ``pixel_values`` NHWC at the model's
    own size (``interpolate_pos_encoding=True`` resizes the positions as transformers does)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> VisionOutput:
        c = self.config
        _check_image("ViTModel", pixel_values, c.num_channels)
        x = ViTEmbeddings(c, dtype=self.dtype, name="embeddings")(pixel_values, interpolate_pos_encoding)
        layers = Encoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, dtype=self.dtype, name="encoder")(x)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(layers[-1])
        return VisionOutput(last, (x, *layers), last[:, 0])


class ViTEmbeddings(nn.Module):
    """CLS token, patch projection, position embeddings (``embeddings.*``)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate: bool = False) -> jax.Array:
        c = self.config
        b, h, w, _ = pixel_values.shape
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size))
        table = self.param("position_embeddings", init, (1, (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size))
        x = Dinov2PatchEmbeddings(c, dtype=self.dtype, name="patch_embeddings")(pixel_values)
        pos = _pos_for("ViT", table[0, 1:], h, w, c.patch_size, c.image_size, interpolate)
        pos = jnp.concatenate([table[0, :1], pos.astype(table.dtype)])
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)).astype(x.dtype), x], axis=1)
        return x + pos.astype(x.dtype)


_VIT_RENAMES = (
    (".layernorm_before.", ".layer_norm1."), (".layernorm_after.", ".layer_norm2."),
    (".attention.attention.query.", ".self_attn.q_proj."), (".attention.attention.key.", ".self_attn.k_proj."),
    (".attention.attention.value.", ".self_attn.v_proj."), (".attention.output.dense.", ".self_attn.out_proj."),
    (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2."),
)


def _vit_rename(key: str) -> str:
    """transformers' ViT layer names -> the shared pre-LN :class:`Encoder`'s (``encoder.layers.N``,
    ``layer_norm1/2``, ``self_attn``, ``mlp.fc1/2``); a ``vit.`` prefix (ViTFor* heads' backbone) dropped."""
    key = key[4:] if key.startswith("vit.") else key
    key = key.replace("encoder.layer.", "encoder.layers.", 1)
    for old, new in _VIT_RENAMES:
        key = key.replace(old, new)
    return key


VIT = ModelSpec(
    config_from_dict=ViTConfig.from_dict,
    build=lambda cfg, dtype: ViTModel(cfg, dtype=dtype),
    dummy_inputs=_dummy_image,
    rename=_vit_rename,
    # the pooler head (dense + tanh) is not used by DINO-I (the CLS token is); a classifier head neither
    skip=lambda key: key.endswith("position_ids") or key.startswith(("pooler.", "vit.pooler.", "classifier.")),
)
