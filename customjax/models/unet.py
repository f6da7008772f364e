"""diffusers ``UNet2DConditionModel`` in Flax, with attention control (see
:mod:`customjax.control.spec`) and optional rematerialisation of blocks.

Calling convention (diffusers' in brackets; see ``docs/calling_conventions.md``)::

    pred = module.apply({"params": params}, sample, timesteps, encoder_hidden_states,
                        text_embeds=None, time_ids=None, control=None)

* ``sample``: latents NHWC (B, H, W, in_channels) [NCHW: convert with ``x.transpose(0, 2, 3, 1)``],
  already scaled by :func:`customjax.models.vae.scale_latents`. Any H, W, as in diffusers: sides that
  are not multiples of 2**(blocks - 1) (a 360 px image gives 45 x 45) go down to ceil sizes and each
  up-sampler resizes (nearest) to its skip's size.
* ``timesteps``: () or (B,) [``timestep``].
* ``encoder_hidden_states``: text (B, N, cross_attention_dim), or (L, B, N, D), one sequence per
  cross-attention layer.
* SDXL (``addition_embed_type="text_time"``): ``text_embeds`` (B, D_pool) and ``time_ids`` (B, 6)
  as keywords [``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``].
* ``control``: a :class:`~customjax.control.spec.Control` with the per-call inputs of the extension
  points set statically in the module's ``control`` field [no ``cross_attention_kwargs``].
* Returns the prediction array (B, H, W, out_channels) itself [``.sample``; no ``return_dict``].

NCHW latents raise a ``ValueError`` saying so; diffusers' keyword names (``timestep``,
``added_cond_kwargs``, ``return_dict``, ...) a ``TypeError`` naming ours. All checks are static
shape checks at trace time.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.control.spec import Control, ControlConfig
from customjax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, check_nhwc, conv, group_norm
from customjax.models.embeddings import TimestepEmbedding, timestep_features
from customjax.models.transformer import Transformer2DModel
from customjax.models.unet_config import UNetConfig
from customjax.weights.loaders import ModelSpec


class UNetBlock(nn.Module):
    """One down, mid or up block: resnets, each optionally followed by a Transformer2DModel
    (``transformer_layers[j] > 0``), then an optional down/upsampler. Up blocks consume skips.

    ``factor`` is the block's feature-map downsampling relative to the latent, ``layer_offset`` the
    UNet-wide index of its first cross-attention layer.
    """

    config: UNetConfig
    kind: str                          # "down" | "mid" | "up"
    channels: int
    heads: int
    transformer_layers: tuple[int, ...]
    resample: bool
    factor: int
    layer_offset: int
    control: ControlConfig
    remat: bool
    dtype: Any

    @nn.compact
    def __call__(self, h, emb, ctx, control, skips=None):
        c = self.config
        res_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        outputs, offset = [], self.layer_offset
        n_res = len(self.transformer_layers) + (1 if self.kind == "mid" else 0)
        for j in range(n_res):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = res_cls(self.channels, c.norm_num_groups, c.norm_eps, dtype=self.dtype, name=f"resnets_{j}")(h, emb)
            layers = self.transformer_layers[j] if j < len(self.transformer_layers) else 0
            if layers:
                h = Transformer2DModel(self.heads, self.channels // self.heads, layers, c.norm_num_groups,
                                       c.use_linear_projection, offset, self.factor, self.remat,
                                       self.control, self.dtype, name=f"attentions_{j}")(h, ctx, control)
                offset += layers
            outputs.append(h)
        if self.resample and self.kind == "down":
            h = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(h)
            outputs.append(h)
        elif self.resample and self.kind == "up":  # to the size of the skip concatenated next
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h, skips[-1].shape[1:3])
        return h, outputs


# diffusers ``UNet2DConditionModel.forward`` keywords -> what to do here instead.
DIFFUSERS_KEYWORDS = {
    "timestep": "pass timesteps= (or the 2nd positional argument) instead of timestep=",
    "added_cond_kwargs": "pass text_embeds= and time_ids= directly instead of added_cond_kwargs",
    "return_dict": "our UNet returns the array (B, H, W, out_channels) itself, no return_dict "
                   "(drop .sample / [0])",
    "cross_attention_kwargs": "attention extensions are static (the module's control field, a "
                              "ControlConfig) with per-call inputs in control= (a Control); "
                              "there are no cross_attention_kwargs",
    "encoder_attention_mask": "text attention masks are not supported: cross-attention sees every "
                              "token, as the SD / SDXL pipelines do (they pass no mask)",
    "attention_mask": "attention masks are not supported (the SD / SDXL pipelines pass none)",
    "class_labels": "class-conditional UNets are not supported (class_embed_type must be None)",
    "timestep_cond": "timestep_cond (time_cond_proj_dim, LCM) is not supported",
    "down_block_additional_residuals": "ControlNet residuals are not supported",
    "mid_block_additional_residual": "ControlNet residuals are not supported",
    "down_intrablock_additional_residuals": "T2I-Adapter residuals are not supported",
}
_SIGNATURE = ("sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None, "
              "control=None")


def check_inputs(c: UNetConfig, sample, timesteps, encoder_hidden_states, text_embeds, time_ids,
                 extra: dict) -> None:
    """One clear error for a diffusers keyword, an NCHW or mis-shaped input (static shapes only)."""
    if extra:
        k = next((k for k in extra if k in DIFFUSERS_KEYWORDS), next(iter(extra)))
        if k in DIFFUSERS_KEYWORDS:
            raise TypeError(f"UNet2DConditionModel got diffusers' keyword {k}=: {DIFFUSERS_KEYWORDS[k]}")
        raise TypeError(f"UNet2DConditionModel got an unexpected keyword {k}=; it takes ({_SIGNATURE})")
    if isinstance(text_embeds, dict) or isinstance(time_ids, dict):
        raise TypeError(DIFFUSERS_KEYWORDS["added_cond_kwargs"])
    if timesteps is None or encoder_hidden_states is None:
        missing = "timesteps" if timesteps is None else "encoder_hidden_states"
        raise TypeError(f"UNet2DConditionModel needs {missing}: it takes ({_SIGNATURE})")
    check_nhwc(sample, c.in_channels, "sample (latents)")
    B, ts = sample.shape[0], jnp.shape(timesteps)
    if len(ts) > 1 or (len(ts) == 1 and ts[0] not in (1, B)):
        raise ValueError(f"timesteps has shape {ts}; expected () or ({B},) for a batch of {B}")
    ctx, D = jnp.shape(encoder_hidden_states), c.cross_attention_dim[0]
    if len(ctx) not in (3, 4) or ctx[-1] != D:
        raise ValueError(f"encoder_hidden_states has shape {ctx}; expected (B, N, {D}) or, one per "
                         f"cross-attention layer, ({c.num_cross_layers}, B, N, {D}) "
                         f"(cross_attention_dim = {D})")
    if len(ctx) == 4 and ctx[0] != c.num_cross_layers:
        raise ValueError(f"per-layer text has {ctx[0]} sequences; this UNet has "
                         f"{c.num_cross_layers} cross-attention layers")
    if c.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds= (B, D_pool) "
                             "and time_ids= (B, 6)")
        te, ti = jnp.shape(text_embeds), jnp.shape(time_ids)
        got = te[-1] + ti[-1] * c.addition_time_embed_dim if len(te) == len(ti) == 2 else None
        if got != c.projection_class_embeddings_input_dim or te[0] != B or ti[0] != B:
            pool = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            raise ValueError(f"text_embeds {te} and time_ids {ti} do not fit this UNet: expected "
                             f"({B}, {pool}) and ({B}, 6)")


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, text) (or v_theta). Call conventions: the module docstring.

    ``sample`` (B, H, W, C) latents, ``timesteps`` () or (B,), ``encoder_hidden_states`` (B, N, D)
    or one sequence per cross-attention layer (L, B, N, D); SDXL also needs ``text_embeds``
    (B, D_pool) and ``time_ids`` (B, 6). ``control`` carries the per-call inputs of the extension
    points configured in ``control`` (the field). Returns (B, H, W, out_channels).
    """

    config: UNetConfig
    control: ControlConfig = ControlConfig()
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | None = None,
                 encoder_hidden_states: jax.Array | None = None, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None, control: Control | None = None,
                 **diffusers_kwargs) -> jax.Array:
        c = self.config
        check_inputs(c, sample, timesteps, encoder_hidden_states, text_embeds, time_ids, diffusers_kwargs)
        B = sample.shape[0]
        ctx = jnp.asarray(encoder_hidden_states).astype(self.dtype)

        t = jnp.broadcast_to(jnp.asarray(timesteps), (B,))
        emb = timestep_features(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb_dim = c.block_out_channels[0] * 4
        emb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(emb.astype(self.dtype))
        if c.addition_embed_type == "text_time":
            text_embeds, time_ids = jnp.asarray(text_embeds), jnp.asarray(time_ids)
            tids = timestep_features(time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                     c.freq_shift).reshape(B, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), tids], axis=-1).astype(self.dtype)
            emb = emb + TimestepEmbedding(temb_dim, self.dtype, name="add_embedding")(add)

        block = lambda **kw: UNetBlock(config=c, control=self.control, remat=self.remat, dtype=self.dtype, **kw)
        h = conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in", dtype=self.dtype)(sample.astype(self.dtype))
        skips, offset, n = [h], 0, c.num_blocks
        for i, btype in enumerate(c.down_block_types):
            tl = (c.transformer_layers[i] if btype.startswith("CrossAttn") else 0,) * c.layers_per_block[i]
            h, outs = block(kind="down", channels=c.block_out_channels[i], heads=c.heads[i],
                            transformer_layers=tl, resample=i < n - 1, factor=2 ** i,
                            layer_offset=offset, name=f"down_blocks_{i}")(h, emb, ctx, control)
            skips += outs
            offset += sum(tl)
        h, _ = block(kind="mid", channels=c.block_out_channels[-1], heads=c.heads[-1],
                     transformer_layers=(c.transformer_layers[-1],), resample=False, factor=2 ** (n - 1),
                     layer_offset=offset, name="mid_block")(h, emb, ctx, control)
        offset += c.transformer_layers[-1]
        rev_ch, rev_heads = c.block_out_channels[::-1], c.heads[::-1]
        for i, (btype, tl) in enumerate(zip(c.up_block_types, c.up_layers())):
            tl = tl if btype.startswith("CrossAttn") else (0,) * len(tl)
            h, _ = block(kind="up", channels=rev_ch[i], heads=rev_heads[i], transformer_layers=tl,
                         resample=i < n - 1, factor=2 ** (n - 1 - i), layer_offset=offset,
                         name=f"up_blocks_{i}")(h, emb, ctx, control, skips)
            offset += sum(tl)
        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out", self.dtype)(h))
        return conv(c.out_channels, c.conv_out_kernel, "conv_out", dtype=self.dtype)(h)


def dummy_inputs(c: UNetConfig, batch: int = 1, size: int | None = None, text_len: int = 2) -> tuple:
    """Small inputs that trace every parameter (latent side ``size``, default 2**(blocks-1))."""
    s = size or 2 ** (c.num_blocks - 1)
    args = (jnp.zeros((batch, s, s, c.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, text_len, c.cross_attention_dim[0])))
    if c.addition_embed_type == "text_time":
        pool = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        args += (jnp.zeros((batch, pool)), jnp.zeros((batch, 6)))
    return args


UNET = ModelSpec(
    config_from_dict=UNetConfig.from_dict,
    build=lambda cfg, dtype: UNet2DConditionModel(cfg, dtype=dtype),
    dummy_inputs=dummy_inputs,
)
