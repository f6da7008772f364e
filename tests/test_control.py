"""The attention extension points: extra K/V sets with masks (RealCustom Eq. 4 / RealCustom++
Eq. 17), duplicated K/V (Contrastive Inversion Eq. 3), LoRA, per-layer text, attention capture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import max_abs
from customjax.control import params as cparams
from customjax.control.capture import collect, self_attention_times
from customjax.control.lora import LoRADense
from customjax.control.masks import resize_mask
from customjax.control.spec import Capture, Control, ControlConfig, ExtraKV, ExtraTokens, LoRA
from customjax.models.attention import Attention
from customjax.models.unet import UNET, UNet2DConditionModel, dummy_inputs
from customjax.models.unet_config import UNetConfig
from customjax.weights.loaders import param_shapes

CFG = UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                 heads=(2, 2), cross_attention_dim=(24, 24), transformer_layers=(1, 1), norm_num_groups=4)
B, S, N = 2, 8, 5


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _perturb(tree, seed=0):
    """Random values of the tree's shapes (works on ShapeDtypeStructs too; no init compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: 0.2 * rng.standard_normal(p.shape).astype(np.float32), tree)


@pytest.fixture(scope="module")
def base():
    return _perturb(param_shapes(UNET, CFG))


def _inputs():
    return _rand(B, S, S, 4, seed=1), jnp.array([3.0, 500.0]), _rand(B, N, 24, seed=2)


def _controlled(base, control: ControlConfig, seed=3):
    model = UNet2DConditionModel(CFG, control=control)
    full = jax.eval_shape(lambda: model.init(jax.random.key(seed), *dummy_inputs(CFG)))["params"]
    return model, cparams.attach(base, _perturb(full, seed))


def test_extra_kv_zero_mask_or_scale_is_plain_t2i(base):
    x, t, ctx = _inputs()
    plain = UNet2DConditionModel(CFG).apply({"params": base}, x, t, ctx)
    model, p = _controlled(base, ControlConfig(extra_kv=(ExtraKV("vision", 12),)))
    tokens = _rand(B, 2, 6, 12, seed=4)
    run = lambda c: model.apply({"params": p}, x, t, ctx, control=c)
    assert np.array_equal(run(None), plain)
    zero_mask = Control({"vision": ExtraTokens(tokens, jnp.zeros((B, 2, S, S)), 1.0)})
    assert np.array_equal(run(zero_mask), plain)
    per_sample = Control({"vision": ExtraTokens(tokens, None, jnp.array([0.0, 1.0]))})
    out = run(per_sample)
    assert np.array_equal(out[0], plain[0])
    assert max_abs(out[1], plain[1]) > 1e-3
    # a token mask that keeps every token changes nothing; one that keeps a subset does
    all_on = Control({"vision": ExtraTokens(tokens, None, 1.0, jnp.ones((B, 2, 6), bool))})
    np.testing.assert_allclose(run(all_on), run(Control({"vision": ExtraTokens(tokens, None, 1.0)})), atol=1e-6)
    some = jnp.arange(6) < 3
    sub = Control({"vision": ExtraTokens(tokens, None, 1.0, jnp.broadcast_to(some, (B, 2, 6)))})
    only3 = Control({"vision": ExtraTokens(tokens[:, :, :3], None, 1.0)})
    np.testing.assert_allclose(run(sub), run(only3), atol=1e-5)
    none = Control({"vision": ExtraTokens(tokens, None, 1.0, jnp.zeros((B, 2, 6), bool))})
    np.testing.assert_allclose(run(none), plain, atol=1e-6)
    # public RealCustom++ names
    names = {k[-2] for k in traverse_util.flatten_dict(p)}
    assert {"to_k_vision", "to_v_vision"} <= names


