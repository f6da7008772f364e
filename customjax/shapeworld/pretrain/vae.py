"""Stage 1: the AutoencoderKL, trained as in LDM (Rombach et al. 2022, Sec. 3) without the
adversarial and perceptual terms: L1 + L2 reconstruction of a posterior sample plus a small KL
to N(0, I). ``scaling_factor`` is then set to 1 / std of the latents, as SD's 0.18215 was."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.vae import VAE, AutoencoderKL, VAEConfig, latent_dist_sample
from customjax.losses import weighted_mean
from customjax.shapeworld.pretrain.loop import StageConfig, fit, sample_indices, to_unit
from customjax.weights.loaders import init_params


def vae_loss(params, frozen, batch, key, *, model: AutoencoderKL, kl_weight: float, object_weight: float):
    """Reconstruction error per pixel weighted by 1 + object_weight on object pixels (``batch["fg"]``):
    objects are a small part of a scene but all of what its description names."""
    x = batch["image"]
    mean, logvar = model.apply({"params": params}, x, method="encode")
    rec = model.apply({"params": params}, latent_dist_sample(mean, logvar, key), method="decode")
    err = rec - x
    l1 = weighted_mean(jnp.abs(err), batch["fg"], object_weight)
    l2 = weighted_mean(err ** 2, batch["fg"], object_weight)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + l2 + kl_weight * kl, {"l1": jnp.mean(jnp.abs(err)), "kl": kl}


def train_vae(cfg: VAEConfig, images: np.ndarray, fg: np.ndarray, stage: StageConfig, workdir, *, kl_weight: float,
              object_weight: float, seed: int = 0, **fit_kw):
    """(params, history) trained on uint8 ``images`` with object masks ``fg`` (N, H, W)."""
    model = AutoencoderKL(cfg)
    params = init_params(VAE, cfg, jax.random.key(seed))
    loss = functools.partial(vae_loss, model=model, kl_weight=kl_weight, object_weight=object_weight)

    def batches(step):
        idx = sample_indices(seed, step, len(images), stage.batch)
        return {"image": to_unit(images[idx]), "fg": np.asarray(fg[idx], np.float32)}

    return fit("vae", loss, params, None, batches, stage, workdir, seed=seed, **fit_kw)


def with_latent_scale(cfg: VAEConfig, moments: np.ndarray) -> VAEConfig:
    """``scaling_factor`` = 1 / std of the posterior means (the first half of ``moments``' channels),
    so the diffusion latents have unit variance."""
    return dataclasses.replace(cfg, scaling_factor=float(1.0 / np.std(moments[..., :cfg.latent_channels])))


@functools.partial(jax.jit, static_argnums=0)
def _moments(model: AutoencoderKL, params, x):
    return jnp.concatenate(model.apply({"params": params}, x, method="encode"), axis=-1)


def encode(model: AutoencoderKL, params, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Posterior moments [mean, logvar] (N, h, w, 2 * latent_channels) of uint8 ``images``, in chunks
    (one compilation per chunk shape)."""
    return np.concatenate([np.asarray(_moments(model, params, to_unit(images[i:i + chunk])))
                           for i in range(0, len(images), chunk)])
