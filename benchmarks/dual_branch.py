"""Cost of the RealCustom++ dual-branch sampler relative to plain text-to-image.

Three settings, each one ``jax.jit`` compiled ahead of the timed calls (trace+lower and compile times
reported separately, one warm-up call excluded), then ``--repeats`` calls timed with
``jax.block_until_ready`` (median):

  (a) plain T2I with classifier-free guidance (``customjax.sampling.t2i._txt2img``: one UNet call on
      [uncond; cond] per step, 2 evaluations per image per step);
  (b) RealCustom++ dual branch without early stop (``t_stop=None``: every step runs the guidance
      branch [uncond; text] with attention capture, the mask, then the generation branch);
  (c) RealCustom++ with early stop at ``--t_stop`` (the last mask reused; [uncond; generation] as one call).

UNet evaluations per image of (b) and (c) are counted for real through the sampler's ``on_eval`` hook
in a separate, untimed run and must equal ``unet_evaluations(...)``. A per-step breakdown (one
UNet call of each kind, and the mask computation, each jitted and timed alone) says where the time
ratio departs from the evaluation ratio.

The pipeline has random weights (``customjax.zoo.random_pipeline``): "full" has the real SD-1.5 /
SDXL base shapes, "tiny" the test shapes. The visual tokens are constant over the loop, as the
RealCustom++ projector's are (729 tokens of the UNet cross-attention width per reference at full scale).

    python benchmarks/dual_branch.py --model sd15 --scale tiny --batch 2 --repeats 3      # CPU
    python benchmarks/dual_branch.py --model sdxl --scale full --batch 1 --dtype bfloat16  # GPU
    python benchmarks/dual_branch.py --model sdxl --scale full --dry_run                  # shapes only

Paper reference (RealCustom++ Table XIII, SDXL, 25 DDIM steps): T2I 14.21 s; RealCustom++ without
early stop 24.09 s (1.70x); with early stop at T_stop=12 20.45 s (1.44x).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import traverse_util

from customjax.provenance import git_state
from customjax.control.capture import collect
from customjax.control.params import attach, is_control_param
from customjax.control.spec import Capture, Control, ControlConfig, ExtraKV, ExtraTokens
from customjax.guidance.mask import MaskConfig, guidance_mask
from customjax.guidance.topk import keep_count
from customjax.methods.common import with_control
from customjax.methods.protocol import constant_visual  # the projector tokens, the same at every step
from customjax.models.unet import dummy_inputs
from customjax.models.vae import unscale_latents
from customjax.pipeline import encode_text, sdxl_time_ids
from customjax.sampling.common import cached_sampler
from customjax.sampling.dual_branch import DualBranchConfig, dual_branch_sample, guided_steps, unet_evaluations
from customjax.sampling.t2i import _txt2img
from customjax.tokenizer import tokenize, word_token_mask
from customjax import zoo

RESULTS = Path(__file__).resolve().parent / "results"

# Steps / T_stop per model and scale (RealCustom++: SD-1.5 50 steps, SDXL 25 DDIM steps, T_stop at
# half the steps; Table XIII uses T_stop = 12 of 25 for SDXL).
DEFAULTS = {("sd15", "full"): dict(steps=50, t_stop=25), ("sdxl", "full"): dict(steps=25, t_stop=12),
            ("sd15", "tiny"): dict(steps=10, t_stop=5), ("sdxl", "tiny"): dict(steps=10, t_stop=5)}
# Mask layers, by feature-map downsampling factor relative to the latent. Full scale: SD-1.5
# (64x64 latent) low-resolution cross-attention at 16x16 and 8x8, self-attention at 64x64, mask 64x64;
# SDXL (128x128 latent) cross-attention at 32x32, self-attention at 64x64, mask 64x64. Tiny: the
# only attention resolutions of the tiny UNets (zoo.TINY): SD-1.5 at latent/1 and latent/2 (mid),
# SDXL at latent/2 only (as tests/test_guidance.py::_mask_cfg).
MASKS = {("sd15", "full"): MaskConfig(cross_factors=(4, 8), self_factors=(1,), mask_factor=1),
         ("sdxl", "full"): MaskConfig(cross_factors=(4,), self_factors=(2,), mask_factor=2),
         ("sd15", "tiny"): MaskConfig(cross_factors=(2,), self_factors=(1,), mask_factor=1),
         ("sdxl", "tiny"): MaskConfig(cross_factors=(2,), self_factors=(2,), mask_factor=2)}
VISUAL_TOKENS = {"full": 729, "tiny": 9}     # per reference (RealCustom++: 27 x 27 projector tokens)
PROMPTS = ["a photo of a toy on the grass", "a toy sitting on a wooden table",
           "a toy in the snow, detailed", "a close-up photo of a toy at the beach"]
WORD = "toy"
PAPER = {"source": "RealCustom++ Table XIII (SDXL, 25 DDIM steps, T_stop=12)",
         "t2i_s": 14.21, "no_early_stop_s": 24.09, "early_stop_s": 20.45,
         "no_early_stop_ratio": round(24.09 / 14.21, 3), "early_stop_ratio": round(20.45 / 14.21, 3)}


class BenchmarkError(RuntimeError):
    """Something the benchmark found inconsistent."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise BenchmarkError(msg)


