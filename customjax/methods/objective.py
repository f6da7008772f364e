"""The one training objective: the latent-diffusion loss with the method's visual condition in
every cross-attention layer (RealCustom Eq. 4, RealCustom++ Eq. 4, IP-Adapter's decoupled
cross-attention), no mask (training learns the alignment with every word; the mask is an inference
device), plus the method's auxiliary loss terms (:meth:`~customjax.methods.protocol.Method.condition`),
each logged as ``loss/<name>``; ``loss`` is their sum with the diffusion loss (``loss/diffusion``).

Condition dropout for classifier-free guidance: text only, image only, or both, each with its own
probability; dropped text is the empty prompt, a dropped image is a visual scale of 0.

``subject_weight`` w > 0 (not in the papers, off by default) weights each latent pixel's squared error
by 1 + w * (the target's subject mask, mean-pooled to the latent grid), normalised per example, so a
record without a mask (all ones) keeps the plain loss (:mod:`customjax.losses`): the subject's appearance, which only the
reference supplies, is otherwise a few per cent of the loss (see docs/shapeworld/customization_benchmark/training.json).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from customjax import schedulers as S
from customjax.control.params import merge
from customjax.control.spec import Capture, Control, ExtraTokens
from customjax.losses import coverage, weighted_mean
from customjax.methods.protocol import TrainInputs
from customjax.models.vae import latent_dist_sample, scale_latents
from customjax.pipeline import encode_text, sdxl_time_ids


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    p_drop_text: float = 0.05
    p_drop_image: float = 0.05
    p_drop_both: float = 0.05
    gamma_low: float = 0.3
    gamma_high: float = 1.0
    subject_weight: float = 0.0


def condition_dropout(key: jax.Array, batch: int, cfg: ObjectiveConfig) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) booleans (B,): one draw u ~ U[0, 1) per example, split into
    [text only | image only | both | neither] by the three probabilities."""
    u = jax.random.uniform(key, (batch,))
    a, b, c = cfg.p_drop_text, cfg.p_drop_image, cfg.p_drop_both
    if a + b + c > 1:
        raise ValueError("condition dropout probabilities sum to more than 1")
    text_only, image_only, both = u < a, (u >= a) & (u < a + b), (u >= a + b) & (u < a + b + c)
    return text_only | both, image_only | both


def loss_fn(trainable: dict, frozen: dict, batch: dict, key: jax.Array, *, built: Any,
            cfg: ObjectiveConfig) -> tuple[jax.Array, dict]:
    """Mean squared error of the eps (or v) prediction; returns (loss, metrics). The target is
    ``batch["image"]`` encoded by the frozen VAE, or its precomputed posterior ``batch["latent_mean"]`` /
    ``batch["latent_logvar"]`` (:mod:`customjax.data.precompute`); either way z0 is one draw from it
    with the same key, so both give the same loss for the same posterior."""
    pipe, unet = built.pipe, built.unet
    k_lat, k_t, k_noise, k_drop, k_vis = jax.random.split(key, 5)
    if "latent_mean" in batch:
        mean, logvar = (batch[k].astype(jnp.float32) for k in ("latent_mean", "latent_logvar"))
        H, W = mean.shape[1] * pipe.vae_scale, mean.shape[2] * pipe.vae_scale
    else:
        img = batch["image"]
        H, W = img.shape[1:3]
        mean, logvar = pipe.vae.apply({"params": frozen["vae"]}, img, method="encode")
    B = mean.shape[0]
    z0 = jax.lax.stop_gradient(scale_latents(latent_dist_sample(mean, logvar, k_lat), pipe.vae.config))
    ctx, pooled = encode_text(pipe, frozen["text_encoders"], batch["ids"])
    e_ctx, e_pooled = encode_text(pipe, frozen["text_encoders"], frozen["empty_ids"])
    drop_text, drop_image = condition_dropout(k_drop, B, cfg)
    ctx = jnp.where(drop_text[:, None, None], e_ctx, ctx)
    if pooled is not None:
        pooled = jnp.where(drop_text[:, None], e_pooled, pooled)
    ctx, pooled = jax.lax.stop_gradient((ctx, pooled))

    sched = S.noise_schedule(pipe.schedule)
    t = jax.random.randint(k_t, (B,), 0, pipe.schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
    z_t = S.add_noise(sched, z0, noise, t)
    sqrt_abar = jnp.sqrt(sched.alphas_cumprod[t])
    method = built.method
    cond = method.condition(built.image_side, frozen, trainable, batch,
                            TrainInputs(z_t, ctx, sqrt_abar, t, drop_image, drop_text),
                            k_vis, cfg)
    scale = jnp.where(drop_image, 0.0, 1.0) if cond.scale is None else cond.scale
    control = Control({method.kv_name: ExtraTokens(cond.tokens, None, scale, cond.token_mask)})
    extra = {}
    if pipe.is_sdxl:
        extra = dict(text_embeds=pooled, time_ids=sdxl_time_ids(H, W, B))
    if cond.text is not None:      # a context per cross-attention layer (S+); dropped text: the empty prompt's
        drop = drop_text[:, None, None] if cond.text.ndim == 3 else drop_text[None, :, None, None]
        ctx = jnp.where(drop, jnp.broadcast_to(e_ctx, cond.text.shape), cond.text)
    params = merge(frozen["unet"], trainable.get("unet", {}))
    cap = method.capture(built.image_side)
    if cap == Capture():
        pred, state = unet.apply({"params": params}, z_t, t, ctx, control=control, **extra), None
    else:       # the method's attention terms (CustomContrast's location loss)
        pred, state = unet.clone(control=dataclasses.replace(unet.control, capture=cap)).apply(
            {"params": params}, z_t, t, ctx, control=control, mutable=["attention"], **extra)
    pred = pred.astype(jnp.float32)
    tgt = S.target(sched, pipe.schedule.prediction_type, z0, noise, t)
    if cfg.subject_weight:
        if "mask" not in batch:
            raise ValueError("objective.subject_weight > 0 needs the target's subject mask in the batch "
                             "(the loader's with_mask)")
        err = (pred - tgt) ** 2
        loss = weighted_mean(err, coverage(batch["mask"], err.shape[1:3]), cfg.subject_weight, per_example=True)
    else:
        loss = jnp.mean((pred - tgt) ** 2)
    losses = dict(cond.losses)
    if state is not None:
        losses.update(method.attention_losses(built.image_side, state, batch,
                                              TrainInputs(z_t, ctx, sqrt_abar, t, drop_image, drop_text), cfg))
    metrics = {"loss/diffusion": loss, **{f"loss/{k}": v for k, v in losses.items()}}
    total = loss + sum(losses.values())
    return total, {"loss": total, **metrics, "drop_text": drop_text.mean(), "drop_image": drop_image.mean()}