def test_attention_with_masked_references_matches_equation(base):
    """out = to_out(Attn(Q,K,V) + s * sum_r m_r * Attn(Q, K_v(y_r), V_v(y_r))), masks resized."""
    heads, dh, T, hw = 2, 4, 16, (4, 4)
    layer = Attention(heads, dh, 8, True, control=ControlConfig(extra_kv=(ExtraKV("vision", 6),)))
    x, ctx, toks = _rand(B, T, 8, seed=5), _rand(B, N, 10, seed=6), _rand(B, 2, 3, 6, seed=7)
    mask = (np.random.default_rng(8).random((B, 2, 8, 8)) > 0.5).astype(np.float32)
    p = _perturb(jax.eval_shape(lambda: layer.init(jax.random.key(0), x, ctx, hw))["params"])
    got = layer.apply({"params": p}, x, ctx, hw, Control({"vision": ExtraTokens(toks, mask, 0.7)}))

    def attn(q, k, v):
        q, k, v = (a.reshape(*a.shape[:2], heads, dh) for a in (q, k, v))
        w = jax.nn.softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh), -1)
        return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, -1, heads * dh)

    d = lambda name, a: a @ p[name]["kernel"]
    out = attn(d("to_q", x), d("to_k", ctx), d("to_v", ctx))
    small = mask.reshape(B, 2, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(B, 2, T, 1)
    for r in range(2):
        out = out + 0.7 * small[:, r] * attn(d("to_q", x), d("to_k_vision", toks[:, r]), d("to_v_vision", toks[:, r]))
    want = out @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
    assert max_abs(got, want) < 1e-5


def test_duplicated_kv_starts_as_copy(base):
    """Contrastive Inversion Eq. 3 with K^a, V^a copied from K, V and the auxiliary tokens equal to
    the text: the attention term doubles."""
    layer = Attention(2, 4, 8, True, control=ControlConfig(extra_kv=(ExtraKV("aux", 10),)))
    x, ctx = _rand(B, 16, 8, seed=9), _rand(B, N, 10, seed=10)
    p = _perturb(jax.eval_shape(lambda: layer.init(jax.random.key(0), x, ctx, (4, 4)))["params"])
    p = cparams.duplicate_kv(p, "aux")
    plain = layer.apply({"params": p}, x, ctx, (4, 4))
    dup = layer.apply({"params": p}, x, ctx, (4, 4), Control({"aux": ExtraTokens(ctx[:, None], None, 1.0)}))
    bias = p["to_out_0"]["bias"]
    np.testing.assert_allclose(dup - bias, 2 * (plain - bias), rtol=1e-5, atol=1e-5)


def test_lora_dense_is_base_plus_low_rank():
    """y = x W + b + scale (x A) B, with B zero at init."""
    layer = LoRADense(6, rank=2, scale=2.0)
    x = _rand(3, 5, seed=12)
    p = layer.init(jax.random.key(0), x)["params"]
    assert not np.any(p["lora_up"]["kernel"])
    p = _perturb(p, 13)
    want = x @ p["kernel"] + p["bias"] + 2.0 * (x @ p["lora_down"]["kernel"]) @ p["lora_up"]["kernel"]
    assert max_abs(layer.apply({"params": p}, x), want) < 1e-5


def test_lora_in_unet_partition_and_merge(base):
    x, t, ctx = _inputs()
    plain = UNet2DConditionModel(CFG).apply({"params": base}, x, t, ctx)
    model, p = _controlled(base, ControlConfig(lora=LoRA(rank=2, alpha=4.0)))
    frozen, train = cparams.partition(p, lambda k: cparams.is_control_param(k))
    flat = traverse_util.flatten_dict(train)
    assert all(k[-2] in ("lora_down", "lora_up") for k in flat)
    # (down, up) x 4 projections x (attn1, attn2) x 4 transformer blocks
    assert len(flat) == 2 * 4 * 2 * 4
    zero_up = traverse_util.unflatten_dict(
        {k: (np.zeros_like(v) if k[-2] == "lora_up" else v) for k, v in flat.items()})
    apply = jax.jit(model.apply)
    assert max_abs(apply({"params": cparams.merge(frozen, zero_up)}, x, t, ctx), plain) < 1e-5
    assert max_abs(apply({"params": cparams.merge(frozen, train)}, x, t, ctx), plain) > 1e-3


def test_capture_probabilities_and_fast_self_attention(base):
    x, t, ctx = _inputs()
    cap = Capture(cross_probs=(1, 2), self_probs=(1,), self_qk=(1,))
    model = UNet2DConditionModel(CFG, control=ControlConfig(capture=cap))
    out, state = model.apply({"params": base}, x, t, ctx, mutable=["attention"])
    plain = UNet2DConditionModel(CFG).apply({"params": base}, x, t, ctx)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    flat = traverse_util.flatten_dict(state["attention"])
    cross = [v[0] for k, v in flat.items() if k[-1] == "cross_probs"]
    # CrossAttnDownBlock2D at factor 1 (1 layer), CrossAttnUpBlock2D at factor 1 (2 layers); no
    # cross-attention at factor 2 in this config except the mid block.
    assert sorted(c.shape for c in cross) == sorted([(B, 64, N)] * 3 + [(B, 16, N)])
    for c in cross:
        np.testing.assert_allclose(c.sum(-1), 1.0, atol=1e-5)
    selfp = [v[0] for k, v in flat.items() if k[-1] == "self_probs"]
    qks = [v[0] for k, v in flat.items() if k[-1] == "self_qk"]
    assert len(selfp) == len(qks) == 3
    vec = _rand(B, 64, 2, seed=11)
    for probs, (q, k) in zip(selfp, qks):
        assert max_abs(self_attention_times(q, k, vec), probs @ vec) < 1e-5
    assert [p for p, _ in collect(state, "self_qk")] == [p for p, _ in collect(state, "self_probs")]


def test_resize_mask_block_average_and_bilinear():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, :4, :4] = 1
    small = resize_mask(m, (2, 2))
    np.testing.assert_allclose(small[0], [[1, 0], [0, 0]])
    assert resize_mask(m, (8, 8)) is m
    assert resize_mask(m, (3, 3)).shape == (1, 3, 3)


def test_attach_and_merge_errors(base):
    frozen, train = cparams.partition(base, lambda k: k[0] == "conv_in")
    with pytest.raises(ValueError, match="present in two trees"):
        cparams.merge(frozen, base)
    bad = jax.tree_util.tree_map(lambda a: a, base)
    bad["conv_in"]["bias"] = jnp.zeros(3)
    with pytest.raises(ValueError, match="conv_in/bias"):
        cparams.attach(bad, base)


def test_remat_gradients_equal_plain(base):
    """Rematerialised blocks (training memory) give the same gradients."""
    x, t, ctx = _inputs()
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx) ** 2)
    g0 = jax.jit(jax.grad(loss(UNet2DConditionModel(CFG))))(base)
    g1 = jax.jit(jax.grad(loss(UNet2DConditionModel(CFG, remat=True))))(base)
    err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g0, g1)))
    assert err < 1e-5
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0)) > 1e-4