class EvalCounter:
    """The sampler's ``on_eval`` hook: records the batch size of every UNet call."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n) -> None:
        self.calls.append(int(n))


def device_tag(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------
# Building


def _abstract_random(shapes, key, std):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes)


def build(model: str, scale: str, dtype: Any, abstract: bool):
    """(pipe, controlled unet, params with the vision K/V, base unet params, visual dim).
    ``abstract``: every parameter a ShapeDtypeStruct, nothing drawn or allocated (the full SDXL
    weights would not fit this host's memory twice)."""
    if abstract:
        with mock.patch.object(zoo, "_random", _abstract_random):   # zoo's weight drawing, shapes only
            pipe, params = zoo.random_pipeline(model, scale, seed=0, dtype=dtype)
    else:
        pipe, params = zoo.random_pipeline(model, scale, seed=0, dtype=dtype)
    check(all(isinstance(l, jax.ShapeDtypeStruct) != (not abstract) for l in jax.tree_util.tree_leaves(params)),
          "random_pipeline gave parameters of the wrong kind (abstract vs concrete)")
    dim = pipe.unet.config.cross_attention_dim[0]
    control = ControlConfig(extra_kv=(ExtraKV("vision", dim),))
    if abstract:   # with_control's shapes, without drawing
        unet = pipe.unet.clone(control=control)
        shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(unet.config)))["params"]
        unet_p = attach(params["unet"], shapes)
    else:
        unet, unet_p = with_control(pipe.unet, params["unet"], control, jax.random.key(1))
    # the plain UNet's parameters: the same arrays without the vision K/V (no second copy)
    flat = traverse_util.flatten_dict(unet_p)
    is_vision = lambda k: is_control_param(k, extra_kv=("vision",), lora=False)
    base_unet = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_vision(k)})
    check(any(map(is_vision, flat)), "with_control added no vision K/V parameters")
    check(traverse_util.flatten_dict(base_unet).keys() == traverse_util.flatten_dict(params["unet"]).keys(),
          "the UNet parameters without the vision K/V differ from the plain UNet's")
    return pipe, unet, dict(params, unet=unet_p), base_unet, dim


