"""Stage 3: the text-to-image UNet (latent diffusion, Rombach et al. 2022, Eq. 2): epsilon or
v prediction (Salimans & Ho 2022, as SD-2) on the frozen VAE's scaled latents, conditioned on the frozen CLIP text tower's last
hidden state, with the caption dropped (empty prompt) with probability ``p_uncond`` so that
classifier-free guidance works at sampling time. With ``object_weight`` the squared error is
weighted 1 + object_weight on the latent pixels that objects cover (as the VAE's reconstruction,
:mod:`.vae`): the objects are a small part of a scene's latent but all of what its caption names.
With ``train_text`` the text tower, initialised from the CLIP's, is trained with the UNet on the
same loss, as LDM trains its text encoder tau_theta jointly with epsilon_theta (Rombach et al. 2022,
Eq. 3); the contrastive CLIP is kept as it was for CLIP-T / CLIP-I and the image encoder. With
``ground_weight`` TokenCompose's token loss (Wang et al. 2024, Eq. 2; :func:`customjax.losses.attention_grounding`)
is added: each object's category word attends to its own object (the world knows every object's mask)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.clip_text import CLIPTextModel
from customjax.models.unet import UNET, UNet2DConditionModel
from customjax.models.unet_config import UNetConfig
from customjax.models.vae import latent_dist_sample
from customjax.control.capture import collect
from customjax.control.spec import Capture, ControlConfig
from customjax.shapeworld import world as sw
from customjax.losses import attention_grounding, coverage, weighted_mean
from customjax.shapeworld.pretrain.loop import StageConfig, fit, sample_indices
from customjax.schedulers import NoiseSchedule, add_noise, target
from customjax.tokenizer import span_token_positions
from customjax.weights.loaders import init_params

MAX_OBJECTS = 3     # objects per ShapeWorld scene (sw.sample_scene's max_objects)
_CATEGORY = re.compile(r"\b(" + "|".join(sw.CATEGORIES) + r")\b")


def object_word_masks(tokenizer, captions, k: int = MAX_OBJECTS) -> np.ndarray:
    """(N, k, L) bool: the tokens of object j's category word in each caption. A caption names its
    scene's objects in order, each by its category and no other category word
    (:func:`customjax.shapeworld.world.caption`), so object j's word is the j-th category word."""
    out = np.zeros((len(captions), k, tokenizer.model_max_length), bool)
    for i, text in enumerate(captions):
        spans = [m.span() for m in _CATEGORY.finditer(text)]
        if len(spans) > k:
            raise ValueError(f"caption {i} names {len(spans)} objects, more than {k}: {text!r}")
        for j, toks in enumerate(span_token_positions(tokenizer, text, spans)):
            out[i, j, toks] = True
    return out


def unet_loss(params, frozen, batch, key, *, unet: UNet2DConditionModel, text: CLIPTextModel,
              sched: NoiseSchedule, scaling_factor: float, p_uncond: float, prediction_type: str,
              empty_ids: np.ndarray, object_weight: float = 0.0, train_text: bool = False,
              ground_weight: float = 0.0):
    """``params``: the UNet's, or {"unet", "text"} with ``train_text`` (``frozen`` is then unused)."""
    unet_p, text_p = (params["unet"], params["text"]) if train_text else (params, frozen)
    kz, kn, kt, kd = jax.random.split(key, 4)
    mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
    z0 = latent_dist_sample(mean, logvar, kz) * scaling_factor
    B = z0.shape[0]
    drop = jax.random.uniform(kd, (B, 1)) < p_uncond
    ids = jnp.where(drop, jnp.asarray(empty_ids), batch["ids"])
    ctx = text.apply({"params": text_p}, ids).last_hidden_state
    noise = jax.random.normal(kn, z0.shape)
    t = jax.random.randint(kt, (B,), 0, sched.alphas_cumprod.shape[0])
    xt = add_noise(sched, z0, noise, t)
    if ground_weight:
        # every cross-attention layer's map, whatever its resolution (factor 1, 2, 4 or 8 of the latent)
        grounded = unet.clone(control=ControlConfig(capture=Capture(cross_probs=(1, 2, 4, 8))))
        pred, state = grounded.apply({"params": unet_p}, xt, t, ctx, mutable=["attention"])
        words = jnp.where(drop[:, :, None], False, batch["words"])      # a dropped caption names nothing
        ground = attention_grounding([p for _, p in collect(state, "cross_probs")], words, batch["regions"])
    else:
        pred = unet.apply({"params": unet_p}, xt, t, ctx)
    err = (pred - target(sched, prediction_type, z0, noise, t)) ** 2
    loss = weighted_mean(err, batch["fg"], object_weight) if object_weight else jnp.mean(err)
    aux = {"mse": jnp.mean(err)} if object_weight or ground_weight else {}
    if ground_weight:
        loss, aux = loss + ground_weight * ground, dict(aux, ground=ground)
    return loss, aux


