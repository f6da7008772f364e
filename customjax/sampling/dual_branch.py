"""The dual-branch sampler of RealCustom / RealCustom++ (and the unmasked adapters) as one jitted function.

Branches: ``u`` (the negative prompt; no image, or with ``uncond_image="zero"`` the method's null
tokens, masked like the generation branch: the released RealCustom++ code, IP-Adapter), ``t`` (the
prompt, no image: the guidance branch whose attention gives the masks, and RealCustom's text
branch) and ``g`` (the prompt and the references, each reference's visual attention multiplied by
its mask: Eqs. 14 / 17).

Per step, before ``t_stop`` (RealCustom++ Sec. III-D, RealCustom Sec. 3.3): one UNet call on
[u; t] with the attention of ``t`` captured -> masks (``guidance.mask``), then one on [g] (with
``uncond_image="zero"``: [t], then [u; g]). From ``t_stop`` on the last mask is reused and
[u; g] run as one call ([u; t; g] for the two-scale formula). A method without masks
(``masked=False``) runs [u; g] at every step with the visual condition everywhere.

Guidance formulas (``cfg``), named by formula:
  ``"one_scale"`` z = e_u + w (e_g - e_u)                          (RealCustom++ Eq. 15, IP-Adapter)
  ``"two_scale"`` z = e_u + w_t (e_t - e_u) + w_i (e_g - e_t)      (RealCustom Eq. 13)

With ``location`` masks (CustomContrast Sec. 3.4) there is no guidance branch: every step runs
[u; g] with g's attention captured, and the mask for the next step comes from it.

The image side is a static callable ``visual(params, feats, text_ctx, z_masked, sqrt_abar, t)`` ->
``(tokens (B, R, N, D), token_mask (B, R, N) | None)``: constant tokens for RealCustom++ and
IP-Adapter, the adaptive scoring module for RealCustom (which sees z_t times the mask).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from customjax import schedulers as S
from customjax.control.spec import Capture, Control, ExtraTokens, TextMask
from customjax.guidance.location import location_maps
from customjax.guidance.mask import MaskConfig, guidance_mask, select
from customjax.models.vae import unscale_latents
from customjax.pipeline import StableDiffusion, encode_cfg_text, encode_splus, sdxl_time_ids
from customjax.sampling.common import Sampler

VisualFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]
FORMULAS = ("one_scale", "two_scale")
UNCOND_IMAGES = ("none", "zero")


@dataclasses.dataclass(frozen=True)
class DualBranchConfig:
    """Static settings. ``t_stop``: steps that run the guidance branch (None = all; 0 = none, the
    mask given to the sampler is used throughout: all-zero = plain T2I, all-one = unmasked
    adapter). ``cfg``: the guidance formula (:data:`FORMULAS`). ``references``: ``"many2many"``
    (one reference per subject, each with its own mask) or ``"one2many"`` (one reference, the
    subjects' masks summed). ``masked``: False for a method without masks (no guidance branch, no
    target words needed). ``uncond_image``: the unconditional branch's image, ``"none"`` (visual
    scale 0) or ``"zero"`` (the method's null tokens, masked and scaled as the generation branch)."""

    mask: MaskConfig = MaskConfig()
    t_stop: int | None = None
    cfg: str = "one_scale"
    w: float = 7.5
    w_t: float = 7.5
    w_i: float = 12.5
    visual_scale: float = 1.0
    references: str = "many2many"
    masked: bool = True
    uncond_image: str = "none"
    record_masks: bool = False
    location: bool = False

    # ``location`` (CustomContrast Sec. 3.4): no guidance branch; the mask is the generation branch's
    # own visual and target-word attention (``customjax.guidance.location``) of the previous step,
    # Top-K selected as ``mask``, injected into the visual attention and the target words' text
    # attention at the next step; ``mask.cross_factors``: the layers it reads.

    def __post_init__(self):
        if self.cfg not in FORMULAS:
            raise ValueError(f"guidance.cfg={self.cfg!r}: choose a formula of {FORMULAS}")
        if self.references not in ("many2many", "one2many"):
            raise ValueError(f"guidance.references={self.references!r}: choose 'many2many' or 'one2many'")
        if self.uncond_image not in UNCOND_IMAGES:
            raise ValueError(f"guidance.uncond_image={self.uncond_image!r}: choose one of {UNCOND_IMAGES}")


def guided_steps(cfg: DualBranchConfig, steps: int) -> int:
    if not cfg.masked:
        return 0
    return steps if cfg.t_stop is None else min(cfg.t_stop, steps)


def reuse_branches(cfg: DualBranchConfig) -> str:
    """The branches of one UNet call after the guided steps."""
    return "utg" if cfg.cfg == "two_scale" else "ug"


def unet_evaluations(cfg: DualBranchConfig, steps: int) -> int:
    """UNet evaluations per image: 3 per guided step, then 2 (3 for the two-scale formula); with
    ``location`` masks, 2 (3) at every step."""
    if cfg.location:
        return len(reuse_branches(cfg)) * steps
    g = guided_steps(cfg, steps)
    return 3 * g + len(reuse_branches(cfg)) * (steps - g)


def combine(cfg: DualBranchConfig, e: dict) -> jax.Array:
    """The guidance formula ``cfg.cfg`` over the branch outputs ``e`` ({"u", "t", "g"})."""
    if cfg.cfg == "one_scale":                                           # RealCustom++ Eq. 15
        return e["u"] + cfg.w * (e["g"] - e["u"])
    return e["u"] + cfg.w_t * (e["t"] - e["u"]) + cfg.w_i * (e["g"] - e["t"])   # RealCustom Eq. 13


def _reference_masks(masks: jax.Array, cfg: DualBranchConfig) -> jax.Array:
    """(B, J, H, W) subject masks -> (B, R, H, W) per-reference output masks."""
    return masks.sum(axis=1, keepdims=True) if cfg.references == "one2many" else masks


def splus_context(pipe: StableDiffusion, text_params: tuple, ids: tuple, word_masks: jax.Array,
                  tokens: jax.Array, layers: tuple[int, ...] | None = None) -> jax.Array:
    """The per-layer text (L, B, 77, D) of prompts whose target words (``word_masks`` (B, J, 77)) are
    each replaced by its reference's S+ tokens ``tokens`` (B, R, n, D_in) (word j: reference
    min(j, R - 1)), CustomContrast Eq. 5; ``layers``: the token each layer reads (None: layer i, token i)."""
    J, R = word_masks.shape[1], tokens.shape[1]
    where = jnp.einsum("bjn,j->bn", word_masks.astype(jnp.int32), jnp.arange(1, J + 1, dtype=jnp.int32))
    ctx, _ = encode_splus(pipe, text_params, ids, where, tokens[:, jnp.minimum(jnp.arange(J), R - 1)])
    if layers is not None:
        ctx = ctx[:, jnp.asarray(layers)]
    return jnp.swapaxes(ctx, 0, 1)


@functools.partial(jax.jit, static_argnames=("pipe", "unet", "sampler", "cfg", "visual", "zero_uncond", "on_eval",
                                             "text_tokens"))
def dual_branch_sample(pipe: StableDiffusion, unet: Any, sampler: Sampler, cfg: DualBranchConfig,
                       visual: VisualFn, params: dict, ids: tuple, neg_ids: tuple, word_masks: jax.Array,
                       feats: Any, latents: jax.Array, init_masks: jax.Array, zero_uncond: bool = False,
                       on_eval: Callable[[Any], None] | None = None, null_feats: Any = None,
                       text_tokens: Callable | None = None) -> dict:
    """Samples B images. ``unet``: the UNet module with the method's extra K/V set (its first);
    ``params``: {"unet", "vae", "text_encoders", "adapter"}; ``word_masks`` (B, J, 77) target-word
    tokens; ``feats`` (B, R, N, D) reference tokens; ``null_feats`` the unconditional branch's
    (``cfg.uncond_image == "zero"``); ``init_masks`` (B, J, H, W) at the mask resolution (used until
    the first guidance mask, and throughout when ``t_stop == 0``).

    Returns {"images" (B, H, W, 3) in [0, 1], "masks" (B, J, H, W) final, "mask_steps"
    (steps, B, J, H, W) when ``cfg.record_masks``}. ``text_tokens`` (static): the method's per-step S+
    tokens (:meth:`~customjax.methods.protocol.Method.text_tokens`); the generation branch's target
    words are then replaced by them in each layer's text (:func:`splus_context`).
    """
    if (null_feats is None) != (cfg.uncond_image == "none"):
        raise ValueError(f"guidance.uncond_image={cfg.uncond_image!r} needs null_feats "
                         f"{'given' if cfg.uncond_image == 'zero' else 'absent'}")
    kv = unet.control.extra_kv[0].name
    B = latents.shape[0]
    latent_hw = latents.shape[1:3]
    ctx2, pooled2 = encode_cfg_text(pipe, params["text_encoders"], ids, neg_ids, zero_uncond)
    ctx = {"u": ctx2[:B], "t": ctx2[B:], "g": ctx2[B:]}
    pool = None if pooled2 is None else {"u": pooled2[:B], "t": pooled2[B:], "g": pooled2[B:]}
    f = pipe.vae_scale
    tids = sdxl_time_ids(latent_hw[0] * f, latent_hw[1] * f, B) if pipe.is_sdxl else None
    abar = S.noise_schedule(pipe.schedule).alphas_cumprod
    ts = jnp.asarray(sampler.timesteps)
    n_steps, n_guided = len(sampler.timesteps), guided_steps(cfg, len(sampler.timesteps))
    guide_unet = unet.clone(control=dataclasses.replace(
        unet.control, capture=Capture(cross_probs=cfg.mask.cross_factors, self_qk=cfg.mask.self_factors)))
    image_feats = {"g": feats, "u": null_feats}

    def vision(x, masks, t, parts):
        """The Control of one call: per branch the references' tokens (``t``: none, scale 0; ``u``:
        the null tokens or none), masks and scales, concatenated over the branches."""
        zmask = (jax.image.resize(masks.sum(1), (B, *latent_hw), method="linear")[..., None] if cfg.masked
                 else jnp.ones((B, *latent_hw, 1), jnp.float32))
        rmask = _reference_masks(masks, cfg) if cfg.masked else None
        z, sa = x * zmask, jnp.sqrt(abar[t])
        side = {k: visual(params.get("adapter"), v, ctx[k], z, sa, t) for k, v in image_feats.items()
                if v is not None and (k in parts or k == "g")}
        toks, tmasks, scales = [], [], []
        for p in parts:
            tok, tm = side.get(p, side["g"])
            toks.append(tok)
            tmasks.append(tm)
            scales.append(jnp.full((B,), cfg.visual_scale if p in side else 0.0, jnp.float32))
        cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs)
        tile = lambda a: None if a is None else jnp.tile(a, (len(parts),) + (1,) * (a.ndim - 1))
        text = None
        if cfg.location:      # the mask on the target words' text attention, generation branch only
            wm = jnp.concatenate([word_masks if p == "g" else jnp.zeros_like(word_masks) for p in parts])
            text = TextMask(wm, tile(masks))
        return Control({kv: ExtraTokens(cat(toks), tile(rmask), jnp.concatenate(scales), cat(tmasks))}, text)

    def contexts(parts, t):
        """The text of the branches ``parts``, concatenated: (n B, 77, D), or per layer (L, n B, 77, D)
        when the generation branch reads S+ tokens."""
        cs = [ctx[p] for p in parts]
        if text_tokens is not None and "g" in parts:
            g = splus_context(pipe, params["text_encoders"], ids, word_masks,
                              text_tokens(params.get("adapter"), feats, t), getattr(text_tokens, "layers", None))
            cs = [g if p == "g" else jnp.broadcast_to(c, (g.shape[0], *c.shape)) for p, c in zip(parts, cs)]
            return jnp.concatenate(cs, axis=1)
        return jnp.concatenate(cs)

    def run(module, x, t, parts, masks=None, mutable=False):
        """One UNet call on the concatenation of branches ``parts``; {branch: output}."""
        n = len(parts)
        if on_eval is not None:
            jax.debug.callback(on_eval, n * B)
        c = contexts(parts, t)
        extra = {}
        if pipe.is_sdxl:
            extra = dict(text_embeds=jnp.concatenate([pool[p] for p in parts]), time_ids=jnp.tile(tids, (n, 1)))
        control = None if masks is None else vision(x, masks, t, parts)
        xin = jnp.tile(x, (n, 1, 1, 1)).astype(unet.dtype)
        out = module.apply({"params": params["unet"]}, xin, t, c, control=control, mutable=mutable, **extra)
        out, state = out if mutable else (out, None)
        outs = dict(zip(parts, (o.astype(jnp.float32) for o in jnp.split(out, n))))
        return outs, state

    guide_parts = "ut" if null_feats is None else "t"      # the unconditional branch needs the mask first

    def guided(i, carry):
        x, st, masks, strip = carry
        t = ts[i]
        e, state = run(guide_unet, x, t, guide_parts, mutable=["attention"])
        j = guide_parts.index("t")
        state = jax.tree_util.tree_map(lambda a: a[j * B:(j + 1) * B], state)   # the guidance branch's rows
        masks = guidance_mask(state, word_masks, latent_hw, cfg.mask)
        e2, _ = run(unet, x, t, "g" if null_feats is None else "ug", masks)
        x, st = sampler.step(combine(cfg, {**e, **e2}), x, st, i)
        return x, st, masks, None if strip is None else strip.at[i].set(masks)

    def located(i, carry):
        """Sec. 3.4: the mask of step i - 1 injected at step i; this step's attention gives the next."""
        x, st, masks, strip = carry
        parts = reuse_branches(cfg)
        e, state = run(loc_unet, x, ts[i], parts, masks, mutable=["attention"])
        j = parts.index("g")
        state = jax.tree_util.tree_map(lambda a: a[j * B:(j + 1) * B], state)
        new = select(location_maps(state, kv, word_masks, latent_hw, masks.shape[2:]), cfg.mask)
        x, st = sampler.step(combine(cfg, e), x, st, i)
        return x, st, new, None if strip is None else strip.at[i].set(new)

    def reuse(i, carry):
        x, st, masks, strip = carry
        e, _ = run(unet, x, ts[i], reuse_branches(cfg), masks)
        x, st = sampler.step(combine(cfg, e), x, st, i)
        return x, st, masks, None if strip is None else strip.at[i].set(masks)

    x = latents.astype(jnp.float32)
    strip = jnp.zeros((n_steps, *init_masks.shape), jnp.float32) if cfg.record_masks else None
    carry = (x, sampler.init(x), init_masks.astype(jnp.float32), strip)
    if n_guided:            # static: a loop that never runs is not traced (nor compiled)
        if cfg.location:
            fs = cfg.mask.cross_factors
            loc_unet = unet.clone(control=dataclasses.replace(unet.control, capture=Capture(cross_probs=fs,
                                                                                            extra_probs=fs)))
        carry = jax.lax.fori_loop(0, n_guided, located if cfg.location else guided, carry)
    if n_guided < n_steps:
        carry = jax.lax.fori_loop(n_guided, n_steps, reuse, carry)
    x, _, masks, strip = carry
    img = pipe.vae.apply({"params": params["vae"]}, unscale_latents(x, pipe.vae.config), method="decode")
    out = {"images": jnp.clip((img.astype(jnp.float32) + 1) / 2, 0, 1), "masks": masks}
    if cfg.record_masks:
        out["mask_steps"] = strip
    return out