def inputs(pipe, batch: int, size: int, tokens: int, dim: int, mask_factor: int, abstract: bool):
    f = pipe.vae_scale
    check(size % f == 0, f"--size {size} is not a multiple of the VAE factor {f}")
    lat = size // f
    check(lat % mask_factor == 0, f"latent side {lat} is not a multiple of mask_factor {mask_factor}")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    ids = tuple(jnp.asarray(tokenize(t, prompts)) for t in pipe.tokenizers)
    neg = tuple(jnp.asarray(tokenize(t, [""] * batch)) for t in pipe.tokenizers)
    wm = jnp.asarray(word_token_mask(pipe.tokenizers[0], prompts, WORD))[:, None]        # (B, J=1, 77)
    check(bool(np.all(np.asarray(wm).sum(-1) > 0)), f"target word {WORD!r} not found in every prompt")
    C = pipe.unet.config.in_channels
    mh = lat // mask_factor
    if abstract:
        latents = jax.ShapeDtypeStruct((batch, lat, lat, C), jnp.float32)
        feats = jax.ShapeDtypeStruct((batch, 1, tokens, dim), jnp.float32)
        init = jax.ShapeDtypeStruct((batch, 1, mh, mh), jnp.float32)
    else:
        k1, k2 = jax.random.split(jax.random.key(42))
        latents = jax.random.normal(k1, (batch, lat, lat, C))
        feats = jax.random.normal(k2, (batch, 1, tokens, dim))
        init = jnp.zeros((batch, 1, mh, mh))
    return dict(ids=ids, neg=neg, wm=wm, latents=latents, feats=feats, init=init, lat=lat)


