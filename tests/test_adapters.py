"""Image-side adapters: RealCustom's adaptive scoring (seed 003 Eqs. 5-10), RealCustom++'s
cross-layer cross-scale projector (seed 004 Eqs. 5-9), its SigLIP + DINOv2 features, and the public
RealCustom++ checkpoint layout (synthetic tensors at tiny sizes under the public key names)."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import max_abs
from customjax.adapters import features as F
from customjax.adapters.ccp import (PUBLIC_CCP, TABLE_VIII, CCPConfig, CrossLayerCrossScaleProjector)
from customjax.adapters.public_checkpoint import (PROJECTOR_PREFIX, PublicCheckpointError, export_public,
                                                  load_public_checkpoint, public_key_shapes, read_checkpoint,
                                                  save_public, vision_params)
from customjax.adapters.scoring import (AdaptiveScoring, ScoringConfig, num_kept, sample_gamma, to_extra_tokens,
                                        top_k_mask)
from customjax.control.params import merge
from customjax.control.spec import ControlConfig, ExtraKV
from customjax.models.unet import UNet2DConditionModel, dummy_inputs
from customjax.models.vit import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
from customjax.weights.convert import WeightMismatchError
from customjax.weights.safetensors_io import save_file
from customjax.zoo import TINY


def _rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _random_tree(shapes, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


# ----------------------------------------------------------------------------------------------
# Adaptive scoring module

B, NI, CI, NT, CT, HW, CZ = 3, 10, 8, 5, 6, 4, 4


@pytest.fixture(scope="module")
def scoring_inputs():
    return (_rand(B, NI, CI, seed=1), _rand(B, NT, CT, seed=2), _rand(B, HW, HW, CZ, seed=3),
            jnp.array([0.1, 0.5, 0.9]))


@pytest.fixture(scope="module")
def scoring_params():
    model = AdaptiveScoring(ScoringConfig(hidden=12))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, NI, CI)), jnp.zeros((1, NT, CT)),
                                               jnp.zeros((1, HW, HW, CZ)), 0.5))["params"]
    return _random_tree(shapes, seed=4, scale=0.5)


def _score(cfg, params, inputs, gamma=0.8, **kw):
    return AdaptiveScoring(cfg).apply({"params": params}, *inputs, gamma, **kw)


def test_scoring_keeps_exact_count_and_rescales(scoring_inputs, scoring_params):
    cfg = ScoringConfig(hidden=12)
    run = jax.jit(lambda g: _score(cfg, scoring_params, scoring_inputs, g))
    for g in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0):
        out = run(g)
        assert out.keep.shape == (B, NI) and out.keep.dtype == jnp.bool_
        np.testing.assert_array_equal(out.keep.sum(axis=1), [math.floor(g * NI)] * B)
    out = run(0.6)
    s = np.asarray(out.scores)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, rtol=1e-5)                                  # S = softmax(S)
    np.testing.assert_allclose(out.features, scoring_inputs[0] * (1 + s[..., None]), rtol=1e-6)  # Eq. 9
    keep = np.asarray(out.keep)
    for b in range(B):   # the kept tokens are the highest-scored ones
        assert s[b][keep[b]].min() >= s[b][~keep[b]].max()
    # ties go to the lower index, and every count is exact
    tied = top_k_mask(jnp.zeros((2, 5)), jnp.array([2, 4]))
    np.testing.assert_array_equal(tied, [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert num_kept(0.7, 10, 1)[0] == 7 and num_kept(0.29, 729, 1)[0] == math.floor(0.29 * 729)
    tokens = to_extra_tokens(out)
    assert tokens.tokens.shape == (B, 1, NI, CI) and tokens.token_mask.shape == (B, 1, NI)


def test_scoring_traced_per_example_gamma_under_jit(scoring_inputs, scoring_params):
    model = AdaptiveScoring(ScoringConfig(hidden=12))
    run = jax.jit(lambda p, x, g: model.apply({"params": p}, *x, g).keep.sum(axis=1))
    np.testing.assert_array_equal(run(scoring_params, scoring_inputs, jnp.array([0.3, 0.55, 1.0])), [3, 5, 10])
    np.testing.assert_array_equal(run(scoring_params, scoring_inputs, jnp.array([0.8, 0.41, 0.0])), [8, 4, 0])
    g = sample_gamma(jax.random.key(1), 1000)
    assert g.shape == (1000,) and 0.3 <= float(g.min()) and float(g.max()) <= 1.0
    counts = jax.jit(lambda p, x, k: model.apply({"params": p}, *x, sample_gamma(k, B)).keep.sum(axis=1))(
        scoring_params, scoring_inputs, jax.random.key(2))
    assert all(3 <= c <= 10 for c in np.asarray(counts))


def test_scoring_fusion_rows(scoring_inputs, scoring_params):
    """Table 3 rows: which scores exist and how they fuse (Eq. 8)."""
    f, txt, z, sab = scoring_inputs
    only = lambda name: {k: v for k, v in scoring_params.items() if k.startswith(name)}

    @jax.jit
    def run(p):
        cfg = ScoringConfig(hidden=12)
        return (_score(cfg, p, scoring_inputs), _score(ScoringConfig("mean", hidden=12), p, scoring_inputs),
                _score(ScoringConfig("text", hidden=12), only("text"), scoring_inputs),
                _score(ScoringConfig("visual", hidden=12), only("visual"), scoring_inputs),
                *(_score(cfg, p, (f, txt, z, jnp.full((B,), w0))) for w0 in (0.0, 1.0)))

    full, mean, text, visual, at0, at1 = run(scoring_params)
    st, sv = np.asarray(full.text_scores), np.asarray(full.visual_scores)
    w = np.asarray(sab)[:, None]
    close = lambda out, logits: np.testing.assert_allclose(out.scores, jax.nn.softmax(logits, axis=-1),
                                                           rtol=1e-5, atol=1e-7)
    close(full, (1 - w) * st + w * sv)
    close(mean, 0.5 * (st + sv))
    close(text, st)
    close(visual, sv)
    assert text.visual_scores is None and visual.text_scores is None
    close(at0, st)      # the schedule is all text at sqrt(abar) = 0 and all visual at 1
    close(at1, sv)
    for fusion in ("text", "visual"):   # a one-score row has only that score's parameters
        model = AdaptiveScoring(ScoringConfig(fusion, hidden=12))
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), f, txt, z, sab))["params"]
        assert set(shapes) == {f"{fusion}_pool", f"{fusion}_score"}
    with pytest.raises(ValueError, match="fusion"):
        ScoringConfig("sum")


def test_scoring_guidance_mask_multiplies_latents(scoring_inputs, scoring_params):
    f, txt, z, sab = scoring_inputs
    zero = jnp.zeros((B, HW, HW))
    half = jnp.broadcast_to(jnp.arange(HW) < 2, (B, HW, HW)).astype(jnp.float32)

    @jax.jit
    def run(p):
        s = lambda x=scoring_inputs, **kw: _score(ScoringConfig(hidden=12), p, x, **kw).scores
        return (s(mask=jnp.ones((B, 8, 8))), s(),                                # an 8x8 mask is resized to 4x4
                s(mask=zero), s((f, txt, 5 * z + 1, sab), mask=zero),            # no latent reaches the score
                s(mask=half), s((f, txt, z * half[..., None], sab)))             # the mask multiplies z_t

    for a, b in zip(*[iter(run(scoring_params))] * 2):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Cross-layer cross-scale projector

C0, COUT, N = 24, 48, 4
TINY_CCP = dict(vision_dim=C0, out_dim=COUT, dim_head=8)
PUB = CCPConfig(**{**vars(PUBLIC_CCP), **TINY_CCP})


def _ccp_inputs(seed=5, L=3):
    return _rand(2, N, C0, seed=seed), _rand(2, L * N, C0, seed=seed + 1), _rand(2, 4 * N, C0, seed=seed + 2)


def _ccp_shapes(cfg):
    d, s, h = _ccp_inputs()
    return jax.eval_shape(lambda: CrossLayerCrossScaleProjector(cfg).init(jax.random.key(0), d, s, h))["params"]


def test_ccp_output_shapes_for_every_switch():
    d, s, h = _ccp_inputs()
    rows = {**{k: CCPConfig(**{**vars(v), **TINY_CCP}) for k, v in TABLE_VIII.items()},
            "public": CCPConfig(**{**vars(PUBLIC_CCP), **TINY_CCP})}
    rows.update({c: CCPConfig(combine=c, **TINY_CCP) for c in
                 ("layer_concat_scale_concat", "layer_add_scale_concat")})
    want = {"mlp": N, "cross_layer": 2 * N, "ccp": 2 * N, "public": N,
            "layer_concat_scale_concat": 3 * N, "layer_add_scale_concat": 2 * N}
    for name, cfg in rows.items():
        model = CrossLayerCrossScaleProjector(cfg)
        out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), d, s, h))
        assert out.tokens.shape == (2, want[name], COUT) == (2, cfg.num_tokens(N), COUT), name
        names = set(variables["params"])
        assert ("min_attention2" in names) == cfg.cross_layer and ("min_attention" in names) == cfg.cross_scale
        if name == "public":
            assert names == {"min_attention", "projector_0", "projector_2", "projector_4", "projector_5",
                             "projector_base"}
    scaled = _ccp_shapes(CCPConfig(**{**vars(PUB), "adaptive_scale": True}))
    keys = public_key_shapes({"a": {"to_k_vision": {"kernel": np.zeros((2, 3))}}}, scaled)
    assert keys[PROJECTOR_PREFIX + "scale_value.value"] == ("projector/scale_value/value", ())
    assert keys[PROJECTOR_PREFIX + "projector.0.weight"] == ("projector/projector_0/kernel", (4 * C0, C0))
    assert keys["a.to_k_vision.weight"] == ("unet/a/to_k_vision/kernel", (3, 2))
    with pytest.raises(ValueError, match="shallow"):
        jax.eval_shape(lambda: CrossLayerCrossScaleProjector(CCPConfig(**TINY_CCP)).init(jax.random.key(0), d, None, h))
    with pytest.raises(ValueError, match="multiple of dim_head"):
        CCPConfig(vision_dim=30, dim_head=8)


def test_ccp_eq9_structure():
    """f_ci = [f_shallow' ; MLP(f_deep) + f_high'], and with the cross-scale MLP's last layer
    zeroed (f_high' = 0) the second half is MLP(f_deep) alone."""
    cfg = CCPConfig(**TINY_CCP)
    model = CrossLayerCrossScaleProjector(cfg)
    d, s, h = _ccp_inputs()
    params = _random_tree(_ccp_shapes(cfg), seed=6)
    zeroed = jax.tree_util.tree_map(lambda x: x, params)
    zeroed["projector_4"] = jax.tree_util.tree_map(np.zeros_like, params["projector_4"])
    zeroed["projector_5"] = dict(params["projector_5"], bias=np.zeros_like(params["projector_5"]["bias"]))
    combos = ("layer_concat_scale_concat", "layer_add_scale_concat")

    @jax.jit
    def run(params, zeroed):
        other = [CrossLayerCrossScaleProjector(CCPConfig(combine=c, **TINY_CCP)).apply({"params": params}, d, s, h)
                 for c in combos]
        return (model.apply({"params": params}, d, s, h), model.apply({"params": zeroed}, d, s, h),
                model.apply({"params": zeroed}, d, s, 3 * h + 1), other)

    out, z, moved, other = run(params, zeroed)
    np.testing.assert_allclose(out.tokens[:, :N], out.shallow, rtol=1e-6)
    np.testing.assert_allclose(out.tokens[:, N:], out.deep + out.high, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(z.high, 0.0)
    np.testing.assert_allclose(z.tokens[:, N:], out.deep, rtol=1e-6)
    np.testing.assert_allclose(z.tokens[:, :N], out.shallow, rtol=1e-6)
    # the high-resolution features only enter through the cross-scale path
    np.testing.assert_allclose(moved.tokens, z.tokens, rtol=1e-6)
    # the other Table IX combinations
    for o, expect in zip(other, ([out.shallow, out.deep, out.high], [out.deep + out.shallow, out.high])):
        np.testing.assert_allclose(o.tokens, np.concatenate(expect, axis=1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# SigLIP + DINOv2 features (tiny encoders)

VIEW = 28       # patch 14 -> 2 x 2 = 4 tokens per view


@pytest.fixture(scope="module")
def encoders():
    sc = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                            image_size=VIEW, patch_size=14, vision_use_head=False)
    dc = Dinov2Config(hidden_size=8, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=VIEW,
                      patch_size=14, num_register_tokens=2, interpolate_antialias=True)
    sm, dm = SiglipVisionModel(sc), Dinov2Model(dc)
    x = jnp.zeros((1, VIEW, VIEW, 3))
    sp = _random_tree(jax.eval_shape(lambda: sm.init(jax.random.key(0), x))["params"], seed=7)
    dp = _random_tree(jax.eval_shape(lambda: dm.init(jax.random.key(0), x))["params"], seed=8)
    return dict(siglip=sm, siglip_params=sp, dino=dm, dino_params=dp)


def _pair(e, siglip_shallow=(), dino_shallow=(), siglip_deep=None, dino_deep=None):
    """(encoders, params) for reference_features: the tiny SigLIP + DINOv2."""
    return ((F.Encoder("siglip", e["siglip"], F.SIGLIP_MEAN, F.SIGLIP_STD, siglip_shallow, siglip_deep),
             F.Encoder("dino", e["dino"], F.IMAGENET_MEAN, F.IMAGENET_STD, dino_shallow, dino_deep)),
            {"siglip": e["siglip_params"], "dino": e["dino_params"]})


def test_features_token_counts_and_channels(encoders):
    cfg = F.FeatureConfig(image_size=VIEW)
    pair = _pair(encoders, (0, 2), (1, 2))
    images = np.random.default_rng(9).uniform(size=(2, 40, 40, 3)).astype(np.float32)
    n, c0 = 4, 16 + 8

    @jax.jit
    def run(im):   # the features, and by hand: the views encoded directly
        glob, views = F.reference_views(im, cfg)
        x = jnp.concatenate([glob, views[:, 3]])
        so = encoders["siglip"].apply({"params": encoders["siglip_params"]},
                                      F.normalize(x, F.SIGLIP_MEAN, F.SIGLIP_STD))
        do = encoders["dino"].apply({"params": encoders["dino_params"]},
                                    F.normalize(x, F.IMAGENET_MEAN, F.IMAGENET_STD))
        return F.reference_features(im, *pair, cfg), views, F.resize_images(im, 2 * VIEW), so, do

    out, views, big, so, do = run(images)
    assert out.deep.shape == (2, n, c0) and out.shallow.shape == (2, 2 * n, c0) and out.high.shape == (2, 4 * n, c0)
    assert do.last_hidden_state.shape[1] == 1 + 2 + n           # DINOv2's CLS + 2 registers are dropped
    np.testing.assert_allclose(out.deep[..., :16], so.last_hidden_state[:2], atol=1e-5)
    np.testing.assert_allclose(out.deep[..., 16:], do.last_hidden_state[:2, 3:], atol=1e-5)
    np.testing.assert_allclose(out.shallow[:, n:2 * n, :16], so.hidden_states[3][:2], atol=1e-5)   # block 2
    np.testing.assert_allclose(out.shallow[:, :n, 16:], do.hidden_states[2][:2, 3:], atol=1e-5)    # block 1
    np.testing.assert_allclose(out.high[:, 3 * n:, :16], so.last_hidden_state[2:], atol=1e-5)      # crop 3
    np.testing.assert_allclose(out.high[:, 3 * n:, 16:], do.last_hidden_state[2:, 3:], atol=1e-5)
    # the crops tile the high-resolution view
    np.testing.assert_array_equal(views[:, 1], big[:, :VIEW, VIEW:])
    np.testing.assert_array_equal(views[:, 2], big[:, VIEW:, :VIEW])
    # no high-resolution pass when it is not wanted
    lite = jax.eval_shape(lambda im: F.reference_features(im, *pair, cfg, high=False, shallow=False), images)
    assert lite.high is None and lite.shallow is None and lite.deep.shape == (2, n, c0)
    with pytest.raises(ValueError, match="block 4 does not exist"):
        F.reference_features(images, *_pair(encoders, (4,), (0,)), cfg)
    with pytest.raises(ValueError, match="same number of layers"):
        F.reference_features(images, *_pair(encoders, (0, 1), (0,)), cfg)
    # one encoder alone: its own channels only
    alone = jax.eval_shape(lambda im: F.reference_features(im, pair[0][1:], pair[1], cfg), images)
    assert alone.deep.shape == (2, n, 8) and alone.shallow.shape == (2, 2 * n, 8) and alone.high.shape == (2, 4 * n, 8)


def test_features_public_views(encoders):
    cfg = F.FeatureConfig(**{**vars(F.PUBLIC_FEATURES), "image_size": VIEW})
    pair = _pair(encoders, (1,), (1,), 2, 2)
    images = np.random.default_rng(10).uniform(size=(1, 50, 50, 3)).astype(np.float32)

    @jax.jit
    def run(im):
        glob, views = F.reference_views(im, cfg)
        x = F.normalize(jnp.concatenate([glob, views[:, 1]]), F.SIGLIP_MEAN, F.SIGLIP_STD)
        so = encoders["siglip"].apply({"params": encoders["siglip_params"]}, x)
        return F.reference_features(im, *pair, cfg), views, F.resize_images(im, 2 * VIEW, "bilinear"), so

    out, views, big, so = run(images)
    for hp in range(2):
        for wp in range(2):
            np.testing.assert_allclose(views[:, 2 * hp + wp], np.floor(big[:, hp::2, wp::2] * 255) / 255, atol=1e-6)
    assert out.deep.shape == (1, 4, 24) and out.high.shape == (1, 16, 24)
    np.testing.assert_allclose(out.deep[..., :16], so.hidden_states[3][:1], atol=1e-5)   # block 2, no final norm
    np.testing.assert_allclose(out.high[:, 1::4, :16], so.hidden_states[3][1:], atol=1e-5)  # tokens ordered (l hp wp)


def test_one_clip_encoder_keeps_clip_normalisation_with_public_views():
    """ShapeWorld's one CLIP image encoder, with the released code's views: normalised with CLIP's
    mean / std (not SigLIP's), its features alone."""
    import importlib.util
    from pathlib import Path

    from customjax.methods.build import build
    from customjax.models.vit import CLIP_MEAN, CLIP_STD

    spec = importlib.util.spec_from_file_location("cfg", Path(__file__).resolve().parents[1] / "configs/realcustompp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config("tiny")
    cfg.encoders.kind, cfg.encoders.public = "clip", True
    built = build(cfg)
    side = built.image_side
    (enc,) = side.encoders
    assert enc.name == "clip" and set(built.params["image"]) == {"clip", "ccp"}
    assert side.features.split == "polyphase" and side.features.quantize
    images = np.random.default_rng(13).uniform(size=(1, 40, 40, 3)).astype(np.float32)
    f = F.reference_features(images, side.encoders, built.params["image"], side.features, shallow=False, high=False)
    glob, _ = F.reference_views(images, side.features)
    want = enc.module.apply({"params": built.params["image"]["clip"]}, F.normalize(glob, CLIP_MEAN, CLIP_STD))
    np.testing.assert_allclose(f.deep, want.last_hidden_state[:, 1:], atol=1e-5)   # CLS dropped


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(11).uniform(size=(1, 9, 13, 3)).astype(np.float32)
    for method, ac in (("bilinear", False), ("bilinear_align_corners", True)):
        for size in (6, 20):
            want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size),
                                                   mode="bilinear", align_corners=ac).permute(0, 2, 3, 1).numpy()
            assert max_abs(F.resize_images(jnp.asarray(x), size, method), want) < 1e-5


# ----------------------------------------------------------------------------------------------
# The public RealCustom++ checkpoint

UNET_CFG = TINY["sdxl"]["unet"]
# The tiny SDXL UNet's cross-attention layers as the public checkpoint names them (8 here, 70 in SDXL).
ATTN2 = ([f"down_blocks.1.attentions.0.transformer_blocks.{i}.attn2" for i in range(2)]
         + [f"mid_block.attentions.0.transformer_blocks.{i}.attn2" for i in range(2)]
         + [f"up_blocks.0.attentions.{a}.transformer_blocks.{i}.attn2" for a in range(2) for i in range(2)])


def _public_state(seed=12) -> dict:
    """Random tensors under the public names and PyTorch shapes (inner 64, vision tokens of 48)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    st = {f"{a}.to_{p}_vision.weight": r(64, COUT) for a in ATTN2 for p in "kv"}
    proj = {"min_attention.norm1.weight": r(C0), "min_attention.norm1.bias": r(C0),
            "min_attention.norm2.weight": r(C0), "min_attention.norm2.bias": r(C0),
            **{f"min_attention.to_{p}.weight": r(C0, C0) for p in "qkv"},
            "projector.0.weight": r(4 * C0, C0), "projector.0.bias": r(4 * C0),
            "projector.2.weight": r(COUT, 4 * C0), "projector.2.bias": r(COUT),
            "projector.4.weight": r(COUT, COUT), "projector.4.bias": r(COUT),
            "projector.5.weight": r(COUT), "projector.5.bias": r(COUT),
            "projector_base.weight": r(COUT, C0), "projector_base.bias": r(COUT)}
    st.update({PROJECTOR_PREFIX + k: v for k, v in proj.items()})
    return st


@pytest.fixture(scope="module")
def targets():
    unet = UNet2DConditionModel(UNET_CFG, control=ControlConfig(extra_kv=(ExtraKV("vision", COUT),)))
    shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(UNET_CFG)))["params"]
    return shapes, _ccp_shapes(PUB)


def test_public_checkpoint_loads_strictly_and_round_trips(targets, tmp_path):
    unet_t, proj_t = targets
    state = _public_state()
    path = tmp_path / "realcustom.safetensors"
    save_file(state, path)
    unet, proj = load_public_checkpoint(path, unet_target=unet_t, projector_target=proj_t)
    assert len(_flat(unet)) == 2 * len(ATTN2) == 16 and len(_flat(proj)) == len(state) - 16
    k = unet["up_blocks_0"]["attentions_1"]["transformer_blocks_0"]["attn2"]["to_v_vision"]["kernel"]
    np.testing.assert_array_equal(k, state["up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v_vision.weight"].T)
    np.testing.assert_array_equal(proj["projector_2"]["kernel"], state[PROJECTOR_PREFIX + "projector.2.weight"].T)
    np.testing.assert_array_equal(proj["min_attention"]["norm2"]["scale"],
                                  state[PROJECTOR_PREFIX + "min_attention.norm2.weight"])
    # export: the same keys and values
    back = export_public(unet, proj)
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])
    # merged with the base UNet's parameters, every parameter of the controlled UNet is there
    base = {k: v for k, v in _flat(_random_tree(unet_t, seed=13)).items()
            if "to_k_vision" not in k and "to_v_vision" not in k}
    full = merge(traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in base.items()}), unet)
    assert set(_flat(full)) == set(_flat(unet_t))
    # a file written by save_public reads back identically
    again = load_public_checkpoint(save_public(tmp_path / "again.safetensors", unet, proj),
                                   unet_target=unet_t, projector_target=proj_t)
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(again), leaves((unet, proj))))


def test_public_checkpoint_errors_name_the_keys(targets):
    unet_t, proj_t = targets
    load = lambda st, **kw: load_public_checkpoint(st, unet_target=unet_t, projector_target=proj_t, **kw)
    missing_key = PROJECTOR_PREFIX + "projector.4.bias"
    st = _public_state()
    del st[missing_key]
    with pytest.raises(PublicCheckpointError, match="missing: " + repr(missing_key).replace(".", r"\.")) as e:
        load(st)
    assert isinstance(e.value, WeightMismatchError) and e.value.missing == [missing_key]
    st = dict(_public_state())
    st["mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(PublicCheckpointError, match="unexpected: 'mid_block.*to_out.0.weight'.*\n.*include_base=True"):
        load(st)
    st = _public_state()
    bad = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k_vision.weight"
    st[bad] = np.zeros((COUT, 64), np.float32)
    with pytest.raises(PublicCheckpointError, match=r"wrong shape: '.*transformer_blocks\.1\.attn2\.to_k_vision"
                                                    r"\.weight' -> parameter unet/down_blocks_1/.*expected \(64, 48\)"):
        load(st)
    # a rename hook fixes a prefixed file
    st = {"module." + k: v for k, v in _public_state().items()}
    with pytest.raises(PublicCheckpointError):
        load(st)
    load(st, rename=lambda k: k.removeprefix("module."))
    with pytest.raises(ValueError, match="no to_k_vision"):
        load_public_checkpoint(_public_state(), unet_target={"conv_in": {}}, projector_target=proj_t)


def test_public_checkpoint_torch_pickle_and_full_unet(targets, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    unet_t, proj_t = targets
    full = _random_tree(unet_t, seed=14)
    proj = _random_tree(proj_t, seed=15)
    state = export_public(full, proj, include_base=True)
    assert len(state) == len(_flat(full)) + len(_flat(proj))
    path = tmp_path / "full.pth"
    torch.save({k: torch.from_numpy(v.copy()).to(torch.bfloat16 if "to_k_vision" in k else torch.float32)
                for k, v in state.items()}, path)
    unet, _ = load_public_checkpoint(path, unet_target=unet_t, projector_target=proj_t, include_base=True)
    assert set(_flat(unet)) == set(_flat(unet_t))
    np.testing.assert_array_equal(unet["conv_in"]["kernel"], full["conv_in"]["kernel"])
    vis = _flat(vision_params(unet))
    assert all("_vision/" in k for k in vis) and len(vis) == 16
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        read_checkpoint(path)


def test_public_projector_matches_a_torch_module_of_the_public_structure(tmp_path):
    """Our PUBLIC_CCP against a PyTorch module of the released projector's structure, loading our
    export with load_state_dict(strict=True): the key names and the numbers agree."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attn(nn.Module):
        def __init__(self, dim, dim_head):
            super().__init__()
            self.heads, self.dh = dim // dim_head, dim_head
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))

        def forward(self, context, queries):
            b = queries.shape[0]
            q = self.to_q(self.norm1(queries))
            kv = self.norm2(context)
            split = lambda t: t.view(b, -1, self.heads, self.dh).transpose(1, 2)
            o = nn.functional.scaled_dot_product_attention(split(q), split(self.to_k(kv)), split(self.to_v(kv)))
            return o.transpose(1, 2).reshape(b, -1, self.heads * self.dh)

    class Proj(nn.Module):
        def __init__(self, dim, out, dim_head):
            super().__init__()
            self.min_attention = Attn(dim, dim_head)
            self.projector = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, out), nn.GELU(),
                                           nn.Linear(out, out), nn.LayerNorm(out))
            self.projector_base = nn.Linear(dim, out)

        def forward(self, deep, high):
            return self.projector_base(deep) + self.projector(self.min_attention(high, deep))

    params = _random_tree(_ccp_shapes(PUB), seed=16)
    state = export_public({"attn2": {"to_k_vision": {"kernel": np.zeros((1, 1))}}}, params)
    ref = Proj(C0, COUT, 8)
    ref.load_state_dict({k[len(PROJECTOR_PREFIX):]: torch.from_numpy(v) for k, v in state.items()
                         if k.startswith(PROJECTOR_PREFIX)}, strict=True)
    d, _, h = _ccp_inputs(seed=17)
    want = ref(torch.from_numpy(d), torch.from_numpy(h)).detach().numpy()
    got = CrossLayerCrossScaleProjector(PUB).apply({"params": params}, d, None, h).tokens
    assert max_abs(got, want) < 1e-4
