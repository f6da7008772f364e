"""Jitted text-to-image sampling with classifier-free guidance: the whole denoising loop is one
``lax.fori_loop`` inside one ``jax.jit``, the unconditional and conditional passes batched into one
UNet call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.vae import unscale_latents
from customjax.pipeline import StableDiffusion, encode_cfg_text, sdxl_time_ids
from customjax.sampling.common import Sampler, cached_sampler, cfg_combine
from customjax.tokenizer import tokenize


@functools.partial(jax.jit, static_argnames=("pipe", "sampler", "guidance", "zero_uncond"))
def _txt2img(pipe: StableDiffusion, sampler: Sampler, params: dict, ids: tuple, neg_ids: tuple,
             x: jax.Array, guidance: float, zero_uncond: bool) -> jax.Array:
    B = ids[0].shape[0]
    ctx, pooled = encode_cfg_text(pipe, params["text_encoders"], ids, neg_ids, zero_uncond)
    extra = {}
    if pipe.is_sdxl:
        f = pipe.vae_scale
        extra = dict(text_embeds=pooled, time_ids=sdxl_time_ids(x.shape[1] * f, x.shape[2] * f, 2 * B))
    ts = jnp.asarray(sampler.timesteps)

    def body(i, carry):
        x, st = carry
        xin = jnp.concatenate([x, x]).astype(pipe.unet.dtype)
        out = pipe.unet.apply({"params": params["unet"]}, xin, ts[i], ctx, **extra).astype(jnp.float32)
        u, c = jnp.split(out, 2)
        return sampler.step(cfg_combine(u, c, guidance), x, st, i)

    x, _ = jax.lax.fori_loop(0, len(sampler.timesteps), body, (x, sampler.init(x)))
    img = pipe.vae.apply({"params": params["vae"]}, unscale_latents(x, pipe.vae.config), method="decode")
    return jnp.clip((img.astype(jnp.float32) + 1) / 2, 0, 1)


def txt2img(pipe: StableDiffusion, params: dict, prompts: list[str], key: jax.Array | None, *,
            steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
            height: int | None = None, width: int | None = None, negative_prompt: str = "",
            latents: jax.Array | None = None) -> np.ndarray:
    """Images (B, H, W, 3) in [0, 1] for ``prompts``; compiles once per (batch, size, steps, sampler).

    The initial noise is drawn from ``key`` unless ``latents`` (B, h, w, C) are given. For SDXL an
    empty negative prompt means zero unconditional embeddings, as the diffusers SDXL pipeline does.
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale
    height, width = height or size, width or size
    f = pipe.vae_scale
    if height % f or width % f:
        raise ValueError(f"height {height} and width {width} must be multiples of the VAE factor {f}")
    if latents is None:
        latents = jax.random.normal(key, (len(prompts), height // f, width // f, pipe.unet.config.in_channels))
    ids = tuple(jnp.asarray(tokenize(t, prompts)) for t in pipe.tokenizers)
    neg = tuple(jnp.asarray(tokenize(t, [negative_prompt] * len(prompts))) for t in pipe.tokenizers)
    smp = cached_sampler(pipe.schedule, sampler, steps)
    zero = pipe.is_sdxl and not negative_prompt
    return np.asarray(_txt2img(pipe, smp, params, ids, neg, jnp.asarray(latents, jnp.float32),
                               float(guidance), zero))


