"""CustomContrast's MFI encoder (customjax.adapters.mfi, seed 000 Sec. 3.2): Eq. 2's Perceiver attention
by hand, the timestep reaching the textual tokens (and the visual ones only through TV fusion), the
Table 3 switches, and the real SD-1.5 / SDXL geometry traced abstractly (16 / 70 S+ tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax.adapters.mfi import MFIConfig, MFIEncoder, PerceiverAttention

TINY = MFIConfig(image_dim=24, dim=32, heads=2, dim_head=16, layers=2, visual_tokens=3, cross_layers=5,
                 text_dim=20, cross_dim=28)


def _ln(x, g, b, eps=1e-5):
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


def test_perceiver_attention_is_eq2_by_hand():
    rng = np.random.default_rng(0)
    feats, queries = rng.standard_normal((2, 7, 32)), rng.standard_normal((2, 4, 32))
    pa = PerceiverAttention(heads=2, dim_head=16, out_dim=32)
    params = pa.init(jax.random.key(0), feats, queries)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape), params)   # non-trivial norms
    got = np.asarray(pa.apply(params, feats.astype(np.float32), queries.astype(np.float32)))
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    x = _ln(feats, p["norm_media"]["scale"], p["norm_media"]["bias"])
    q_in = _ln(queries, p["norm_latents"]["scale"], p["norm_latents"]["bias"])
    kv = np.concatenate([x, q_in], 1)                          # [f_I ; f_q]
    q, k, v = q_in @ p["to_q"]["kernel"], kv @ p["to_k"]["kernel"], kv @ p["to_v"]["kernel"]
    out = []
    for h in range(2):
        s = slice(16 * h, 16 * h + 16)
        logits = q[..., s] @ np.swapaxes(k[..., s], 1, 2) / 4.0
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out.append((w / w.sum(-1, keepdims=True)) @ v[..., s])
    want = np.concatenate(out, -1) @ p["to_out"]["kernel"]
    np.testing.assert_allclose(got, want, atol=2e-5)


def _run(config, t, seed=0):
    enc = MFIEncoder(config)
    feats = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 9, config.image_dim)), jnp.float32)
    params = enc.init(jax.random.key(1), feats, jnp.asarray(t))
    return enc.apply(params, feats, jnp.asarray(t)), enc.apply(params, feats, jnp.asarray([999, 999]))


def test_outputs_timestep_paths_and_table3_switches():
    out, later = _run(TINY, [10, 10])
    assert out["text_tokens"].shape == (2, 5, 20) and out["visual_tokens"].shape == (2, 3, 28)
    assert out["text_cls"].shape == out["visual_cls"].shape == (2, 32)
    # the spatio-temporal queries: another timestep, other S+ tokens; with TV fusion the visual tokens follow
    assert np.abs(out["text_tokens"] - later["text_tokens"]).max() > 1e-3
    assert np.abs(out["visual_tokens"] - later["visual_tokens"]).max() > 1e-3
    np.testing.assert_array_equal(out["visual_cls"], later["visual_cls"])   # the visual Q-former sees no time
    import dataclasses
    plain, plain_later = _run(dataclasses.replace(TINY, fusion=False), [10, 10])
    np.testing.assert_allclose(plain["visual_tokens"], plain_later["visual_tokens"], atol=1e-6)
    visual_only, _ = _run(dataclasses.replace(TINY, textual=False), [10, 10])
    assert set(visual_only) == {"visual_tokens", "visual_cls"}
    with pytest.raises(ValueError, match=r"\(batch, tokens, 24\)"):
        MFIEncoder(TINY).init(jax.random.key(0), jnp.zeros((2, 9, 23)), jnp.zeros((2,)))


@pytest.mark.parametrize("model,layers,text_dim,cross_dim", [("sd15", 16, 768, 768), ("sdxl", 70, 768 + 1280, 2048)])
def test_real_geometry_traced_abstractly(model, layers, text_dim, cross_dim):
    """CLIP ViT-L/14 at 224 px: 257 tokens x 3 layers x 1024 channels; the UNet's cross-attention layers."""
    c = MFIConfig(cross_layers=layers, text_dim=text_dim, cross_dim=cross_dim)
    enc = MFIEncoder(c)
    feats = jax.ShapeDtypeStruct((4, 257, 3 * 1024), jnp.float32)
    t = jax.ShapeDtypeStruct((4,), jnp.int32)
    out, params = jax.eval_shape(lambda f, t: enc.init_with_output(jax.random.key(0), f, t), feats, t)
    assert out["text_tokens"].shape == (4, layers, text_dim) and out["visual_tokens"].shape == (4, 16, cross_dim)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    print(f"\n[mfi] {model}: {n:,} parameters, {layers} S+ tokens")
    assert 50e6 < n < 80e6      # two 4-layer Q-formers of width 768 and the fusion: tens of millions
