"""Fidelity to the papers' equations, on stubbed models where the equation is the whole point:
RealCustom Eq. 13 and RealCustom++ Eq. 15 combine the branches the sampler runs (a stub UNet whose
output names its branch), the unconditional branch's null image masked like the generation branch
(the released code), the CCP's cross-layer path (Eqs. 5-6) computed by hand, and RealCustom
Table 3's "w/o adaptive scoring module" row."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax import schedulers as S
from customjax.adapters.ccp import CCPConfig, CrossLayerCrossScaleProjector
from customjax.control.spec import ControlConfig, ExtraKV
from customjax.guidance.mask import MaskConfig
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.common import make_sampler
from customjax.sampling.dual_branch import DualBranchConfig, dual_branch_sample
from customjax.tokenizer import tokenize
from customjax.zoo import write_tiny_pipeline


@dataclasses.dataclass(frozen=True)
class StubUNet:
    """eps(x, t, ctx, control) = mean(ctx) + sum over references of scale * mean(tokens) * mean(mask):
    each branch's output is a number that says what the branch was given."""

    control: ControlConfig
    dtype: type = jnp.float32

    def clone(self, control):
        return dataclasses.replace(self, control=control)

    def apply(self, variables, x, t, ctx, control=None, mutable=False, **extra):
        out = jnp.broadcast_to(ctx.mean((1, 2))[:, None, None, None], x.shape)
        if control is not None:
            e = control.extra["vision"]
            m = 1.0 if e.mask is None else e.mask.mean((2, 3))                     # (B, R)
            vis = (e.tokens.mean((2, 3)) * m).sum(1) * jnp.broadcast_to(e.scale, (x.shape[0],))
            out = out + vis[:, None, None, None]
        return (out, {}) if mutable else out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe, params = load_stable_diffusion(write_tiny_pipeline(tmp_path_factory.mktemp("sd15"), "sd15", seed=2))
    return pipe, params


def _visual(adapter, feats, ctx, z, sqrt_abar, t=None):
    return feats, None


@pytest.mark.parametrize("formula,uncond", [("one_scale", "none"), ("two_scale", "none"), ("one_scale", "zero")])
def test_guidance_formulas_on_stubbed_outputs(tiny, formula, uncond):
    """One DDIM step with the mask given (t_stop = 0): the sampler's result equals the DDIM step of
    the hand-computed combination (Eq. 15: e_u + w (e_g - e_u); Eq. 13: e_u + w_t (e_t - e_u) +
    w_i (e_g - e_t)), the branches' outputs computed from what each one must see."""
    pipe, params = tiny
    unet = StubUNet(ControlConfig(extra_kv=(ExtraKV("vision", 6),)))
    cfg = DualBranchConfig(mask=MaskConfig(cross_factors=(1,), self_factors=(), mask_factor=1), t_stop=0,
                           cfg=formula, w=4.0, w_t=3.0, w_i=5.0, visual_scale=0.7, uncond_image=uncond)
    B = 2
    ids = tuple(jnp.asarray(tokenize(t, ["a toy on a mat", "a toy"])) for t in pipe.tokenizers)
    neg = tuple(jnp.asarray(tokenize(t, ["", ""])) for t in pipe.tokenizers)
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.standard_normal((B, 1, 3, 6)), jnp.float32)
    null = jnp.asarray(rng.standard_normal((B, 1, 3, 6)), jnp.float32) if uncond == "zero" else None
    mask = jnp.asarray(rng.uniform(size=(B, 1, 16, 16)), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (B, 16, 16, 4))
    smp = make_sampler(pipe.schedule, "ddim", 1)
    wm = jnp.zeros((B, 1, 77), bool)
    got = dual_branch_sample(pipe, unet, smp, cfg, _visual, dict(params, adapter=None), ids, neg, wm, feats, x, mask,
                             null_feats=null)

    from customjax.pipeline import encode_cfg_text
    ctx, _ = encode_cfg_text(pipe, params["text_encoders"], ids, neg)
    c_u, c_c = ctx[:B].mean((1, 2)), ctx[B:].mean((1, 2))
    m = mask.mean((2, 3))[:, 0]
    e_u = c_u + (0.0 if null is None else 0.7 * null.mean((1, 2, 3)) * m)     # the null image, masked, scale s
    e_t = c_c
    e_g = c_c + 0.7 * feats.mean((1, 2, 3)) * m
    if formula == "one_scale":
        e = e_u + 4.0 * (e_g - e_u)                                            # RealCustom++ Eq. 15
    else:
        e = e_u + 3.0 * (e_t - e_u) + 5.0 * (e_g - e_t)                       # RealCustom Eq. 13
    table = S.ddim_schedule(pipe.schedule, 1)
    want_x, _ = S.ddim_step(table, pipe.schedule.prediction_type, jnp.broadcast_to(e[:, None, None, None], x.shape),
                            x, 0)
    from customjax.models.vae import unscale_latents
    img = pipe.vae.apply({"params": params["vae"]}, unscale_latents(want_x, pipe.vae.config), method="decode")
    want = np.clip((np.asarray(img) + 1) / 2, 0, 1)
    np.testing.assert_allclose(np.asarray(got["images"]), want, atol=2e-5)
    # the formulas differ on these numbers (the check above can tell them apart)
    other = e_u + 4.0 * (e_g - e_u) if formula == "two_scale" else e_u + 3.0 * (e_t - e_u) + 5.0 * (e_g - e_t)
    assert float(jnp.abs(other - e).max()) > 1e-2