def check_mask_layers(pipe, unet, params, x, mcfg: MaskConfig) -> dict:
    """Abstractly runs the guidance UNet with capture; fails unless every requested factor has an
    attention layer (a missing factor would otherwise just be left out of the average)."""
    B, lat = x["latents"].shape[0], x["lat"]
    guide = unet.clone(control=dataclasses.replace(
        unet.control, capture=Capture(cross_probs=mcfg.cross_factors, self_qk=mcfg.self_factors)))

    def f(params, ids, latents):
        ctx, pooled = encode_text(pipe, params["text_encoders"], ids)
        extra = dict(text_embeds=pooled, time_ids=sdxl_time_ids(lat * pipe.vae_scale, lat * pipe.vae_scale, B)) \
            if pipe.is_sdxl else {}
        _, state = guide.apply({"params": params["unet"]}, latents, jnp.zeros((B,)), ctx,
                               mutable=["attention"], **extra)
        return state

    state = jax.eval_shape(f, params, x["ids"], x["latents"])
    found = {}
    for name, factors in (("cross_probs", mcfg.cross_factors), ("self_qk", mcfg.self_factors)):
        got = {}
        for _, v in collect(state, name):
            hw = (v[0] if name == "self_qk" else v).shape[1]
            fac = math.isqrt(lat * lat // hw)
            got[fac] = got.get(fac, 0) + 1
        missing = [f_ for f_ in factors if f_ not in got]
        check(not missing, f"MaskConfig.{name.split('_')[0]}_factors {factors}: no attention layer at factor(s) "
                           f"{missing} of this UNet (captured at {sorted(got)})")
        found[name] = {str(k): n for k, n in sorted(got.items())}
    return found


# ---------------------------------------------------------------------------------------------
# Timing


def prepare(name: str, jitted, args: tuple, kwargs: dict) -> tuple[dict, Any, Any]:
    """Lower + compile (timed) through the jitted function itself, so that later calls hit its
    cache, and one warm-up call (timed, excluded from the statistics)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(jitted(*args, **kwargs))
    t3 = time.perf_counter()
    print(f"  {name}: lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, warm-up call {t3 - t2:.3f} s", flush=True)
    call = lambda: jax.block_until_ready(jitted(*args, **kwargs))
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, warmup_s=t3 - t2), out, call


def interleaved(calls: dict, repeats: int) -> dict:
    """``repeats`` rounds, each timing every call once, so that load from other processes on the
    machine spreads over all settings alike. Returns {name: {"times_s", "median_s", "min_s"}}."""
    times = {n: [] for n in calls}
    for _ in range(repeats):
        for n, call in calls.items():
            s = time.perf_counter()
            call()
            times[n].append(time.perf_counter() - s)
    return {n: dict(times_s=t, median_s=float(np.median(t)), min_s=float(np.min(t))) for n, t in times.items()}


def count_evaluations(sample, batch: int) -> EvalCounter:
    counter = EvalCounter()
    jax.block_until_ready(sample(on_eval=counter))
    jax.effects_barrier()
    check(all(n in (batch, 2 * batch, 3 * batch) for n in counter.calls),
          f"UNet call batch sizes {sorted(set(counter.calls))} are not multiples 1-3 of the batch {batch}")
    return counter


def component_fns(pipe, unet, mcfg: MaskConfig, B: int, lat: int):
    """Jitted stand-ins of one sampler step's pieces, mirroring ``dual_branch_sample``'s ``run`` and
    ``vision``: plain [u; c] call, guidance [u; t] call with capture + mask, mask alone, the B-row text
    call, the B-row generation call (visual tokens, masked), the [u; gen] reuse call, and the fixed
    costs (text encoding of 2B prompts + VAE decode of B latents)."""
    guide = unet.clone(control=dataclasses.replace(
        unet.control, capture=Capture(cross_probs=mcfg.cross_factors, self_qk=mcfg.self_factors)))
    f = pipe.vae_scale

    def extra(pooled, n):
        if not pipe.is_sdxl:
            return {}
        return dict(text_embeds=pooled, time_ids=sdxl_time_ids(lat * f, lat * f, n))

    def vision(feats, masks, x, scales):
        zmask = jax.image.resize(masks.sum(1), (B, lat, lat), method="linear")[..., None]
        tokens, tmask = constant_visual(None, feats, None, x * zmask, None)
        reps = len(scales)
        tile = lambda a: jnp.tile(a, (reps,) + (1,) * (a.ndim - 1))
        return Control({"vision": ExtraTokens(tile(tokens), tile(masks), jnp.repeat(jnp.asarray(scales, jnp.float32), B))})

    t = jnp.asarray(500)

    @jax.jit
    def plain(base_unet, x, ctx2, pooled2):
        xin = jnp.concatenate([x, x]).astype(pipe.unet.dtype)
        return pipe.unet.apply({"params": base_unet}, xin, t, ctx2, **extra(pooled2, 2 * B)).astype(jnp.float32)

    @jax.jit
    def guide_and_mask(unet_p, x, ctx2, pooled2, wm):
        xin = jnp.concatenate([x, x]).astype(unet.dtype)
        out, state = guide.apply({"params": unet_p}, xin, t, ctx2, mutable=["attention"], **extra(pooled2, 2 * B))
        state = jax.tree_util.tree_map(lambda a: a[B:], state)
        return out.astype(jnp.float32), guidance_mask(state, wm, (lat, lat), mcfg)

    @jax.jit
    def guide_state(unet_p, x, ctx2, pooled2):
        xin = jnp.concatenate([x, x]).astype(unet.dtype)
        _, state = guide.apply({"params": unet_p}, xin, t, ctx2, mutable=["attention"], **extra(pooled2, 2 * B))
        return jax.tree_util.tree_map(lambda a: a[B:], state)

    @jax.jit
    def mask_only(state, wm):
        return guidance_mask(state, wm, (lat, lat), mcfg)

    @jax.jit
    def text_b(base_unet, x, ctx_c, pool_c):
        return pipe.unet.apply({"params": base_unet}, x.astype(pipe.unet.dtype), t, ctx_c,
                               **extra(pool_c, B)).astype(jnp.float32)

    @jax.jit
    def gen_b(unet_p, x, ctx_c, pool_c, feats, masks):
        return unet.apply({"params": unet_p}, x.astype(unet.dtype), t, ctx_c,
                          control=vision(feats, masks, x, (1.0,)), **extra(pool_c, B)).astype(jnp.float32)

    @jax.jit
    def reuse_2b(unet_p, x, ctx2, pooled2, feats, masks):
        xin = jnp.concatenate([x, x]).astype(unet.dtype)
        return unet.apply({"params": unet_p}, xin, t, ctx2, control=vision(feats, masks, x, (0.0, 1.0)),
                          **extra(pooled2, 2 * B)).astype(jnp.float32)

    @jax.jit
    def fixed(params, both, x):
        ctx, pooled = encode_text(pipe, params["text_encoders"], both)
        img = pipe.vae.apply({"params": params["vae"]}, unscale_latents(x, pipe.vae.config), method="decode")
        return ctx, pooled, img

    return dict(plain=plain, guide_and_mask=guide_and_mask, guide_state=guide_state, mask_only=mask_only,
                text_b=text_b, gen_b=gen_b, reuse_2b=reuse_2b, fixed=fixed)


def breakdown(pipe, unet, params, base_unet, x, mcfg, B, repeats) -> dict:
    fns = component_fns(pipe, unet, mcfg, B, x["lat"])
    both = tuple(jnp.concatenate([n, c]) for n, c in zip(x["neg"], x["ids"]))
    ctx2, pooled2 = jax.jit(functools.partial(encode_text, pipe))(params["text_encoders"], both)
    ctx_c = ctx2[B:]
    pool_c = None if pooled2 is None else pooled2[B:]
    lat_x = x["latents"]
    _, masks = fns["guide_and_mask"](params["unet"], lat_x, ctx2, pooled2, x["wm"])
    state = fns["guide_state"](params["unet"], lat_x, ctx2, pooled2)
    calls = {
        "plain_2B": (fns["plain"], (base_unet, lat_x, ctx2, pooled2)),
        "guide_2B_plus_mask": (fns["guide_and_mask"], (params["unet"], lat_x, ctx2, pooled2, x["wm"])),
        "mask_only": (fns["mask_only"], (state, x["wm"])),
        "text_B": (fns["text_b"], (base_unet, lat_x, ctx_c, pool_c)),
        "gen_B": (fns["gen_b"], (params["unet"], lat_x, ctx_c, pool_c, x["feats"], masks)),
        "reuse_2B": (fns["reuse_2b"], (params["unet"], lat_x, ctx2, pooled2, x["feats"], masks)),
        "fixed_text_encode_2B_vae_decode_B": (fns["fixed"], (params, both, lat_x)),
    }
    prep = {}
    for name, (fn, args) in calls.items():
        info, _, call = prepare(name, fn, args, {})
        prep[name] = (info, call)
    stats = interleaved({n: c for n, (_, c) in prep.items()}, repeats)
    for n, st in stats.items():
        print(f"  {n}: median {st['median_s'] * 1e3:.2f} ms, min {st['min_s'] * 1e3:.2f} ms of {repeats}", flush=True)
    return {n: dict(prep[n][0], **stats[n]) for n in calls}


# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="default: sd15 50, sdxl 25 (tiny: 10)")
    ap.add_argument("--t_stop", type=int, default=None, help="default: sd15 25, sdxl 12 (tiny: 5)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels; default: the model's "
                    "native size (sd15 512, sdxl 1024; tiny 32)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype (parameters stay float32, as the loaders keep them)")
    ap.add_argument("--sampler", choices=("ddim", "dpm++2m"), default="ddim")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--visual_tokens", type=int, default=None, help="per reference; default 729 full, 9 tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--component_repeats", type=int, default=None,
                    help="timed calls per breakdown component (default: 3 x --repeats)")
    ap.add_argument("--no_breakdown", action="store_true", help="skip the per-step component timings")
    ap.add_argument("--dry_run", action="store_true",
                    help="build shapes only (jax.eval_shape of the three settings), print the analytic counts")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/dual_branch_<model>_<scale>_<device>.json")
    a = ap.parse_args(argv)
    d = DEFAULTS[(a.model, a.scale)]
    a.steps = d["steps"] if a.steps is None else a.steps
    a.t_stop = d["t_stop"] if a.t_stop is None else a.t_stop
    a.visual_tokens = VISUAL_TOKENS[a.scale] if a.visual_tokens is None else a.visual_tokens
    a.component_repeats = a.component_repeats or 3 * a.repeats
    if a.batch < 1 or a.repeats < 1 or a.steps < 1:
        ap.error("--batch, --repeats and --steps must be >= 1")
    if not 1 <= a.t_stop < a.steps:
        ap.error(f"--t_stop must lie in [1, steps) = [1, {a.steps}) so that (b) and (c) differ; got {a.t_stop}")
    return a


def main(argv=None) -> dict | None:
    a = parse(argv)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    dev = jax.devices()[0]
    tag = device_tag(dev.device_kind)
    mcfg = MASKS[(a.model, a.scale)]
    print(f"dual-branch benchmark: {a.model} {a.scale} on {dev.device_kind} ({dev.platform}), jax {jax.__version__}",
          flush=True)

    t0 = time.perf_counter()
    pipe, unet, params, base_unet, dim = build(a.model, a.scale, dtype, abstract=a.dry_run)
    size = a.size or pipe.unet.config.sample_size * pipe.vae_scale
    x = inputs(pipe, a.batch, size, a.visual_tokens, dim, mcfg.mask_factor, abstract=a.dry_run)
    B, lat = a.batch, x["lat"]
    n_params = lambda tree: int(sum(np.prod(l.shape) for l in jax.tree_util.tree_leaves(tree)))
    vision_params = n_params(params["unet"]) - n_params(base_unet)
    print(f"  built in {time.perf_counter() - t0:.1f} s: UNet {n_params(base_unet) / 1e6:.1f} M params "
          f"(+{vision_params / 1e6:.2f} M to_k/to_v_vision), image {size}px, latent {lat}x{lat}, "
          f"mask {lat // mcfg.mask_factor}x{lat // mcfg.mask_factor}, visual tokens {a.visual_tokens}x{dim}",
          flush=True)
    layers = check_mask_layers(pipe, unet, params, x, mcfg)
    print(f"  mask layers captured (factor: count): {layers}", flush=True)

    smp = cached_sampler(pipe.schedule, a.sampler, a.steps)
    cfg_b = DualBranchConfig(mask=mcfg, t_stop=None, w=a.guidance)
    cfg_c = DualBranchConfig(mask=mcfg, t_stop=a.t_stop, w=a.guidance)
    analytic = {"t2i": 2 * a.steps, "no_early_stop": unet_evaluations(cfg_b, a.steps),
                "early_stop": unet_evaluations(cfg_c, a.steps)}
    check(analytic["no_early_stop"] == 3 * a.steps, "unet_evaluations(t_stop=None) != 3 * steps")
    check(analytic["early_stop"] == 3 * a.t_stop + 2 * (a.steps - a.t_stop),
          "unet_evaluations(t_stop) != 3 T_stop + 2 (steps - T_stop)")

    # Empty negative prompts; for SDXL zero unconditional embeddings, as diffusers does (both samplers).
    zero = pipe.is_sdxl
    t2i = functools.partial(_txt2img, pipe, smp, params=dict(params, unet=base_unet),
                            ids=x["ids"], neg_ids=x["neg"], x=x["latents"], guidance=a.guidance, zero_uncond=zero)

    def dual(cfg, on_eval=None):
        return functools.partial(dual_branch_sample, pipe, unet, smp, cfg, constant_visual, params, x["ids"],
                                 x["neg"], x["wm"], x["feats"], x["latents"], x["init"], zero_uncond=zero,
                                 on_eval=on_eval)

    settings = (("t2i", "plain T2I (CFG)", None), ("no_early_stop", "RealCustom++, no early stop", cfg_b),
                ("early_stop", f"RealCustom++, T_stop={a.t_stop}", cfg_c))

    if a.dry_run:
        for key, label, cfg in settings:
            part = t2i if cfg is None else dual(cfg)
            out = (_txt2img if cfg is None else dual_branch_sample).eval_shape(*part.args, **part.keywords)
            img = out if cfg is None else out["images"]
            check(img.shape == (B, size, size, 3), f"{label}: images {img.shape}, expected {(B, size, size, 3)}")
            print(f"  {label}: traced, images {img.shape} {img.dtype}", flush=True)
        print(f"\nanalytic UNet evaluations per image ({a.steps} steps, T_stop {a.t_stop}):")
        for key, label, _ in settings:
            print(f"  {label:<32} {analytic[key]:>5}  {analytic[key] / analytic['t2i']:.3f}x")
        return None

    result = {"benchmark": "dual_branch", "model": a.model, "scale": a.scale,
              "device": {"kind": dev.device_kind, "platform": dev.platform, "tag": tag, "count": jax.device_count(),
                         "host": platform.node(), "cpus": os.cpu_count()},
              "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                           "python": sys.version.split()[0]},
              **{f"git_{k}": v for k, v in git_state().items()},   # git_commit, git_dirty
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {"batch": B, "steps": a.steps, "t_stop": a.t_stop, "sampler": a.sampler,
                           "guidance": a.guidance, "dtype": a.dtype, "param_dtype": "float32", "image_px": size,
                           "latent": [lat, lat], "mask": dataclasses.asdict(mcfg),
                           "mask_hw": [lat // mcfg.mask_factor] * 2, "subjects": 1, "references": 1,
                           "visual_tokens": a.visual_tokens, "visual_dim": dim, "repeats": a.repeats,
                           "component_repeats": a.component_repeats, "zero_uncond": zero,
                           "unet_params": n_params(base_unet), "vision_kv_params": vision_params,
                           "mask_layers_captured": layers},
              "paper": PAPER, "checks": []}

    # Real evaluation counts (separate, untimed runs with the on_eval hook).
    counted = {"t2i": None}
    for key, label, cfg in settings[1:]:
        c = count_evaluations(dual(cfg), B)
        g = guided_steps(cfg, a.steps)
        check(len(c.calls) == 2 * g + (a.steps - g),
              f"{label}: {len(c.calls)} UNet calls, expected {2 * g + (a.steps - g)}")
        check(sum(c.calls) % B == 0, f"{label}: evaluated rows {sum(c.calls)} not a multiple of the batch {B}")
        counted[key] = sum(c.calls) // B
        check(counted[key] == analytic[key],
              f"{label}: counted {counted[key]} UNet evaluations per image, unet_evaluations() says {analytic[key]}")
        print(f"  {label}: counted {counted[key]} UNet evaluations per image in {len(c.calls)} calls "
              f"(= unet_evaluations)", flush=True)
    result["checks"].append("counted on_eval evaluations == unet_evaluations for (b) and (c)")

    timings, outs, calls = {}, {}, {}
    for key, label, cfg in settings:
        part = t2i if cfg is None else dual(cfg)
        jitted = _txt2img if cfg is None else dual_branch_sample
        timings[key], outs[key], calls[key] = prepare(label, jitted, part.args, part.keywords)
    for key, st in interleaved(calls, a.repeats).items():
        timings[key].update(st)
        print(f"  {key}: median {st['median_s']:.4f} s, min {st['min_s']:.4f} s of {a.repeats}", flush=True)

    # Consistency of the outputs.
    k = keep_count(mcfg.gammas(1)[0], (lat // mcfg.mask_factor) ** 2)
    for key, label, cfg in settings:
        img = np.asarray(outs[key] if cfg is None else outs[key]["images"])
        check(img.shape == (B, size, size, 3), f"{label}: images {img.shape}, expected {(B, size, size, 3)}")
        check(bool(np.isfinite(img).all()), f"{label}: non-finite pixels")
        if cfg is not None:
            kept = (np.asarray(outs[key]["masks"]) > 0).reshape(B, -1).sum(-1)
            check(bool(np.all(kept == k)), f"{label}: final masks keep {kept.tolist()} positions, Top-K is {k}")
    result["checks"].append(f"images finite, shape {(B, size, size, 3)}; final masks keep Top-K = {k} positions")
    check(not np.array_equal(np.asarray(outs["t2i"]), np.asarray(outs["no_early_stop"]["images"])),
          "the dual branch gave the plain T2I images: the visual tokens had no effect")
    result["checks"].append("dual-branch images differ from plain T2I")

    base_t = timings["t2i"]["median_s"] / B
    rows = {}
    for key, label, cfg in settings:
        per_img = timings[key]["median_s"] / B
        rows[key] = dict(label=label, unet_evals_per_image=analytic[key], unet_evals_counted=counted[key],
                         evals_ratio=analytic[key] / analytic["t2i"], time_per_image_s=per_img,
                         time_ratio=per_img / base_t,
                         time_ratio_min=timings[key]["min_s"] / timings["t2i"]["min_s"], **timings[key])
    result["results"] = rows

    if not a.no_breakdown:
        print("  per-step components:", flush=True)
        comp = breakdown(pipe, unet, params, base_unet, x, mcfg, B, a.component_repeats)
        m = {n: r["median_s"] for n, r in comp.items()}
        fixed, g = m["fixed_text_encode_2B_vae_decode_B"], a.t_stop
        step_b = m["guide_2B_plus_mask"] + m["gen_B"]
        pred = {"t2i": fixed + a.steps * m["plain_2B"], "no_early_stop": fixed + a.steps * step_b,
                "early_stop": fixed + g * step_b + (a.steps - g) * m["reuse_2B"]}
        p = m["plain_2B"]
        result["breakdown"] = {
            "components_median_s": m, "components": comp,
            "per_step_relative_to_plain_2B": {
                "guidance_call_capture_overhead": (m["guide_2B_plus_mask"] - m["mask_only"] - p) / p,
                "mask_computation": m["mask_only"] / p,
                "generation_call_B": m["gen_B"] / p,
                "of_which_visual_tokens": (m["gen_B"] - m["text_B"]) / p,
                "of_which_half_batch_inefficiency": (m["text_B"] - p / 2) / p,
                "reuse_call_2B": m["reuse_2B"] / p,
                "guided_step_total": step_b / p},
            "predicted_total_s": pred,
            "predicted_time_ratio": {k_: pred[k_] / pred["t2i"] for k_ in pred},
            "measured_over_predicted": {k_: timings[k_]["median_s"] / pred[k_] for k_ in pred},
            "fixed_share_of_t2i": fixed / timings["t2i"]["median_s"]}

    out = Path(a.out) if a.out else RESULTS / f"dual_branch_{a.model}_{a.scale}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    if "breakdown" in result:
        br = result["breakdown"]
        rel = br["per_step_relative_to_plain_2B"]
        print(f"\nper-step components (batch {B}; times relative to one plain [u; c] call = "
              f"{m['plain_2B'] * 1e3:.2f} ms):")
        for name in ("guidance_call_capture_overhead", "mask_computation", "generation_call_B",
                     "of_which_visual_tokens", "of_which_half_batch_inefficiency", "reuse_call_2B",
                     "guided_step_total"):
            print(f"  {name:<36} {rel[name]:+.3f}" if name.startswith(("guidance", "of_")) else
                  f"  {name:<36} {rel[name]:.3f}")
        print(f"  fixed (text encode + VAE decode)     {fixed * 1e3:.2f} ms = {br['fixed_share_of_t2i']:.1%} of T2I")
        print("  predicted / measured ratio to T2I:    " + ", ".join(
            f"{k_} {br['predicted_time_ratio'][k_]:.2f} / {rows[k_]['time_ratio']:.2f}" for k_ in pred))

    print(f"\n{a.model} {a.scale}, {dev.device_kind}, batch {B}, {a.steps} {a.sampler} steps, {size}px, "
          f"{a.dtype}, median of {a.repeats}")
    print(f"  {'setting':<30} {'UNet evals/img':>14} {'ratio':>6} {'time/img (s)':>13} {'ratio':>6} "
          f"{'(min)':>6} {'compile (s)':>11}")
    for key in ("t2i", "no_early_stop", "early_stop"):
        r = rows[key]
        print(f"  {r['label']:<30} {r['unet_evals_per_image']:>14} {r['evals_ratio']:>6.2f} "
              f"{r['time_per_image_s']:>13.4f} {r['time_ratio']:>6.2f} {r['time_ratio_min']:>6.2f} {r['compile_s']:>11.1f}")
    print(f"  paper (SDXL, 25 DDIM, T_stop 12): T2I {PAPER['t2i_s']} s; no early stop {PAPER['no_early_stop_s']} s "
          f"({PAPER['no_early_stop_ratio']:.2f}x); early stop {PAPER['early_stop_s']} s ({PAPER['early_stop_ratio']:.2f}x)")
    print(f"  written to {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
