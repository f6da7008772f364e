"""The reference encoders at the real patch geometry: patch 14 at 384 / 518 px (27 x 27 and 37 x 37
grids; 384 is not a multiple of 14, so the VALID patch convolution drops the last 6 pixel rows and
columns), against transformers, and RealCustom++'s reference features at that geometry.

Tiny widths (hidden 32-48, 2-3 layers) keep it fast; every hidden state, the last hidden state and
the pooled output are compared in float32 to TOL = 1e-4 absolute (``test_encoders._compare``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

from test_encoders import TOL, _apply, _compare, _pixels, _randomise, _ref, _save  # noqa: E402

from customjax.adapters import features as F  # noqa: E402
from customjax.models.vit import (CLIP_VISION, DINOV2, SIGLIP_VISION, Dinov2Config, Dinov2Model,  # noqa: E402
                                  SiglipVisionConfig, SiglipVisionModel)
from customjax.weights.loaders import load_pretrained, param_shapes  # noqa: E402

assert TOL == 1e-4
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


def _run_torch(model, x_t, **kw):
    with torch.no_grad():
        return model(torch.tensor(x_t), output_hidden_states=True, **kw)


def test_siglip_patch14_384(report, tmp_path_factory):
    """so400m-patch14-384's geometry: 384 px -> 27 x 27 = 729 tokens, the model's own grid (no resize)."""
    torch.manual_seed(0)
    model = _randomise(tr.SiglipVisionModel(tr.SiglipVisionConfig(**SMALL, intermediate_size=64, image_size=384)))
    module, params, config = load_pretrained(_save(model, tmp_path_factory, "siglip384"), SIGLIP_VISION)
    x_t, x = _pixels(384, 384)
    out = _run_torch(model, x_t)
    ours = _apply(module, params, x)
    assert ours.last_hidden_state.shape == (2, 729, 32)
    _compare(report, "siglip patch14 384px", ours, _ref(out))


@pytest.fixture(scope="module")
def dino_518(tmp_path_factory):
    """name -> (torch model, load_pretrained result): DINOv2 at image_size 518 (37 x 37), with and
    without registers."""
    out = {}
    for name, cls, cfg_cls, kw in (("reg4", tr.Dinov2WithRegistersModel, tr.Dinov2WithRegistersConfig,
                                    dict(num_register_tokens=4)),
                                   ("plain", tr.Dinov2Model, tr.Dinov2Config, {})):
        torch.manual_seed(0)
        model = _randomise(cls(cfg_cls(**SMALL, image_size=518, layerscale_value=0.5, **kw)))
        out[name] = model, load_pretrained(_save(model, tmp_path_factory, f"dino518_{name}"), DINOV2)
    return out


# reg4 518: its own grid; reg4 384: 37 x 37 -> 27 x 27, bicubic with antialias (Dinov2WithRegisters);
# plain 384: the same resize without antialias (Dinov2Model).
@pytest.mark.parametrize("name,size", [("reg4", 518), ("reg4", 384), ("plain", 384)])
def test_dinov2_patch14(dino_518, name, size, report):
    model, (module, params, config) = dino_518[name]
    assert config.image_size == 518 and config.interpolate_antialias == (name == "reg4")
    x_t, x = _pixels(size, size)
    ours = _apply(module, params, x)
    prefix = 1 + config.num_register_tokens
    assert ours.last_hidden_state.shape == (2, prefix + (size // 14) ** 2, 32)
    _compare(report, f"dinov2 {name} image 518 at {size}px", ours, _ref(_run_torch(model, x_t)))


@pytest.fixture(scope="module")
def clip_patch14(tmp_path_factory):
    """image_size -> (torch model, load_pretrained result): CLIP ViT-L/14 (224) and -L/14-336 geometry."""
    out = {}
    for image_size in (224, 336):
        torch.manual_seed(0)
        cfg = tr.CLIPVisionConfig(**SMALL, intermediate_size=64, image_size=image_size, projection_dim=24)
        model = _randomise(tr.CLIPVisionModelWithProjection(cfg))
        out[image_size] = model, load_pretrained(_save(model, tmp_path_factory, f"clip{image_size}"), CLIP_VISION)
    return out


# Own size (16 x 16 and 24 x 24 grids), and 384 px (27 x 27, not a multiple of 14) by interpolation.
@pytest.mark.parametrize("image_size,size", [(224, 224), (336, 336), (224, 384), (336, 384)])
def test_clip_vision_patch14(clip_patch14, image_size, size, report):
    model, (module, params, _) = clip_patch14[image_size]
    interp = size != image_size
    x_t, x = _pixels(size, size)
    with torch.no_grad():
        out = model.vision_model(torch.tensor(x_t), interpolate_pos_encoding=interp, output_hidden_states=True)
        embeds = model(torch.tensor(x_t), interpolate_pos_encoding=interp).image_embeds
    ours = _apply(module, params, x, interpolate_pos_encoding=interp)
    assert ours.last_hidden_state.shape == (2, 1 + (size // 14) ** 2, 32)
    _compare(report, f"clip_vision image {image_size} at {size}px", ours, _ref(out, image_embeds=embeds))
    if not interp:   # another grid needs the flag, as in transformers
        with pytest.raises(ValueError, match="27x27 patch grid.*interpolate_pos_encoding"):
            _apply(module, params, _pixels(384, 384)[1])


# ----------------------------------------------------------------------------------------------
# The reference features at the real geometry


def _random_params(module, size, seed):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32)
                                               for s in leaves])


@pytest.mark.parametrize("public", [False, True])
def test_reference_features_patch14_384(public):
    """SigLIP (image 384) + DINOv2 with 4 registers (image 518, resized to 27 x 27) on 384 px views, the
    high view 768 px (scale 2): deep (B, 729, c0), shallow (B, 3 * 729, c0), high (B, 4 * 729, c0)."""
    sm = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                              num_attention_heads=2, image_size=384, patch_size=14))
    dm = Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                                  image_size=518, patch_size=14, num_register_tokens=4, interpolate_antialias=True))
    params = {"siglip": _random_params(sm, 384, 1), "dino": _random_params(dm, 518, 2)}
    deep = (1, 1) if public else (None, None)
    encoders = (F.Encoder("siglip", sm, F.SIGLIP_MEAN, F.SIGLIP_STD, (0, 1, 2), deep[0]),
                F.Encoder("dino", dm, F.IMAGENET_MEAN, F.IMAGENET_STD, (0, 1, 2), deep[1]))
    cfg = F.PUBLIC_FEATURES if public else F.FeatureConfig()
    assert (cfg.image_size, cfg.scale) == (384, 2)
    images = np.random.default_rng(3).uniform(size=(2, 500, 500, 3)).astype(np.float32)
    n, c0 = 729, 16 + 8

    @jax.jit
    def run(im):   # the features, and the global view encoded directly
        glob, _ = F.reference_views(im, cfg)
        so = sm.apply({"params": params["siglip"]}, F.normalize(glob, F.SIGLIP_MEAN, F.SIGLIP_STD))
        do = dm.apply({"params": params["dino"]}, F.normalize(glob, F.IMAGENET_MEAN, F.IMAGENET_STD))
        return F.reference_features(im, encoders, params, cfg), so, do

    out, so, do = run(images)
    assert out.deep.shape == (2, n, c0) and out.shallow.shape == (2, 3 * n, c0) and out.high.shape == (2, 4 * n, c0)
    assert do.last_hidden_state.shape == (2, 1 + 4 + n, 8)       # CLS + 4 registers dropped
    s_deep = so.hidden_states[2] if public else so.last_hidden_state
    d_deep = do.hidden_states[2] if public else do.last_hidden_state
    np.testing.assert_allclose(out.deep[..., :16], s_deep, atol=1e-5)
    np.testing.assert_allclose(out.deep[..., 16:], d_deep[:, 5:], atol=1e-5)
    np.testing.assert_allclose(out.shallow[:, 2 * n:, :16], so.hidden_states[3], atol=1e-5)   # block 2
    np.testing.assert_allclose(out.shallow[:, n:2 * n, 16:], do.hidden_states[2][:, 5:], atol=1e-5)   # block 1
    assert np.isfinite(np.asarray(out.high)).all()


def test_reference_features_full_size_shapes():
    """The released encoders' sizes (SigLIP so400m-patch14-384, DINOv2-L/14 reg4 at 518) trace to
    c0 = 1152 + 1024 = 2176 channels on 729 tokens (shapes only: nothing is computed)."""
    sc = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14)
    dc = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14,
                      num_register_tokens=4, interpolate_antialias=True)
    encoders = (F.Encoder("siglip", SiglipVisionModel(sc), F.SIGLIP_MEAN, F.SIGLIP_STD, (7, 13, 19), 25),
                F.Encoder("dino", Dinov2Model(dc), F.IMAGENET_MEAN, F.IMAGENET_STD, (4, 10, 16), 22))
    params = {"siglip": param_shapes(SIGLIP_VISION, sc), "dino": param_shapes(DINOV2, dc)}
    images = jax.ShapeDtypeStruct((1, 768, 768, 3), jnp.float32)
    out = jax.eval_shape(lambda im, p: F.reference_features(im, encoders, p, F.PUBLIC_FEATURES), images, params)
    assert out.deep.shape == (1, 729, 2176) and out.shallow.shape == (1, 3 * 729, 2176)
    assert out.high.shape == (1, 4 * 729, 2176)
