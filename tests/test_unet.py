"""UNet2DConditionModel parity with diffusers on tiny random SD-1.5-, SD-2- and SDXL-like configs,
loaded from folders written by ``save_pretrained``, at latent sizes that are and are not multiples
of 2**(blocks - 1); the clear errors for NCHW latents and diffusers' keyword names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import torch.nn.functional as F
from conftest import max_abs
from customjax.control.spec import Control
from customjax.models.blocks import nearest_resize
from customjax.models.unet import UNET
from customjax.weights.loaders import load_pretrained

TOL = 1e-4

CONFIGS = {
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD-1.5's layout (conv projections, cross-attention in all but the last down block) with 3
    # blocks, so two up-samplers resize to odd skip sizes.
    "sd15_3": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                   cross_attention_dim=32, attention_head_dim=4,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=48, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                 cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturbs every parameter so that norms, biases and zero-initialised layers all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


_BUILT = {}


def _pair(name, tmp_path_factory):
    """(name, torch reference, our module, params, config), built once per config."""
    if name not in _BUILT:
        torch.manual_seed(0)
        ref = TorchUNet(sample_size=8, in_channels=4, out_channels=4, **CONFIGS[name]).eval()
        randomize(ref)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        module, params, config = load_pretrained(folder, UNET)
        _BUILT[name] = name, ref, module, params, config
    return _BUILT[name]


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """The SDXL-like config: several transformer layers per block, so per-layer offsets and remat
    of nested blocks are exercised."""
    return _pair("sdxl", tmp_path_factory)


def inputs(config, batch=2, size=8, text_len=7, seed=1):
    """(latents NHWC, timesteps, text, SDXL keywords); ``size`` a side or (H, W)."""
    rng = np.random.default_rng(seed)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = rng.standard_normal((batch, *hw, 4)).astype(np.float32)
    t = np.array([10.0, 937.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, text_len, config.cross_attention_dim[0])).astype(np.float32)
    extra = {}
    if config.addition_embed_type == "text_time":
        pool = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = dict(text_embeds=rng.standard_normal((batch, pool)).astype(np.float32),
                     time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1)))
    return x, t, ctx, extra


def reference(ref, x, t, ctx, extra):
    """diffusers' output for our NHWC inputs, as NHWC."""
    with torch.no_grad():
        added = {k: torch.from_numpy(v) for k, v in extra.items()} or None
        return ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                   added_cond_kwargs=added).sample.permute(0, 2, 3, 1).numpy()


def test_unet_parity(pair, report):
    name, ref, module, params, config = pair
    x, t, ctx, extra = inputs(config)
    want = reference(ref, x, t, ctx, extra)
    got = jax.jit(module.apply)({"params": params}, x, t, ctx, **extra)
    report(f"unet {name}", max_abs(got, want), TOL)
    assert np.std(want) > 0.1  # the comparison is not between near-zero outputs


@pytest.mark.parametrize("name", ["sd15_3", "sdxl"])
@pytest.mark.parametrize("hw", [(45, 45), (45, 37), (13, 20)])
def test_unet_parity_any_latent_size(name, hw, tmp_path_factory, report):
    """Sides that are not multiples of 4 (3 blocks; a 360 px image gives 45 x 45): the down path
    gives ceil sizes, each up-sampler resizes to its skip's size (diffusers' ``upsample_size``)."""
    _, ref, module, params, config = _pair(name, tmp_path_factory)
    x, t, ctx, extra = inputs(config, size=hw)
    want = reference(ref, x, t, ctx, extra)
    got = jax.jit(module.apply)({"params": params}, x, t, ctx, **extra)
    assert got.shape == x.shape
    report(f"unet {name} {hw[0]}x{hw[1]}", max_abs(got, want), TOL)
    assert np.std(want) > 0.1


def test_nearest_resize_matches_torch():
    """Up-sampling to a size is torch's nearest interpolation, exactly (odd, even, non-square)."""
    x = np.random.default_rng(0).standard_normal((1, 13, 10, 3)).astype(np.float32)
    for size in [(26, 20), (25, 19), (25, 20), (13, 10), (7, 31), (40, 3)]:
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="nearest")
        np.testing.assert_array_equal(nearest_resize(jnp.asarray(x), size), want.permute(0, 2, 3, 1).numpy())


def test_per_layer_text_equals_shared_text(sdxl_pair):
    """(L, B, N, D) text with the same sequence in every layer is the plain call; a change in one
    layer changes the output. (On the SDXL-like config, whose blocks hold several transformer
    layers, so the per-layer offsets are exercised.)"""
    name, _, module, params, config = sdxl_pair
    x, t, ctx, extra = inputs(config)
    f = jax.jit(module.apply)
    base = f({"params": params}, x, t, ctx, **extra)
    per_layer = np.repeat(ctx[None], config.num_cross_layers, axis=0)
    np.testing.assert_allclose(f({"params": params}, x, t, per_layer, **extra), base, atol=1e-5)
    per_layer[-1] += 1.0
    assert max_abs(f({"params": params}, x, t, per_layer, **extra), base) > 1e-3


def test_remat_and_bf16(sdxl_pair):
    name, _, module, params, config = sdxl_pair
    x, t, ctx, extra = inputs(config)
    base = jax.jit(module.apply)({"params": params}, x, t, ctx, **extra)
    remat = jax.jit(module.clone(remat=True).apply)({"params": params}, x, t, ctx, **extra)
    np.testing.assert_allclose(remat, base, atol=1e-5)
    bf16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, x, t, ctx, **extra)
    assert bf16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(bf16, np.float32) - base) / np.linalg.norm(base)
    assert rel < 5e-2, rel


