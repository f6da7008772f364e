"""The diffusers ``AutoencoderKL`` (the Stable Diffusion VAE) in Flax, NHWC.

    image --encode--> (mean, logvar) --latent_dist_sample--> z --scale_latents--> diffusion latents
    diffusion latents --unscale_latents--> z --decode--> image

Calling convention (diffusers' in brackets; see ``docs/calling_conventions.md``)::

    mean, logvar = vae.apply({"params": p}, images, method="encode")   # [vae.encode(x).latent_dist]
    z = latent_dist_sample(mean, logvar, key)     # [.latent_dist.sample()]; ``mean`` is [.mode()]
    latents = scale_latents(z, config)            # [(z - shift_factor) * scaling_factor]
    images = vae.apply({"params": p}, unscale_latents(latents, config), method="decode")  # [.sample]

Images are NHWC (B, H, W, in_channels) in [-1, 1], latents NHWC (B, h, w, latent_channels) [NCHW
(B, C, H, W): convert with ``x.transpose(0, 2, 3, 1)``; NCHW inputs raise a ``ValueError`` saying
so]. ``encode`` returns the tuple (mean, logvar), not a distribution; ``decode`` the image array
itself, not an output with ``.sample``. With f = 2**(blocks - 1) (8 for SD), ``encode`` gives
h = H // f as diffusers does (its down-samplers pad right/bottom by one, then floor), so a side
that is not a multiple of f loses its last H % f pixels: decode(encode(x)) is (H // f * f) pixels
high. Resize or crop images to multiples of f first, as diffusers' ``VaeImageProcessor`` does.

Submodules carry the diffusers names, so a diffusers ``vae`` folder loads with
``load_pretrained(folder, VAE)``. GroupNorms use the two-pass variance (``use_fast_variance=False``)
and eps 1e-6 as diffusers does, for parity with ``torch.nn.GroupNorm``.

Resnets and down/upsamplers come from :mod:`customjax.models.blocks` (shared with the UNet, used
without time embedding); the mid-block attention is VAE-local (plain, single-head, no control hooks).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, check_nhwc, conv, group_norm
from customjax.models.layers import multihead_attention, split_heads
from customjax.weights.loaders import ModelSpec

log = logging.getLogger(__name__)

EPS = 1e-6  # diffusers' VAE uses 1e-6 in every GroupNorm (the UNet 1e-5).
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The ``config.json`` fields of a diffusers ``AutoencoderKL`` that this implementation uses."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"  # validated; the shared blocks use SiLU
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32  # diffusers uses it for tiling only; unused here.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Validates a diffusers config dict; unsupported settings raise ``ValueError``."""
        d = dict(d)
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(d.pop(key, (want,) * n))
            bad = [t for t in types if t != want]
            if bad or len(types) != n:
                raise ValueError(f"VAE config: {key}={list(types)} is not supported; expected "
                                 f"{n} x {want!r} (one per block_out_channels entry)")
        act = d.get("act_fn", cls.act_fn)
        if act not in ("silu", "swish"):
            raise ValueError(f"VAE config: act_fn={act!r} is not supported (only silu / swish)")
        # force_upcast only tells pipelines to run the VAE in float32; the caller picks `dtype`.
        ignored = {"force_upcast"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in ignored and not k.startswith("_"))
        if unknown:
            log.warning("VAE config: ignoring unknown keys %s", unknown)
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("block_out_channels", "latents_mean", "latents_std"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        for c in cfg.block_out_channels:
            if c % cfg.norm_num_groups:
                raise ValueError(f"VAE config: block_out_channels entry {c} is not divisible by "
                                 f"norm_num_groups={cfg.norm_num_groups}")
        return cfg


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual
    (diffusers ``Attention`` as the VAE mid block builds it)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = group_norm(self.groups, EPS, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        q, k, v = (split_heads(dense(n)(h), 1) for n in ("to_q", "to_k", "to_v"))
        h = dense("to_out_0")(multihead_attention(q, k, v))
        return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = lambda i: ResnetBlock2D(self.channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{i}")
        x = resnet(0)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional :class:`Downsample2D`."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, asymmetric_pad=True, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional :class:`Upsample2D`."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2*latent_channels), f = 2**(blocks-1)."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, g = self.config, self.config.norm_num_groups
        chans = cfg.block_out_channels
        x = conv(chans[0], 3, "conv_in", dtype=self.dtype)(x.astype(self.dtype))
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(c, cfg.layers_per_block, g, i < len(chans) - 1, self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(g, EPS, "conv_norm_out", self.dtype)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, g = self.config, self.config.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, "conv_in", dtype=self.dtype)(z.astype(self.dtype))
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, g, i < len(chans) - 1, self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(g, EPS, "conv_norm_out", self.dtype)(x))
        return conv(cfg.out_channels, 3, "conv_out", dtype=self.dtype)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Use ``apply(..., method="encode" | "decode")``; ``__call__`` (encode, then
    decode the mean, or a sample when ``key`` is given) exists for ``init``.

    ``dtype`` is the compute dtype; parameters are float32.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, None, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, None, dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image (B, H, W, C) in [-1, 1] -> (mean, logvar) of the latent Gaussian, each
        (B, H // f, W // f, latent_channels); logvar clamped to [-30, 20] as diffusers does.
        diffusers' ``latent_dist.mean`` / ``.logvar``; sample with :func:`latent_dist_sample`."""
        check_nhwc(x, self.config.in_channels, "images")
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels), unscaled (see :func:`unscale_latents`) -> image
        (B, h * f, w * f, out_channels), the array itself (diffusers' ``decode(z).sample``)."""
        check_nhwc(z, self.config.latent_channels, "latents", "latent_channels")
        z = jnp.asarray(z).astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mean, logvar = self.encode(x)
        z = mean if key is None else latent_dist_sample(mean, logvar, key)
        return self.decode(z)


def latent_dist_std(logvar: jax.Array) -> jax.Array:
    """Standard deviation exp(logvar / 2) of the latent Gaussian."""
    return jnp.exp(0.5 * logvar)


def latent_dist_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw mean + std * N(0, 1) from the diagonal Gaussian returned by ``encode``."""
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + latent_dist_std(logvar) * noise


def _per_channel(values: Sequence[float], like: jax.Array) -> jax.Array:
    return jnp.asarray(values, like.dtype).reshape((1,) * (like.ndim - 1) + (-1,))


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the diffusion model's latents, as diffusers pipelines do it:
    ``(z - shift_factor) * scaling_factor``, or ``(z - latents_mean) * scaling_factor / latents_std``
    when the config has per-channel ``latents_mean`` / ``latents_std`` (channels last)."""
    if config.latents_mean is not None and config.latents_std is not None:
        return (z - _per_channel(config.latents_mean, z)) * config.scaling_factor / _per_channel(config.latents_std, z)
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """The inverse of :func:`scale_latents`, applied before ``decode``."""
    if config.latents_mean is not None and config.latents_std is not None:
        return z * _per_channel(config.latents_std, z) / config.scaling_factor + _per_channel(config.latents_mean, z)
    z = z / config.scaling_factor
    if config.shift_factor is not None:
        z = z + config.shift_factor
    return z


_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename(key: str) -> str:
    """Old diffusers checkpoints name the mid-block attention ``query/key/value/proj_attn``."""
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION:
        parts[-2] = _DEPRECATED_ATTENTION[parts[-2]]
    return ".".join(parts)


def _dummy_inputs(config: VAEConfig) -> tuple:
    size = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, size, size, config.in_channels), jnp.float32),)


VAE = ModelSpec(
    config_from_dict=VAEConfig.from_dict,
    build=lambda config, dtype: AutoencoderKL(config, dtype),
    dummy_inputs=_dummy_inputs,
    rename=_rename,
)