def test_ccp_cross_layer_path_by_hand():
    """Eqs. 5-6: f_shallow' = MLP(softmax(Q K^T / sqrt(d)) V) with Q from the deep features and K, V
    from the shallow ones of all L layers; it is the first n output tokens, and the shallow input
    reaches nothing else (a projector that ignored or swapped its shallow input fails here)."""
    cfg = CCPConfig(vision_dim=8, out_dim=6, dim_head=4)
    model = CrossLayerCrossScaleProjector(cfg)
    rng = np.random.default_rng(3)
    n, L = 4, 3
    deep, shallow, high = (jnp.asarray(rng.standard_normal((2, k * n, 8)), jnp.float32) for k in (1, L, 4))
    params = model.init(jax.random.key(0), deep, shallow, high)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    out = model.apply({"params": params}, deep, shallow, high)

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    a = params["min_attention2"]
    q = ln(np.asarray(deep), a["norm1"]) @ a["to_q"]["kernel"]
    kv = ln(np.asarray(shallow), a["norm2"])
    k, v = kv @ a["to_k"]["kernel"], kv @ a["to_v"]["kernel"]
    heads = lambda x: x.reshape(*x.shape[:2], 2, 4).transpose(0, 2, 1, 3)   # noqa: E731
    att = jax.nn.softmax(heads(q) @ heads(k).transpose(0, 1, 3, 2) / 2.0, axis=-1) @ heads(v)
    att = np.asarray(att).transpose(0, 2, 1, 3).reshape(2, n, 8)
    gelu = lambda x: np.asarray(jax.nn.gelu(x, approximate=False))          # noqa: E731
    p = {i: params[f"projector2_{i}"] for i in (0, 2, 4, 5)}
    h = gelu(att @ p[0]["kernel"] + p[0]["bias"])
    h = gelu(h @ p[2]["kernel"] + p[2]["bias"])
    want = ln(h @ p[4]["kernel"] + p[4]["bias"], p[5])
    np.testing.assert_allclose(np.asarray(out.tokens[:, :n]), want, atol=1e-4)
    moved = model.apply({"params": params}, deep, shallow + jnp.asarray(rng.standard_normal(shallow.shape), jnp.float32), high)
    assert float(jnp.abs(moved.tokens[:, :n] - out.tokens[:, :n]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(moved.tokens[:, n:]), np.asarray(out.tokens[:, n:]))


def test_realcustom_table3_without_adaptive_scoring():
    """Table 3 ID-2: every CLIP image feature, unweighted, in training and inference; no scoring
    parameters, only the visual K/V train."""
    from customjax.methods.build import build, sampling_side, trainable_tree
    from customjax.methods.protocol import TrainInputs, constant_visual
    from customjax.methods.realcustom import clip_features

    c = importlib.import_module("configs.realcustom").get_config("tiny,table3_no2")
    built = build(c)
    assert "scoring" not in built.params["image"] and built.image_side.scoring is None
    assert set(trainable_tree(built)) == {"unet"}
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 28, 28, 3)), jnp.float32)
    feats = clip_features(built.image_side, built.params["image"], images)
    cond = built.method.condition(built.image_side, built.params["image"], {}, {"reference": images},
                                  TrainInputs(None, None, None, None, jnp.zeros(2, bool)), jax.random.key(0), None)
    np.testing.assert_array_equal(np.asarray(cond.tokens[:, 0]), np.asarray(feats))
    assert cond.token_mask is None
    assert sampling_side(built, c).visual is constant_visual
    full = build(importlib.import_module("configs.realcustom").get_config("tiny"))
    assert "scoring" in trainable_tree(full)