def train_unet(cfg: UNetConfig, text: CLIPTextModel, text_params, sched: NoiseSchedule, scaling_factor: float,
               moments: np.ndarray, ids: np.ndarray, empty_ids: np.ndarray, stage: StageConfig,
               workdir, *, p_uncond: float = 0.1, prediction_type: str = "epsilon", seed: int = 0,
               labels: np.ndarray | None = None, object_weight: float = 0.0, train_text: bool = False,
               words: np.ndarray | None = None, ground_weight: float = 0.0, init=None, **fit_kw):
    """(params, history), params {"unet", "text"} with ``train_text`` (``text_params`` the starting
    point), else the UNet's (``text_params`` frozen): ``moments`` are the VAE posteriors [mean, logvar] of the training images
    (:func:`customjax.shapeworld.pretrain.vae.encode`), ``ids`` their captions' token ids and ``empty_ids``
    (1, L) the empty prompt's; ``labels`` (N, H, W) the images' object maps (0 background, j + 1 object
    j; :func:`customjax.shapeworld.pretrain.run.training_pool`), needed with ``object_weight`` and ``ground_weight``;
    ``words`` (N, K, L) each object's word tokens (:func:`object_word_masks`), needed with ``ground_weight``;
    ``init``: UNet parameters to start from (a continuation) instead of a fresh initialisation."""
    if (object_weight or ground_weight) and labels is None:
        raise ValueError("object_weight and ground_weight need the object maps (labels) of the training images")
    if ground_weight and words is None:
        raise ValueError("ground_weight needs each object's word tokens (words, object_word_masks)")
    unet = UNet2DConditionModel(cfg)
    params = init_params(UNET, cfg, jax.random.key(seed + 2)) if init is None else init
    loss = functools.partial(unet_loss, unet=unet, text=text, sched=sched, scaling_factor=scaling_factor,
                             p_uncond=p_uncond, prediction_type=prediction_type, empty_ids=np.asarray(empty_ids),
                             object_weight=object_weight, train_text=train_text, ground_weight=ground_weight)
    grid = (cfg.sample_size, cfg.sample_size)

    def batches(step):
        idx = sample_indices(seed + 2, step, len(moments), stage.batch)
        batch = {"moments": moments[idx], "ids": ids[idx]}
        if object_weight or ground_weight:
            lab = np.asarray(labels[idx])
            if object_weight:
                batch["fg"] = coverage(lab > 0, grid)
            if ground_weight:
                batch["words"] = np.asarray(words[idx])
                k = batch["words"].shape[1]
                objs = lab[:, None] == np.arange(1, k + 1)[None, :, None, None]            # (B, K, H, W)
                batch["regions"] = coverage(objs.reshape(-1, *lab.shape[1:]), grid).reshape(len(idx), k, *grid)
        return batch

    if train_text:
        return fit("unet", loss, {"unet": params, "text": text_params}, None, batches, stage, workdir, seed=seed,
                   **fit_kw)
    return fit("unet", loss, params, text_params, batches, stage, workdir, seed=seed, **fit_kw)
