"""Adaptive mask guidance (RealCustom++ Eqs. 12-16, Algorithm 1) and the jitted dual-branch sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax.provenance import CompileCounter
from customjax.control.capture import collect
from customjax.control.spec import Capture, ControlConfig, ExtraKV
from customjax.guidance.mask import MaskConfig, cross_attention_maps, select, self_augment
from customjax.guidance.topk import keep_count, multi_subject_top_k, normalize, top_k, top_k_indicator
from customjax.methods.common import with_control
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.common import cached_sampler
from customjax.sampling.dual_branch import DualBranchConfig, dual_branch_sample, unet_evaluations
from customjax.sampling.t2i import _txt2img
from customjax.tokenizer import tokenize, word_token_mask
from customjax.zoo import write_tiny_pipeline


# ---------------------------------------------------------------------------------------------
# Top-K and Algorithm 1


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.2, 0.25, 0.5, 1.0])
def test_top_k_count_and_max_norm(gamma):
    m = jax.random.uniform(jax.random.key(0), (3, 16, 16))
    k = keep_count(gamma, 256)
    assert k == int(np.floor(gamma * 256))
    kept = top_k_indicator(m, k)
    assert np.all(np.asarray(kept).reshape(3, -1).sum(-1) == k)
    bar = top_k(m, k)
    assert np.array_equal(np.asarray(bar) > 0, np.asarray(kept))
    # kept entries are the largest ones
    if 0 < k < 256:
        flat = np.asarray(m).reshape(3, -1)
        thr = np.sort(flat, -1)[:, -k]
        assert np.all((flat >= thr[:, None]) == np.asarray(kept).reshape(3, -1))
    hat = normalize(bar, kept, "max")
    if k:
        np.testing.assert_allclose(np.asarray(hat).reshape(3, -1).max(-1), 1.0)
    binary = normalize(bar, kept, "binary")
    assert set(np.unique(binary)) <= {0.0, 1.0} and float(binary.sum()) == 3 * k


def _algorithm1_reference(m, counts):
    """RealCustom++ Algorithm 1, literally, in numpy."""
    J, H, W = m.shape
    m = m.astype(np.float64).copy()
    cur, flag, bar = [0] * J, np.zeros((H, W), bool), np.zeros((J, H, W), bool)
    while sum(cur[j] < counts[j] for j in range(J)):
        for j in range(J):
            if cur[j] < counts[j]:
                mj = np.where(flag, -np.inf, m[j])
                h, w = np.unravel_index(np.argmax(mj), (H, W))
                bar[j, h, w] = True
                flag[h, w] = True
                cur[j] += 1
    return bar


@pytest.mark.parametrize("seed", range(6))
def test_algorithm1_disjoint_exact_counts_and_matches_reference(seed):
    rng = np.random.default_rng(seed)
    J = int(rng.integers(2, 4))
    H, W = 8, 12
    gammas = rng.dirichlet(np.ones(J + 1))[:J]          # sum < 1
    counts = tuple(keep_count(float(g), H * W) for g in gammas)
    # correlated maps, so subjects compete for the same positions
    base = rng.random((H, W))
    m = np.stack([base + 0.3 * rng.random((H, W)) for _ in range(J)])[None].repeat(2, 0).astype(np.float32)
    alloc = np.asarray(multi_subject_top_k(jnp.asarray(m), counts))
    assert alloc.shape == (2, J, H, W)
    assert np.all(alloc.sum(axis=1) <= 1), "masks overlap"
    assert tuple(alloc[0].reshape(J, -1).sum(-1)) == counts
    np.testing.assert_array_equal(alloc[0], _algorithm1_reference(m[0], counts))
    hat = select(jnp.asarray(m), MaskConfig(gamma_scope=tuple(map(float, gammas))))
    assert np.all((np.asarray(hat) > 0).sum(axis=1) <= 1)
    for j in range(J):
        if counts[j]:
            np.testing.assert_allclose(np.asarray(hat)[:, j].max(axis=(-2, -1)), 1.0)


def test_overlap_mode_allows_shared_positions():
    m = jnp.stack([jnp.arange(16.0).reshape(4, 4)] * 2)[None]
    hat = select(m, MaskConfig(gamma_scope=0.25, multi="overlap"))
    assert int(((np.asarray(hat) > 0).sum(axis=1) == 2).sum()) == 4
    hat = select(m, MaskConfig(gamma_scope=0.25, multi="algorithm1"))
    assert int(((np.asarray(hat) > 0).sum(axis=1) == 2).sum()) == 0


# ---------------------------------------------------------------------------------------------
# Guidance on a tiny pipeline


_BUILT = {}


def _build(kind, tmp_path_factory):
    if kind not in _BUILT:
        folder = write_tiny_pipeline(tmp_path_factory.mktemp(kind), kind, seed=5)
        pipe, params = load_stable_diffusion(folder)
        unet, unet_p = with_control(pipe.unet, params["unet"], ControlConfig(extra_kv=(ExtraKV("vision", 16),)),
                                    jax.random.key(1), std=0.3)
        _BUILT[kind] = kind, pipe, dict(params, unet=unet_p), unet
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return _build("sd15", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return _build("sdxl", tmp_path_factory)


PROMPTS = ["a red toy and a blue cat", "a toy cat on grass"]


def _inputs(pipe, words=(("toy",), ("toy",))):
    ids = tuple(jnp.asarray(tokenize(t, PROMPTS)) for t in pipe.tokenizers)
    neg = tuple(jnp.asarray(tokenize(t, [""] * len(PROMPTS))) for t in pipe.tokenizers)
    J = len(words[0])
    wm = jnp.stack([jnp.asarray(word_token_mask(pipe.tokenizers[0], PROMPTS, [w[j] for w in words]))
                    for j in range(J)], axis=1)
    latents = jax.random.normal(jax.random.key(7), (2, 16, 16, 4))
    return ids, neg, wm, latents


def _visual(adapter_params, feats, ctx, z, sqrt_abar, t=None):
    return feats, None


def test_fast_self_augmentation_equals_explicit_product(tiny_sd15):
    kind, pipe, params, unet = tiny_sd15
    ids, neg, wm, latents = _inputs(pipe)
    factor = 1 if kind == "sd15" else 2   # the finest attention resolution of each tiny UNet
    cap = unet.clone(control=dataclasses.replace(
        unet.control, capture=Capture(cross_probs=(factor, 2 * factor) if kind == "sd15" else (2,),
                                      self_probs=(factor,), self_qk=(factor,))))
    from customjax.pipeline import encode_text, sdxl_time_ids
    ctx, pooled = encode_text(pipe, params["text_encoders"], ids)
    extra = dict(text_embeds=pooled, time_ids=sdxl_time_ids(32, 32, 2)) if pipe.is_sdxl else {}
    _, state = cap.apply({"params": params["unet"]}, latents, 500, ctx, mutable=["attention"], **extra)
    hw = (16 // factor, 16 // factor)
    m_cross = cross_attention_maps(state, wm, (16, 16), hw)
    fast = self_augment(state, m_cross, (16, 16))
    probs = [p for _, p in collect(state, "self_probs")]
    v = m_cross.reshape(2, 1, -1).transpose(0, 2, 1)
    explicit = sum(p @ v for p in probs) / len(probs)
    np.testing.assert_allclose(np.asarray(fast).reshape(2, 1, -1), np.asarray(explicit).transpose(0, 2, 1),
                               atol=1e-6)


def _mask_cfg(kind, **kw):
    if kind == "sd15":   # attention at latent/1 (down, up) and latent/2 (mid)
        return MaskConfig(cross_factors=(2,), self_factors=(1,), mask_factor=1, **kw)
    return MaskConfig(cross_factors=(2,), self_factors=(2,), mask_factor=2, **kw)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_zero_mask_without_guidance_is_plain_t2i_bit_for_bit(tiny, sampler):
    """Also for the ancestral sampler, whose per-image noise keys ride in the sampler state."""
    kind, pipe, params, unet = tiny
    ids, neg, wm, latents = _inputs(pipe)
    smp = cached_sampler(pipe.schedule, sampler, 4)
    cfg = DualBranchConfig(mask=_mask_cfg(kind), t_stop=0, w=7.5)
    mhw = (16 // cfg.mask.mask_factor,) * 2
    feats = jax.random.normal(jax.random.key(3), (2, 1, 5, 16))
    out = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats, latents,
                             jnp.zeros((2, 1, *mhw)))
    plain = _txt2img(pipe, smp, params, ids, neg, latents, 7.5, False)
    assert np.array_equal(np.asarray(out["images"]), np.asarray(plain))
    # and a non-zero mask changes the images: the references act only through the mask
    ones = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats, latents,
                              jnp.ones((2, 1, *mhw)))
    assert np.abs(np.asarray(ones["images"]) - np.asarray(plain)).max() > 1e-4


def test_early_stop_mask_constant_eval_count_and_single_compile(tiny_sdxl):
    kind, pipe, params, unet = tiny_sdxl
    ids, neg, wm, latents = _inputs(pipe)
    steps, t_stop = 6, 3
    smp = cached_sampler(pipe.schedule, "ddim", steps)
    cfg = DualBranchConfig(mask=_mask_cfg(kind, gamma_scope=0.25), t_stop=t_stop, record_masks=True)
    mhw = (16 // cfg.mask.mask_factor,) * 2
    feats = jax.random.normal(jax.random.key(3), (2, 1, 5, 16))
    evals = []
    out = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats, latents,
                             jnp.zeros((2, 1, *mhw)), on_eval=lambda n: evals.append(int(n)))
    jax.effects_barrier()
    assert sum(evals) == unet_evaluations(cfg, steps) * 2 == (3 * 3 + 2 * 3) * 2
    strip = np.asarray(out["mask_steps"])
    for i in range(t_stop, steps):
        assert np.array_equal(strip[i], strip[t_stop - 1])
    k = keep_count(0.25, mhw[0] * mhw[1])
    assert np.all((strip[: t_stop] > 0).reshape(t_stop, 2, -1).sum(-1) == k)
    np.testing.assert_allclose(strip[:t_stop].reshape(t_stop, 2, -1).max(-1), 1.0, rtol=1e-6)
    # same inputs -> same images; a second call with other values does not recompile
    with CompileCounter("dual_branch_sample") as compiles:
        again = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats, latents,
                                   jnp.zeros((2, 1, *mhw)), on_eval=None)
        other = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats * 2, latents + 1,
                                   jnp.zeros((2, 1, *mhw)), on_eval=None)
    assert compiles.count == 1   # on_eval=None is one new static variant; new values reuse it
    assert np.array_equal(np.asarray(again["images"]), np.asarray(out["images"]))
    assert not np.array_equal(np.asarray(other["images"]), np.asarray(out["images"]))


def test_two_subjects_disjoint_masks_and_realcustom_cfg(tiny_sd15):
    kind, pipe, params, unet = tiny_sd15
    ids, neg, wm, latents = _inputs(pipe, words=(("toy", "cat"), ("toy", "cat")))
    smp = cached_sampler(pipe.schedule, "dpm++2m", 3)
    feats = jax.random.normal(jax.random.key(3), (2, 2, 5, 16))
    for multi in ("algorithm1", "overlap"):
        cfg = DualBranchConfig(mask=_mask_cfg(kind, gamma_scope=(0.3, 0.2), multi=multi), cfg="two_scale")
        mhw = (16 // cfg.mask.mask_factor,) * 2
        out = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm, feats, latents,
                                 jnp.zeros((2, 2, *mhw)))
        kept = np.asarray(out["masks"]) > 0
        n = mhw[0] * mhw[1]
        assert tuple(kept[0].reshape(2, -1).sum(-1)) == (keep_count(0.3, n), keep_count(0.2, n))
        if multi == "algorithm1":
            assert np.all(kept.sum(axis=1) <= 1)


def test_masks_at_a_latent_size_that_is_not_a_power_of_two(tiny_sd15):
    """A 360 px image (45 x 45 latents: attention at 45, 23, ...) samples with adaptive masks: the
    layers' grids follow the UNet's ceil halving, and a coarser self-attention layer's product is
    resized back to the mask (was: 'does not tile the latent')."""
    from customjax.guidance.mask import _grid

    assert [_grid(n, (45, 45)) for n in (2025, 529, 144)] == [(45, 45), (23, 23), (12, 12)]
    assert _grid(23 * 19, (45, 37)) == (23, 19)
    with pytest.raises(ValueError, match="does not tile"):
        _grid(500, (45, 45))
    kind, pipe, params, unet = tiny_sd15
    ids, neg, wm, _ = _inputs(pipe)
    latents = jax.random.normal(jax.random.key(7), (2, 45, 37, 4))
    smp = cached_sampler(pipe.schedule, "ddim", 2)
    for self_factors in ((1,), (2,)):
        cfg = DualBranchConfig(mask=MaskConfig(cross_factors=(1, 2), self_factors=self_factors, mask_factor=1),
                               t_stop=1)
        out = dual_branch_sample(pipe, unet, smp, cfg, _visual, params, ids, neg, wm,
                                 jax.random.normal(jax.random.key(3), (2, 1, 5, 16)), latents,
                                 jnp.zeros((2, 1, 45, 37)))
        f = pipe.vae_scale
        assert out["images"].shape == (2, 45 * f, 37 * f, 3) and out["masks"].shape == (2, 1, 45, 37)
        assert np.all(np.isfinite(np.asarray(out["images"])))
        assert int((np.asarray(out["masks"]) > 0).reshape(2, -1).sum(-1)[0]) == keep_count(0.2, 45 * 37)

