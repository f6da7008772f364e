"""A Stable Diffusion model folder (diffusers layout) as Flax modules and parameter trees.

    root/model_index.json
    root/unet/          config.json + diffusion_pytorch_model[.fp16].safetensors (or sharded)
    root/vae/
    root/text_encoder/  CLIP-L (SD-1.x), OpenCLIP-H (SD-2.x), CLIP-L (SDXL)
    root/text_encoder_2/  OpenCLIP bigG with projection (SDXL only)
    root/tokenizer/, root/tokenizer_2/, root/scheduler/

Text conditioning follows the diffusers pipelines: SD-1.x/2.x use the last hidden state of the
one encoder; SDXL concatenates both encoders' penultimate hidden states and takes the pooled,
projected output of the second as ``text_embeds``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from customjax.models.clip_text import clip_text_spec
from customjax.models.unet import UNET
from customjax.models.vae import VAE
from customjax.schedulers import ScheduleConfig
from customjax.tokenizer import load_tokenizer
from customjax.weights.loaders import load_pretrained


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """Modules and configs of a pipeline: static, hashed by identity (a jit static argument).
    Parameters live apart, ``{"unet": ..., "vae": ..., "text_encoders": (...)}``, so they can be
    sharded and donated."""

    unet: Any
    vae: Any
    text_encoders: tuple[Any, ...]
    tokenizers: tuple[Any, ...]
    schedule: ScheduleConfig

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_stable_diffusion(root: str | os.PathLike, *, dtype: Any = jnp.float32,
                          variant: str | None = None, abstract: bool = False) -> tuple[StableDiffusion, dict]:
    """(pipeline, params) from a diffusers Stable Diffusion folder; every component is loaded
    strictly (see :func:`customjax.weights.convert.convert`).

    ``abstract=True`` needs only the folder's configs (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder[_2]/`` ``config.json``, ``scheduler/scheduler_config.json``): every parameter
    is a float32 ``jax.ShapeDtypeStruct`` (see :func:`load_pretrained`), nothing is allocated and
    no weight file is read. A ``tokenizer[_2]/`` folder is loaded when present; when it is absent,
    the character-level CLIP tokenizer of :func:`customjax.tokenizer.write_char_tokenizer`
    (``model_max_length`` 77; ``tokenizer_2`` pads with ``!`` as SDXL's does) stands in, so a folder
    of published configs alone (``customjax/weights/published_configs/sd15``) gives a pipeline at
    the real sizes.
    Its ids (< 514) fit any CLIP vocabulary, but they are not the real tokenizer's ids.
    """
    root = Path(root)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{root}: no model_index.json; expected a diffusers pipeline folder "
                                "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    index = json.loads(index_file.read_text())
    names = ["text_encoder"] + (["text_encoder_2"] if index.get("text_encoder_2", [None])[0] else [])
    kw = dict(dtype=dtype, variant=variant, abstract=abstract)
    unet, unet_p, _ = load_pretrained(root / "unet", UNET, **kw)
    vae, vae_p, _ = load_pretrained(root / "vae", VAE, **kw)
    encoders, enc_p = [], []
    for n in names:
        m, p, _ = load_pretrained(root / n, clip_text_spec(with_projection=n == "text_encoder_2" or None), **kw)
        encoders.append(m)
        enc_p.append(p)
    tokenizers = tuple(_tokenizer(root / n.replace("text_encoder", "tokenizer"), second=i == 1,
                                  stand_in=abstract) for i, n in enumerate(names))
    pipe = StableDiffusion(unet, vae, tuple(encoders), tokenizers,
                           ScheduleConfig.from_folder(root / "scheduler"))
    return pipe, {"unet": unet_p, "vae": vae_p, "text_encoders": tuple(enc_p)}


def _tokenizer(folder: Path, *, second: bool, stand_in: bool):
    """The tokenizer in ``folder``; with ``stand_in``, a missing folder gives the character-level
    CLIP tokenizer of :mod:`customjax.zoo` (written to a temporary folder and read back)."""
    if folder.is_dir() or not stand_in:
        return load_tokenizer(folder)
    import tempfile

    from customjax.tokenizer import write_char_tokenizer

    with tempfile.TemporaryDirectory(prefix="customjax-char-tok-") as tmp:
        write_char_tokenizer(tmp, pad="!" if second else "<|endoftext|>")
        return load_tokenizer(tmp)


def encode_text(pipe: StableDiffusion, text_params: tuple, ids: tuple[jax.Array, ...]
                ) -> tuple[jax.Array, jax.Array | None]:
    """Token ids (one (B, 77) array per tokenizer) -> (context (B, 77, D), pooled text_embeds or None)."""
    if not pipe.is_sdxl:
        out = pipe.text_encoders[0].apply({"params": text_params[0]}, ids[0])
        return out.last_hidden_state, None
    outs = [enc.apply({"params": p}, i) for enc, p, i in zip(pipe.text_encoders, text_params, ids)]
    ctx = jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1)
    return ctx, outs[1].text_embeds


def encode_splus(pipe: StableDiffusion, text_params: tuple, ids: tuple[jax.Array, ...], where: jax.Array,
                 tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The S+ text condition (CustomContrast Eqs. 3, 5): for each of the l tokens (B, l, D_in), the caption
    ``ids`` with the placeholder (``where`` (B, 77) bool) embedded as that token, through the frozen text
    encoder(s); one batched pass of B * l rows. Several placeholders: ``tokens`` (B, J, l, D_in) and
    ``where`` (B, 77) int, j + 1 at placeholder j's tokens (0 elsewhere). ``D_in``: the encoders' input
    widths, concatenated (SDXL: 768 + 1280, split in order). Returns (per-layer context (B, l, 77, D),
    pooled (B, l, P) or None), the ``text`` of :class:`customjax.methods.protocol.Condition`."""
    multi = tokens.ndim == 4
    if multi:                                             # (B, J, l, D) -> (B, l, J, D)
        tokens = jnp.swapaxes(tokens, 1, 2)
    B, L = tokens.shape[:2]
    rows = lambda a: jnp.repeat(a, L, axis=0)            # noqa: E731  (B, ...) -> (B * l, ...), layer fastest
    widths = [enc.config.hidden_size for enc in pipe.text_encoders]
    if sum(widths) != tokens.shape[-1]:
        raise ValueError(f"S+ tokens of width {tokens.shape[-1]}; the text encoders' input widths sum to {sum(widths)}")
    flat = tokens.reshape(B * L, *tokens.shape[2:])
    parts = jnp.split(flat, [sum(widths[:k + 1]) for k in range(len(widths) - 1)], axis=-1)
    outs = [enc.apply({"params": p}, rows(i), replace=(rows(where), t))
            for enc, p, i, t in zip(pipe.text_encoders, text_params, ids, parts)]
    if not pipe.is_sdxl:
        ctx, pooled = outs[0].last_hidden_state, None
    else:
        ctx, pooled = jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1), outs[1].text_embeds
    ctx = ctx.reshape(B, L, *ctx.shape[1:])
    return ctx, None if pooled is None else pooled.reshape(B, L, -1)


def encode_cfg_text(pipe: StableDiffusion, text_params: tuple, ids: tuple, neg_ids: tuple,
                    zero_uncond: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """[unconditional; conditional] text (2B, 77, D) and pooled embeddings in one encoder pass.
    ``zero_uncond``: zero unconditional embeddings (diffusers SDXL ``force_zeros_for_empty_prompt``)."""
    B = ids[0].shape[0]
    ctx, pooled = encode_text(pipe, text_params, tuple(jnp.concatenate([n, c]) for n, c in zip(neg_ids, ids)))
    if zero_uncond:
        keep = (jnp.arange(2 * B) >= B)[:, None]
        ctx = ctx * keep[..., None]
        pooled = None if pooled is None else pooled * keep
    return ctx, pooled


def sdxl_time_ids(height: int, width: int, batch: int) -> jax.Array:
    """SDXL micro-conditioning: (original size, crop top-left, target size) = (h, w, 0, 0, h, w)."""
    return jnp.tile(jnp.array([[height, width, 0, 0, height, width]], jnp.float32), (batch, 1))
