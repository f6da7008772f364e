"""The RealCustom / RealCustom++ dual-branch sampler as one jitted function.

Per step, before ``t_stop`` (RealCustom++ Sec. III-D, RealCustom Sec. 3.3):
  1. one UNet call on [unconditional; guidance] (2B): the guidance branch (text, no image) has its
     attention captured and gives the masks (``guidance.mask``);
  2. one UNet call on the generation branch (B): text + references, each reference's visual
     attention multiplied by its mask (Eqs. 14 / 17).
From ``t_stop`` on, the last mask is reused and [unconditional; generation] run as one call (the
RealCustom two-scale CFG also needs the text-only branch: [u; text; generation], 3B).

CFG: ``"realcustompp"`` z = e_u + w (e_gen - e_u) (RealCustom++ Eq. 15); ``"realcustom"``
z = e_u + w_t (e_T - e_u) + w_i (e_TI - e_T) (RealCustom Eq. 13).

The image side is a static callable ``visual(params, feats, text_ctx, z_masked, sqrt_abar)`` ->
``(tokens (B, R, N, D), token_mask (B, R, N) | None)``: constant projector tokens for RealCustom++,
the adaptive scoring module for RealCustom (which sees z_t times the mask).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from customjax import schedulers as S
from customjax.control.spec import Capture, Control, ExtraTokens
from customjax.guidance.mask import MaskConfig, guidance_mask
from customjax.models.vae import unscale_latents
from customjax.pipeline import StableDiffusion, encode_cfg_text, sdxl_time_ids
from customjax.sampling.common import Sampler

VisualFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


@dataclasses.dataclass(frozen=True)
class DualBranchConfig:
    """Static settings. ``t_stop``: steps that run the guidance branch (None = all; 0 = none, the
    mask given to the sampler is used throughout: all-zero = plain T2I, all-one = unmasked
    adapter). ``references``: ``"many2many"`` (one reference per subject, each with its own mask)
    or ``"one2many"`` (one reference, the subjects' masks summed)."""

    mask: MaskConfig = MaskConfig()
    t_stop: int | None = None
    cfg: str = "realcustompp"
    w: float = 7.5
    w_t: float = 7.5
    w_i: float = 12.5
    visual_scale: float = 1.0
    references: str = "many2many"
    record_masks: bool = False

    def __post_init__(self):
        if self.cfg not in ("realcustompp", "realcustom"):
            raise ValueError(f"unknown cfg mode {self.cfg!r}; use 'realcustompp' or 'realcustom'")
        if self.references not in ("many2many", "one2many"):
            raise ValueError(f"unknown references mode {self.references!r}")


def guided_steps(cfg: DualBranchConfig, steps: int) -> int:
    return steps if cfg.t_stop is None else min(cfg.t_stop, steps)


def unet_evaluations(cfg: DualBranchConfig, steps: int) -> int:
    """UNet evaluations per image: 3 per guided step, then 2 (3 for the RealCustom CFG)."""
    g = guided_steps(cfg, steps)
    return 3 * g + (3 if cfg.cfg == "realcustom" else 2) * (steps - g)


def _reference_masks(masks: jax.Array, cfg: DualBranchConfig) -> jax.Array:
    """(B, J, H, W) subject masks -> (B, R, H, W) per-reference output masks."""
    return masks.sum(axis=1, keepdims=True) if cfg.references == "one2many" else masks


@functools.partial(jax.jit, static_argnames=("pipe", "unet", "sampler", "cfg", "visual", "zero_uncond", "on_eval"))
def dual_branch_sample(pipe: StableDiffusion, unet: Any, sampler: Sampler, cfg: DualBranchConfig,
                       visual: VisualFn, params: dict, ids: tuple, neg_ids: tuple, word_masks: jax.Array,
                       feats: Any, latents: jax.Array, init_masks: jax.Array, zero_uncond: bool = False,
                       on_eval: Callable[[Any], None] | None = None) -> dict:
    """Samples B images. ``unet``: the UNet module with the ``vision`` extra K/V set; ``params``:
    {"unet", "vae", "text_encoders", "adapter"}; ``word_masks`` (B, J, 77) target-word tokens;
    ``init_masks`` (B, J, H, W) at the mask resolution (used until the first guidance mask, and
    throughout when ``t_stop == 0``).

    Returns {"images" (B, H, W, 3) in [0, 1], "masks" (B, J, H, W) final, "mask_steps"
    (steps, B, J, H, W) when ``cfg.record_masks``}.
    """
    B = latents.shape[0]
    latent_hw = latents.shape[1:3]
    ctx2, pooled2 = encode_cfg_text(pipe, params["text_encoders"], ids, neg_ids, zero_uncond)
    ctx_u, ctx_c = ctx2[:B], ctx2[B:]
    pool_u, pool_c = (None, None) if pooled2 is None else (pooled2[:B], pooled2[B:])
    f = pipe.vae_scale
    tids = sdxl_time_ids(latent_hw[0] * f, latent_hw[1] * f, B) if pipe.is_sdxl else None
    abar = S.noise_schedule(pipe.schedule).alphas_cumprod
    ts = jnp.asarray(sampler.timesteps)
    n_steps, n_guided = len(sampler.timesteps), guided_steps(cfg, len(sampler.timesteps))
    guide_unet = unet.clone(control=dataclasses.replace(
        unet.control, capture=Capture(cross_probs=cfg.mask.cross_factors, self_qk=cfg.mask.self_factors)))

    def run(module, x, t, parts, control=None, mutable=False):
        """One UNet call on the concatenation of branches ``parts`` ("u" | "c")."""
        n = len(parts)
        if on_eval is not None:
            jax.debug.callback(on_eval, n * B)
        ctx = jnp.concatenate([ctx_u if p == "u" else ctx_c for p in parts])
        extra = {}
        if pipe.is_sdxl:
            extra = dict(text_embeds=jnp.concatenate([pool_u if p == "u" else pool_c for p in parts]),
                         time_ids=jnp.tile(tids, (n, 1)))
        xin = jnp.tile(x, (n, 1, 1, 1)).astype(unet.dtype)
        out = module.apply({"params": params["unet"]}, xin, t, ctx, control=control, mutable=mutable, **extra)
        if mutable:
            out, state = out
            return [o.astype(jnp.float32) for o in jnp.split(out, n)], state
        return [o.astype(jnp.float32) for o in jnp.split(out, n)]

    def vision(x, masks, t, scales):
        """The generation branch's Control: references' tokens, masks and scales (per batch row)."""
        zmask = jax.image.resize(masks.sum(1), (B, *latent_hw), method="linear")[..., None]
        tokens, tmask = visual(params.get("adapter"), feats, ctx_c, x * zmask, jnp.sqrt(abar[t]))
        rmask = _reference_masks(masks, cfg)
        reps = len(scales)
        tile = lambda a: None if a is None else jnp.tile(a, (reps,) + (1,) * (a.ndim - 1))
        scale = jnp.repeat(jnp.asarray(scales, jnp.float32), B)
        return Control({"vision": ExtraTokens(tile(tokens), tile(rmask), scale, tile(tmask))})

    def combine(e_u, e_t, e_gen):
        if cfg.cfg == "realcustompp":
            return e_u + cfg.w * (e_gen - e_u)
        return e_u + cfg.w_t * (e_t - e_u) + cfg.w_i * (e_gen - e_t)

    def guided(i, carry):
        x, st, masks, strip = carry
        t = ts[i]
        (e_u, e_t), state = run(guide_unet, x, t, "uc", mutable=["attention"])
        state = jax.tree_util.tree_map(lambda a: a[B:], state)  # the guidance half
        masks = guidance_mask(state, word_masks, latent_hw, cfg.mask)
        (e_gen,) = run(unet, x, t, "c", vision(x, masks, t, (cfg.visual_scale,)))
        x, st = sampler.step(combine(e_u, e_t, e_gen), x, st, i)
        return x, st, masks, None if strip is None else strip.at[i].set(masks)

    def reuse(i, carry):
        x, st, masks, strip = carry
        t = ts[i]
        if cfg.cfg == "realcustompp":
            e_u, e_gen = run(unet, x, t, "uc", vision(x, masks, t, (0.0, cfg.visual_scale)))
            e_t = None
        else:
            e_u, e_t, e_gen = run(unet, x, t, "ucc", vision(x, masks, t, (0.0, 0.0, cfg.visual_scale)))
        x, st = sampler.step(combine(e_u, e_t, e_gen), x, st, i)
        return x, st, masks, None if strip is None else strip.at[i].set(masks)

    x = latents.astype(jnp.float32)
    strip = jnp.zeros((n_steps, *init_masks.shape), jnp.float32) if cfg.record_masks else None
    carry = (x, sampler.init(x), init_masks.astype(jnp.float32), strip)
    carry = jax.lax.fori_loop(0, n_guided, guided, carry)
    x, _, masks, strip = jax.lax.fori_loop(n_guided, n_steps, reuse, carry)
    img = pipe.vae.apply({"params": params["vae"]}, unscale_latents(x, pipe.vae.config), method="decode")
    out = {"images": jnp.clip((img.astype(jnp.float32) + 1) / 2, 0, 1), "masks": masks}
    if cfg.record_masks:
        out["mask_steps"] = strip
    return out
