"""diffusers ``UNet2DConditionModel`` in Flax (NHWC), with attention control (see
:mod:`customjax.control.spec`) and optional rematerialisation of blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.control.spec import Control, ControlConfig
from customjax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm
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
        elif self.resample and self.kind == "up":
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h, outputs


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, text) (or v_theta).

    Call: ``sample`` (B, H, W, C) latents, ``timesteps`` () or (B,), ``encoder_hidden_states``
    (B, N, D) or one sequence per cross-attention layer (L, B, N, D); SDXL also needs ``text_embeds``
    (B, D_pool) and ``time_ids`` (B, 6). ``control`` carries the per-call inputs of the extension
    points configured in ``control`` (the field).
    """

    config: UNetConfig
    control: ControlConfig = ControlConfig()
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                 control: Control | None = None) -> jax.Array:
        c = self.config
        B = sample.shape[0]
        ctx = encoder_hidden_states.astype(self.dtype)
        if ctx.ndim == 4 and ctx.shape[0] != c.num_cross_layers:
            raise ValueError(f"per-layer text has {ctx.shape[0]} sequences; this UNet has "
                             f"{c.num_cross_layers} cross-attention layers")

        t = jnp.broadcast_to(jnp.asarray(timesteps), (B,))
        emb = timestep_features(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb_dim = c.block_out_channels[0] * 4
        emb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(emb.astype(self.dtype))
        if c.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
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
