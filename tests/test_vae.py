"""Parity of customjax.models.vae with diffusers' AutoencoderKL on tiny random models, at image sides
that are and are not multiples of the downsampling factor; the clear error for NCHW inputs."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import max_abs  # noqa: E402
from customjax.models.vae import (VAE, VAEConfig, latent_dist_sample, latent_dist_std,  # noqa: E402
                                  scale_latents, unscale_latents)
from customjax.weights import safetensors_io  # noqa: E402
from customjax.weights.loaders import load_pretrained  # noqa: E402

TOL = 1e-4

CONFIGS = {
    "sd": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4),
    # No quant convs, no mid attention, three levels, other channel counts.
    "bare": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8,
                 in_channels=4, out_channels=2, use_quant_conv=False, use_post_quant_conv=False,
                 mid_block_add_attention=False, shift_factor=0.1, scaling_factor=0.3),
}


def _torch_vae(**kw):
    torch.manual_seed(0)
    n = len(kw["block_out_channels"])
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, sample_size=32, **kw).eval()
    with torch.no_grad():  # Non-trivial GroupNorm affines and biases.
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    vae = _torch_vae(**CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    vae.save_pretrained(folder)
    module, params, config = load_pretrained(folder, VAE)
    return request.param, vae, module, params, config, _jitted(module)


def _jitted(module):
    """Compiled encode / decode / __call__, shared by the tests of one model."""
    return dict(
        encode=jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")),
        decode=jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode")),
        call=jax.jit(lambda p, x, key: module.apply({"params": p}, x, key)))


def _image(config, seed=0):
    return np.random.default_rng(seed).standard_normal((2, config.in_channels, 32, 32)).astype(np.float32)


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def test_encode_decode_parity(pair, report):
    name, vae, module, params, config, fn = pair
    x = _image(config)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        z = torch.from_numpy(np.random.default_rng(1).standard_normal(dist.mean.shape).astype(np.float32))
        image = vae.decode(z).sample

    mean, logvar = fn["encode"](params, x.transpose(0, 2, 3, 1))
    out = fn["decode"](params, _nhwc(z))

    h = 32 // 2 ** (len(config.block_out_channels) - 1)
    assert mean.shape == logvar.shape == (2, h, h, config.latent_channels)
    report(f"vae[{name}] encode mean", max_abs(mean, _nhwc(dist.mean)), TOL)
    report(f"vae[{name}] encode logvar", max_abs(logvar, _nhwc(dist.logvar)), TOL)
    report(f"vae[{name}] encode std", max_abs(latent_dist_std(logvar), _nhwc(dist.std)), TOL)
    report(f"vae[{name}] decode", max_abs(out, _nhwc(image)), TOL)
    assert out.shape == (2, 32, 32, config.out_channels)


def test_any_image_size_parity(pair, report):
    """Sides that are not multiples of f = 2**(blocks - 1): diffusers' encoder floors (pad right /
    bottom by one, stride 2), so 37 x 50 gives (37 // f) x (50 // f); decode doubles any latent size."""
    name, vae, module, params, config, fn = pair
    f = 2 ** (len(config.block_out_channels) - 1)
    x = np.random.default_rng(5).standard_normal((2, config.in_channels, 37, 50)).astype(np.float32)
    z = np.random.default_rng(6).standard_normal((2, config.latent_channels, 9, 13)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        image = vae.decode(torch.from_numpy(z)).sample
    mean, logvar = fn["encode"](params, x.transpose(0, 2, 3, 1))
    out = fn["decode"](params, z.transpose(0, 2, 3, 1))
    assert mean.shape == (2, 37 // f, 50 // f, config.latent_channels)
    assert out.shape == (2, 9 * f, 13 * f, config.out_channels)
    report(f"vae[{name}] encode mean 37x50", max_abs(mean, _nhwc(dist.mean)), TOL)
    report(f"vae[{name}] encode logvar 37x50", max_abs(logvar, _nhwc(dist.logvar)), TOL)
    report(f"vae[{name}] decode 9x13", max_abs(out, _nhwc(image)), TOL)


def test_nchw_errors(pair):
    _, _, module, params, config, fn = pair
    c, lc = config.in_channels, config.latent_channels
    with pytest.raises(ValueError, match=rf"images has shape \(2, {c}, 32, 32\), which looks NCHW.*NHWC "
                                         r"\(B, H, W, C\).*x\.transpose\(0, 2, 3, 1\)"):
        fn["encode"](params, np.zeros((2, c, 32, 32), np.float32))
    with pytest.raises(ValueError, match=rf"latents has shape \(2, {lc}, 9, 9\), which looks NCHW.*"
                                         rf"latent_channels = {lc}.*transpose"):
        fn["decode"](params, np.zeros((2, lc, 9, 9), np.float32))
    with pytest.raises(ValueError, match=rf"images has shape \(2, 32, 32, {c + 1}\); .*in_channels = {c}"):
        fn["encode"](params, np.zeros((2, 32, 32, c + 1), np.float32))
    with pytest.raises(ValueError, match=r"images has shape \(32, 32, "):
        fn["encode"](params, np.zeros((32, 32, c), np.float32))


def test_sample_and_clamp(pair):
    _, _, module, params, config, fn = pair
    x = _image(config, seed=2).transpose(0, 2, 3, 1)
    mean, logvar = fn["encode"](params, x)
    key = jax.random.key(3)
    z, other, want = jax.jit(lambda m, lv, k: (
        latent_dist_sample(m, lv, k), latent_dist_sample(m, lv, jax.random.key(4)),
        m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape)))(mean, logvar, key)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, other)
    # __call__ (used for init) encodes, samples with the key and decodes.
    np.testing.assert_allclose(fn["call"](params, x, key), fn["decode"](params, z), atol=1e-5)

    # logvar is clamped to [-30, 20] as in diffusers: push the logvar half of the moments far out.
    last = params["quant_conv"] if config.use_quant_conv else params["encoder"]["conv_out"]
    lc = config.latent_channels
    push = jnp.concatenate([jnp.zeros(lc), jnp.where(jnp.arange(lc) % 2 == 0, 1e3, -1e3)])
    bias = last["bias"]
    try:
        last["bias"] = bias + push
        clamped = fn["encode"](params, x)[1]
    finally:
        last["bias"] = bias
    np.testing.assert_array_equal(clamped[..., 0::2], 20.0)
    np.testing.assert_array_equal(clamped[..., 1::2], -30.0)


def test_scale_latents():
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 4, 4)), jnp.float32)
    sd = VAEConfig(scaling_factor=0.18215)
    np.testing.assert_allclose(scale_latents(z, sd), z * 0.18215, rtol=1e-6)
    sd3 = VAEConfig(scaling_factor=1.5305, shift_factor=0.0609)
    np.testing.assert_allclose(scale_latents(z, sd3), (z - 0.0609) * 1.5305, rtol=1e-6)
    stats = VAEConfig(scaling_factor=0.5, latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    np.testing.assert_allclose(scale_latents(z, stats)[..., 3], (z[..., 3] - 0.4) * 0.5 / 4.0, rtol=1e-6)
    for cfg in (sd, sd3, stats):
        np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, atol=1e-6)


def test_config_errors(caplog):
    base = dict(block_out_channels=[32, 64], norm_num_groups=8)
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({**base, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({**base, "up_block_types": ["UpDecoderBlock2D"]})
    with pytest.raises(ValueError, match="act_fn='mish'"):
        VAEConfig.from_dict({**base, "act_fn": "mish"})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_dict({**base, "norm_num_groups": 24})
    with caplog.at_level(logging.WARNING):
        cfg = VAEConfig.from_dict({**base, "force_upcast": True, "_class_name": "AutoencoderKL", "mystery": 1})
    assert "mystery" in caplog.text and "force_upcast" not in caplog.text
    assert cfg.block_out_channels == (32, 64)


def test_deprecated_attention_names(pair, tmp_path):
    """Old checkpoints call the mid-block attention query/key/value/proj_attn."""
    name, vae, module, params, _, _ = pair
    if not vae.config.mid_block_add_attention:
        pytest.skip("no attention")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in vae.state_dict().items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        state[k] = v.numpy()
    assert any(".proj_attn." in k for k in state)
    safetensors_io.save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(vae.config)))
    _, loaded, _ = load_pretrained(tmp_path, VAE)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
