"""Stage 3: the text-to-image UNet (latent diffusion, Rombach et al. 2022, Eq. 2): epsilon or
v prediction (Salimans & Ho 2022, as SD-2) on the frozen VAE's scaled latents, conditioned on the frozen CLIP text tower's last
hidden state, with the caption dropped (empty prompt) with probability ``p_uncond`` so that
classifier-free guidance works at sampling time. With ``object_weight`` the squared error is
weighted 1 + object_weight on the latent pixels that objects cover (as the VAE's reconstruction,
:mod:`.vae`): the objects are a small part of a scene's latent but all of what its caption names.
With ``train_text`` the text tower, initialised from the CLIP's, is trained with the UNet on the
same loss, as LDM trains its text encoder tau_theta jointly with epsilon_theta (Rombach et al. 2022,
Eq. 3); the contrastive CLIP is kept as it was for CLIP-T / CLIP-I and the image encoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.clip_text import CLIPTextModel
from customjax.models.unet import UNET, UNet2DConditionModel
from customjax.models.unet_config import UNetConfig
from customjax.models.vae import latent_dist_sample
from customjax.losses import coverage, weighted_mean
from customjax.pretrain.loop import StageConfig, fit, sample_indices
from customjax.schedulers import NoiseSchedule, add_noise, target
from customjax.weights.loaders import init_params


def unet_loss(params, frozen, batch, key, *, unet: UNet2DConditionModel, text: CLIPTextModel,
              sched: NoiseSchedule, scaling_factor: float, p_uncond: float, prediction_type: str,
              empty_ids: np.ndarray, object_weight: float = 0.0, train_text: bool = False):
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
    pred = unet.apply({"params": unet_p}, add_noise(sched, z0, noise, t), t, ctx)
    err = (pred - target(sched, prediction_type, z0, noise, t)) ** 2
    if not object_weight:
        return jnp.mean(err), {}
    return weighted_mean(err, batch["fg"], object_weight), {"mse": jnp.mean(err)}


def train_unet(cfg: UNetConfig, text: CLIPTextModel, text_params, sched: NoiseSchedule, scaling_factor: float,
               moments: np.ndarray, ids: np.ndarray, empty_ids: np.ndarray, stage: StageConfig,
               workdir, *, p_uncond: float = 0.1, prediction_type: str = "epsilon", seed: int = 0,
               fg: np.ndarray | None = None, object_weight: float = 0.0, train_text: bool = False, **fit_kw):
    """(params, history), params {"unet", "text"} with ``train_text`` (``text_params`` the starting
    point), else the UNet's (``text_params`` frozen): ``moments`` are the VAE posteriors [mean, logvar] of the training images
    (:func:`customjax.pretrain.vae.encode`), ``ids`` their captions' token ids and ``empty_ids``
    (1, L) the empty prompt's; ``fg`` (N, H, W) the images' object masks, needed with
    ``object_weight``."""
    if object_weight and fg is None:
        raise ValueError("object_weight needs the object masks fg of the training images")
    unet = UNet2DConditionModel(cfg)
    params = init_params(UNET, cfg, jax.random.key(seed + 2))
    loss = functools.partial(unet_loss, unet=unet, text=text, sched=sched, scaling_factor=scaling_factor,
                             p_uncond=p_uncond, prediction_type=prediction_type, empty_ids=np.asarray(empty_ids),
                             object_weight=object_weight, train_text=train_text)

    def batches(step):
        idx = sample_indices(seed + 2, step, len(moments), stage.batch)
        batch = {"moments": moments[idx], "ids": ids[idx]}
        if object_weight:
            batch["fg"] = coverage(np.asarray(fg[idx]), (cfg.sample_size, cfg.sample_size))
        return batch

    if train_text:
        return fit("unet", loss, {"unet": params, "text": text_params}, None, batches, stage, workdir, seed=seed,
                   **fit_kw)
    return fit("unet", loss, params, text_params, batches, stage, workdir, seed=seed, **fit_kw)