@pytest.fixture(scope="module")
def sd15_pair(tmp_path_factory):
    return _pair("sd15", tmp_path_factory)


def test_nchw_and_channel_errors(sd15_pair):
    _, _, module, params, config = sd15_pair
    x, t, ctx, _ = inputs(config, size=16)
    call = lambda *a, **kw: module.apply({"params": params}, *a, **kw)
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\).*NCHW.*NHWC \(B, H, W, C\).*x\.transpose\(0, 2, 3, 1\)"):
        call(x.transpose(0, 3, 1, 2), t, ctx)
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 3\); this model takes NHWC .*in_channels = 4"):
        call(x[..., :3], t, ctx)
    with pytest.raises(ValueError, match=r"\(16, 16, 4\)"):
        call(x[0], t, ctx)
    with pytest.raises(ValueError, match=r"timesteps has shape \(2, 1\)"):
        call(x, t[:, None], ctx)
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(2, 7, 16\).*cross_attention_dim = 32"):
        call(x, t, ctx[..., :16])


@pytest.mark.parametrize("kw, says", [
    ("timestep", "pass timesteps="),
    ("added_cond_kwargs", "pass text_embeds= and time_ids= directly instead of added_cond_kwargs"),
    ("return_dict", "returns the array .* no return_dict"),
    ("cross_attention_kwargs", "control="),
    ("encoder_attention_mask", "text attention masks are not supported"),
    ("class_labels", "class-conditional"),
    ("down_block_additional_residuals", "ControlNet"),
    ("timesteps_", "unexpected keyword timesteps_=; it takes \\(sample, timesteps, encoder_hidden_states"),
])
def test_diffusers_keyword_errors(sdxl_pair, kw, says):
    """diffusers' keyword names raise one TypeError naming our equivalent, before any compute."""
    _, _, module, params, config = sdxl_pair
    x, t, ctx, extra = inputs(config)
    value = {"return_dict": False, "added_cond_kwargs": extra}.get(kw, t)
    if kw == "timestep":
        args, kwargs = (x,), dict(extra, encoder_hidden_states=ctx)
    elif kw == "added_cond_kwargs":
        args, kwargs = (x, t, ctx), {}
    else:
        args, kwargs = (x, t, ctx), extra
    with pytest.raises(TypeError, match=says):
        jax.jit(module.apply)({"params": params}, *args, **kwargs, **{kw: value})


def test_sdxl_input_errors(sdxl_pair):
    _, _, module, params, config = sdxl_pair
    x, t, ctx, extra = inputs(config)
    call = lambda *a, **kw: module.apply({"params": params}, *a, **kw)
    with pytest.raises(TypeError, match="pass text_embeds= and time_ids= directly"):
        call(x, t, ctx, extra)  # added_cond_kwargs passed positionally
    with pytest.raises(ValueError, match="needs text_embeds= .* and time_ids="):
        call(x, t, ctx)
    with pytest.raises(ValueError, match=r"time_ids \(2, 5\) .* expected \(2, 32\) and \(2, 6\)"):
        call(x, t, ctx, text_embeds=extra["text_embeds"], time_ids=extra["time_ids"][:, :5])
    with pytest.raises(TypeError, match="needs encoder_hidden_states"):
        call(x, t, text_embeds=extra["text_embeds"], time_ids=extra["time_ids"])
    # The documented keywords, control included, still work as keywords.
    out = jax.eval_shape(lambda: call(sample=x, timesteps=t, encoder_hidden_states=ctx, control=Control(), **extra))
    assert out.shape == x.shape


def test_chunked_attention_matches_the_fused_one(monkeypatch):
    """Query-chunked attention (large maps: memory for one chunk's logits) equals the fused one, values
    and gradients, with and without a key mask and with a ragged last chunk; an attention layer above
    CHUNK_LOGITS takes it and its output does not move."""
    from customjax.models.attention import Attention
    from customjax.models import layers

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (37, 19, 19))
    mask = jnp.asarray(rng.uniform(size=(2, 1, 1, 19)) > 0.3)
    for m in (None, mask):
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=m)                 # noqa: E731
        g = lambda q, k, v: layers.chunked_attention(q, k, v, m, 10)                     # noqa: E731
        np.testing.assert_allclose(g(q, k, v), f(q, k, v), atol=1e-6)
        loss = lambda fn: lambda *a: (fn(*a) ** 2).sum()                                  # noqa: E731
        for a, b in zip(jax.grad(loss(g), (0, 1, 2))(q, k, v), jax.grad(loss(f), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    layer = Attention(heads=3, dim_head=8, out_dim=24, is_cross=False)
    x = jnp.asarray(rng.standard_normal((2, 37, 24)), jnp.float32)
    p = layer.init(jax.random.key(0), x)
    fused = layer.apply(p, x)
    monkeypatch.setattr(layers, "CHUNK_LOGITS", 2 * 3 * 37 * 37 // 4)
    np.testing.assert_allclose(layer.apply(p, x), fused, atol=1e-6)
    calls = []
    monkeypatch.setattr(layers, "chunked_attention", lambda *a: calls.append(a[-1]) or jax.nn.dot_product_attention(*a[:4]))
    monkeypatch.setattr(layers, "CHUNK_LOGITS", 2 * 3 * 37 * 19 - 1)
    layers.multihead_attention(q, k, v)
    assert calls == [max(1, (2 * 3 * 37 * 19 - 1) // (2 * 3 * 19))]
