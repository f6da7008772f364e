"""UNet2DConditionModel parity with diffusers on tiny random SD-1.5-, SD-2- and SDXL-like configs,
loaded from folders written by ``save_pretrained``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from conftest import max_abs
from customjax.models.unet import UNET
from customjax.weights.loaders import load_pretrained

TOL = 1e-4

CONFIGS = {
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
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


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """The SDXL-like config: several transformer layers per block, so per-layer offsets and remat
    of nested blocks are exercised."""
    return _pair("sdxl", tmp_path_factory)


def inputs(config, batch=2, size=8, text_len=7, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([10.0, 937.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, text_len, config.cross_attention_dim[0])).astype(np.float32)
    extra = {}
    if config.addition_embed_type == "text_time":
        pool = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = dict(text_embeds=rng.standard_normal((batch, pool)).astype(np.float32),
                     time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1)))
    return x, t, ctx, extra


def test_unet_parity(pair, report):
    name, ref, module, params, config = pair
    x, t, ctx, extra = inputs(config)
    with torch.no_grad():
        added = {k: torch.from_numpy(v) for k, v in extra.items()} or None
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                   added_cond_kwargs=added).sample.permute(0, 2, 3, 1).numpy()
    got = jax.jit(module.apply)({"params": params}, x, t, ctx, **extra)
    report(f"unet {name}", max_abs(got, want), TOL)
    assert np.std(want) > 0.1  # the comparison is not between near-zero outputs


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
