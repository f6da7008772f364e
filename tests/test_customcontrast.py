"""CustomContrast (seed 000) as a method: the attention it captures and masks (visual maps, the text
mask of Sec. 3.4), the location maps against a hand computation, the training condition (S+ text per
layer, the caption's own text where the image is dropped, each loss term by name, the Table 3-4
presets), and the sampler (the location mask carried from step to step, one and two subjects)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax.control.spec import Capture, Control, ControlConfig, ExtraKV, ExtraTokens, TextMask
from customjax.models.attention import Attention
from train_probe import ROOT


def _config(*presets, **train):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cc_cfg", ROOT / "configs" / "customcontrast.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(",".join(("tiny", *presets)))
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def tiny():
    from customjax import trainer
    from customjax.methods.build import build

    built = build(_config())
    frozen, train = trainer.split(built)
    return built, frozen, train


def _batch(built, captions=("a red star",) * 4, seed=0):
    from customjax.tokenizer import tokenize

    rng = np.random.default_rng(seed)
    B = len(captions)
    mask = np.zeros((B, 32, 32), np.float32)
    mask[:, 8:24, 4:20] = 1
    b = {"image": rng.uniform(-1, 1, (B, 32, 32, 3)).astype(np.float32), "mask": mask,
         "reference": rng.uniform(0, 1, (B, 28, 28, 3)).astype(np.float32), "caption": list(captions)}
    host = built.method.host_inputs(b, built.pipe.tokenizers)
    return {**{k: jnp.asarray(v) for k, v in b.items() if k != "caption"},
            "ids": tuple(jnp.asarray(tokenize(t, list(captions))) for t in built.pipe.tokenizers),
            **{k: jnp.asarray(v) for k, v in host.items()}}


# -- the attention layer ----------------------------------------------------------------------------
def _layer(capture=Capture()):
    att = Attention(heads=2, dim_head=4, out_dim=8, is_cross=True,
                    control=ControlConfig(extra_kv=(ExtraKV("vision", 6),), capture=capture))
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))
    toks = jax.random.normal(jax.random.key(2), (2, 1, 3, 6))
    params = att.init(jax.random.key(3), x, ctx, (4, 4), Control({"vision": ExtraTokens(toks)}))["params"]
    return att, params, x, ctx, toks


def test_visual_maps_are_captured_per_reference_and_sum_to_one():
    att, params, x, ctx, toks = _layer(Capture(cross_probs=(1,), extra_probs=(1,)))
    _, state = att.apply({"params": params}, x, ctx, (4, 4), Control({"vision": ExtraTokens(toks)}),
                         mutable=["attention"])
    vis = state["attention"]["extra_probs_vision"][0]
    assert vis.shape == (2, 1, 16, 3)
    np.testing.assert_allclose(np.asarray(vis.sum(-1)), 1.0, atol=1e-6)
    # the captured maps are the ones the output used: recompute the visual branch by hand
    q = (x @ params["to_q"]["kernel"]).reshape(2, 16, 2, 4)
    k = (toks[:, 0] @ params["to_k_vision"]["kernel"]).reshape(2, 3, 2, 4)
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1).mean(1)
    np.testing.assert_allclose(np.asarray(vis[:, 0]), np.asarray(p), atol=1e-5)


def test_text_mask_scales_only_the_masked_tokens_probabilities():
    att, params, x, ctx, toks = _layer()
    extra = {"vision": ExtraTokens(toks)}
    plain = att.apply({"params": params}, x, ctx, (4, 4), Control(extra))
    tokens = jnp.zeros((2, 1, 5), bool).at[:, 0, 2].set(True)
    ones = att.apply({"params": params}, x, ctx, (4, 4), Control(extra, TextMask(tokens, jnp.ones((2, 1, 4, 4)))))
    np.testing.assert_allclose(np.asarray(ones), np.asarray(plain), atol=1e-5)
    m = jnp.zeros((2, 1, 4, 4)).at[:, :, :2].set(1.0)             # the top half keeps token 2
    got = att.apply({"params": params}, x, ctx, (4, 4), Control(extra, TextMask(tokens, m)))
    # by hand: token 2's value contribution removed in the bottom half, nothing renormalised
    q = (x @ params["to_q"]["kernel"]).reshape(2, 16, 2, 4)
    k = (ctx @ params["to_k"]["kernel"]).reshape(2, 5, 2, 4)
    v = (ctx @ params["to_v"]["kernel"]).reshape(2, 5, 2, 4)
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    p = p * jnp.where((jnp.arange(16) >= 8)[:, None] & (jnp.arange(5) == 2)[None], 0.0, 1.0)
    text = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(2, 16, 8)
    kv = (toks[:, 0] @ params["to_k_vision"]["kernel"]).reshape(2, 3, 2, 4)
    vv = (toks[:, 0] @ params["to_v_vision"]["kernel"]).reshape(2, 3, 2, 4)
    pv = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, kv) / 2.0, axis=-1)
    vis = jnp.einsum("bhqk,bkhd->bqhd", pv, vv).reshape(2, 16, 8)
    want = (text + vis) @ params["to_out_0"]["kernel"] + params["to_out_0"]["bias"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_location_maps_by_hand():
    """A_g = mean over layers of (max-normalised placeholder map + mean of max-normalised visual maps) / 2."""
    from customjax.guidance.location import location_maps

    rng = np.random.default_rng(0)
    text = rng.dirichlet(np.ones(6), size=(1, 16)).astype(np.float32)           # (B, T, N) at 4 x 4
    vis = rng.dirichlet(np.ones(3), size=(1, 1, 16)).astype(np.float32)         # (B, R, T, N_vis)
    state = {"attention": {"down": {"cross_probs": (jnp.asarray(text),), "extra_probs_vision": (jnp.asarray(vis),)}}}
    wm = np.zeros((1, 1, 6), bool)
    wm[0, 0, [2, 3]] = True
    got = np.asarray(location_maps(state, "vision", jnp.asarray(wm), (4, 4), (4, 4)))
    a_t = text[0][:, [2, 3]].sum(-1)
    a_t = a_t / a_t.max()
    a_v = np.mean([vis[0, 0, :, n] / vis[0, 0, :, n].max() for n in range(3)], axis=0)
    np.testing.assert_allclose(got[0, 0], (0.5 * (a_t + a_v)).reshape(4, 4), rtol=1e-5)
    with pytest.raises(ValueError, match="same layers"):
        location_maps({"attention": {"down": {"cross_probs": (jnp.asarray(text),)}}}, "vision", jnp.asarray(wm),
                      (4, 4), (4, 4))


def test_second_view_is_the_targets_subject_cut_out():
    """The target's subject, object-centric on a neutral fill (as the references), at the reference side;
    an empty mask keeps the whole target."""
    from customjax.methods.customcontrast import segmented_views

    img = -np.ones((2, 32, 32, 3), np.float32)
    img[:, 4:8, 20:28] = [1.0, -1.0, -1.0]                       # a red 4 x 8 box on black
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 4:8, 20:28] = 1
    v = segmented_views(img, mask, 20)
    assert v.shape == (2, 20, 20, 3)
    red = (v[0, ..., 0] > 0.8) & (v[0, ..., 1] < 0.2)
    assert 0.05 < red.mean() < 0.15 and abs(np.argwhere(red).mean(0) - 9.5).max() < 1.5   # centred: 8 px of 18
    assert not np.any((v[0].sum(-1) < 0.05))                     # no black: the background is the fill
    assert np.abs(v[1].mean() - ((img[1] + 1) / 2).mean()) < 0.02       # empty mask: the whole target


def test_placeholder_is_the_captions_last_word(tiny):
    from customjax.methods.customcontrast import placeholder_mask
    from customjax.tokenizer import word_token_mask

    built = tiny[0]
    tok = built.pipe.tokenizers[0]
    got = placeholder_mask(tok, ["a red star", "a photo of a dog."])
    np.testing.assert_array_equal(got, word_token_mask(tok, ["a red star", "a photo of a dog."], ["star", "dog"]))
    with pytest.raises(ValueError, match="no word"):
        placeholder_mask(tok, ["..."])


# -- training ---------------------------------------------------------------------------------------
def test_condition_gives_per_layer_text_and_the_captions_own_text_without_image(tiny):
    from customjax.methods.objective import ObjectiveConfig
    from customjax.methods.protocol import TrainInputs
    from customjax.pipeline import encode_splus, encode_text

    built, frozen, train = tiny
    b = _batch(built)
    ctx, _ = encode_text(built.pipe, frozen["text_encoders"], b["ids"])
    B = ctx.shape[0]
    drop = jnp.array([False, True, False, False])
    t = jnp.array([10, 500, 900, 999])
    x = TrainInputs(None, ctx, None, t, drop, jnp.zeros((B,), bool))
    cond = built.method.condition(built.image_side, frozen, train, b, x, jax.random.key(0), ObjectiveConfig())
    L = built.unet.config.num_cross_layers
    assert cond.text.shape == (L, B, 77, ctx.shape[-1]) and cond.tokens.shape[:2] == (B, 1)
    np.testing.assert_allclose(np.asarray(cond.text[:, 1]), np.broadcast_to(np.asarray(ctx[1]), cond.text[:, 1].shape))
    assert set(cond.losses) == {"cscl", "macl"}
    # the S+ text of example 0 is the caption with its placeholder embedded as each layer's token
    from customjax.methods.customcontrast import clip_outputs

    views = jnp.concatenate([b["reference"], b["view"]])
    f, _ = clip_outputs(built.image_side, frozen, views)
    out = built.image_side.mfi.apply({"params": train["mfi"]}, f, jnp.concatenate([t, t]))
    want, _ = encode_splus(built.pipe, frozen["text_encoders"], b["ids"], b["placeholder"], out["text_tokens"][:B])
    np.testing.assert_allclose(np.asarray(cond.text[:, 0]), np.asarray(want[0]), atol=1e-5)
    assert not np.allclose(np.asarray(cond.text[0, 0]), np.asarray(cond.text[-1, 0]))    # layers differ


@pytest.mark.parametrize("presets,terms", [((), {"cscl", "macl", "location"}), (("no_cscl", "no_location"), {"macl"}),
                                           (("no_macl",), {"cscl", "location"}), (("visual_only",), {"location"})])
def test_each_loss_term_is_logged_by_name_and_trains(presets, terms):
    """Eq. 9 term by term: every active term appears as loss/<name> and the total is their sum; the
    gradient reaches the MFI encoder and the visual K/V."""
    from customjax import trainer
    from customjax.methods.build import build
    from customjax.methods.objective import ObjectiveConfig, loss_fn

    built = build(_config(*presets))
    frozen, train = trainer.split(built)
    (loss, m), g = jax.jit(lambda tr: jax.value_and_grad(loss_fn, has_aux=True)(
        tr, frozen, _batch(built), jax.random.key(1), built=built, cfg=ObjectiveConfig(0.0, 0.0, 0.0)))(train)
    assert {k[5:] for k in m if k.startswith("loss/")} == {"diffusion", *terms}
    np.testing.assert_allclose(float(loss), sum(float(m[f"loss/{k}"]) for k in ("diffusion", *terms)), rtol=1e-5)
    norms = {k: float(jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(v)))) for k, v in g.items()}
    assert norms["mfi"] > 0 and norms["unet"] > 0
    assert ("text_out" in train["mfi"]) == ("visual_only" not in presets)


def test_location_loss_term_matches_the_paper_form(tiny):
    """loss/location = lambda2 * (mean((1 - M) A) - mean(M A)) over the kept examples, with A the
    location map of the training call's captured attention and M the target's mask on the mask grid."""
    from customjax.methods.objective import ObjectiveConfig, loss_fn

    built, frozen, train = tiny
    b = _batch(built)
    f = jax.jit(lambda mask: loss_fn(train, frozen, dict(b, mask=mask), jax.random.key(3), built=built,
                                     cfg=ObjectiveConfig(0.0, 0.0, 0.0))[1])
    m = f(b["mask"])
    assert float(m["loss/location"]) != 0.0
    # an all-background mask can only raise the term; all-subject can only lower it
    lo, hi = f(jnp.ones_like(b["mask"])), f(jnp.zeros_like(b["mask"]))
    assert float(lo["loss/location"]) < float(m["loss/location"]) < float(hi["loss/location"])
    np.testing.assert_allclose(float(hi["loss/location"]), -float(lo["loss/location"]), rtol=1e-5)


# -- sampling ---------------------------------------------------------------------------------------
def test_sampler_carries_the_location_mask_and_samples_two_subjects(tiny):
    """Sec. 3.4: masks are made from the generation branch's own attention at every step (no guidance
    branch: 2 UNet evaluations a step) and the first step runs unmasked; two subjects get two masks."""
    from customjax import api
    from customjax.sampling.dual_branch import unet_evaluations

    built = tiny[0]
    c = _config()
    c.sample.steps = 3
    p = api.Customizer(c, built, None)
    assert p.guidance.location and p.guidance.t_stop is None
    rng = np.random.default_rng(0)
    r1, r2 = (rng.uniform(0, 255, (40, 40, 3)).astype(np.uint8) for _ in range(2))
    out = p(["a red star on a mat", "a star beside a cube"], references=[[r1], [r1, r2]],
            words=[["star"], ["star", "cube"]], seeds=[0])
    assert [m.shape for m in out.masks] == [(1, 16, 16), (2, 16, 16)]
    steps = out.mask_steps[1]
    assert steps.shape == (3, 2, 16, 16) and np.all((steps >= 0) & (steps <= 1))
    assert np.all(steps.reshape(3, 2, -1).max(-1) > 0.99)            # Top-K, max-normalised, per subject
    kept = (steps > 0).reshape(3, 2, -1).sum(-1)
    assert np.all(kept <= int(np.ceil(0.2 * 256)))                    # gamma_scope 0.2 of the mask grid
    np.testing.assert_array_equal(out.masks[1], steps[-1])
    assert out.record["unet_evaluations_per_image"] == unet_evaluations(p.guidance, 3) == 6


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_cross_layer_blocks_follow_the_unets_transformer_models(model):
    """``UNetConfig.cross_layer_blocks``: per cross-attention layer in UNet order (down, mid, up), its
    transformer model, read off the parameter tree of the published architecture."""
    import re

    from flax import traverse_util

    from customjax.pipeline import load_stable_diffusion
    from real_sizes import config_folder

    pipe, params = load_stable_diffusion(config_folder(model), abstract=True)
    paths = {k[:k.index("attn2")] for k in traverse_util.flatten_dict(params["unet"]) if "attn2" in k}
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    num = lambda s: int(re.findall(r"\d+", s)[-1]) if re.search(r"\d", s) else 0     # noqa: E731
    order = sorted(paths, key=lambda p: (rank[re.sub(r"_\d+$", "", p[0])], num(p[0]), num(p[1]), num(p[2])))
    models = {m: i for i, m in enumerate(dict.fromkeys(p[:2] for p in order))}
    got = pipe.unet.config.cross_layer_blocks()
    assert got == tuple(models[p[:2]] for p in order)
    assert (len(got), max(got) + 1) == {"sd15": (16, 16), "sdxl": (70, 11)}[model]


def test_per_block_tokens_are_shared_by_the_layers_of_a_transformer_model():
    """``mfi.tokens = "block"``: one S+ token per transformer model (tiny SDXL layout: layers of one
    model read the same text), the MFI encoder makes that many tokens, and sampling runs."""
    from customjax import trainer
    from customjax.methods.build import build
    from customjax.methods.objective import ObjectiveConfig
    from customjax.methods.protocol import TrainInputs
    from customjax.pipeline import encode_text

    c = _config("per_block")
    c.model.random = "sdxl"
    built = build(c)
    frozen, train = trainer.split(built)
    blocks = built.unet.config.cross_layer_blocks()
    assert built.image_side.token_of_layer == blocks and len(set(blocks)) < len(blocks)
    assert train["mfi"]["layer_queries"].shape[0] == max(blocks) + 2          # + the textual CLS
    b = _batch(built)
    ctx, _ = encode_text(built.pipe, frozen["text_encoders"], b["ids"])
    B = ctx.shape[0]
    x = TrainInputs(None, ctx, None, jnp.array([10, 500, 900, 999]), jnp.zeros((B,), bool), jnp.zeros((B,), bool))
    text = built.method.condition(built.image_side, frozen, train, b, x, jax.random.key(0), ObjectiveConfig()).text
    assert text.shape[0] == len(blocks)
    for i, j in zip(range(len(blocks)), range(1, len(blocks))):
        same = np.allclose(np.asarray(text[i]), np.asarray(text[j]))
        assert same == (blocks[i] == blocks[j]), (i, j)


def test_export_names_and_roundtrip(tiny, tmp_path):
    """The export holds the MFI encoder and the visual K/V under PyTorch names, and loads back strictly."""
    from customjax.methods.build import load_adapter, save_adapter, trainable_tree, with_trainable
    from customjax.weights.safetensors_io import load_file

    built = tiny[0]
    bumped = with_trainable(built, jax.tree_util.tree_map(lambda a: a + 0.5, trainable_tree(built)))
    path = save_adapter(bumped, tmp_path)
    keys = set(load_file(path))
    assert any(k.startswith("mfi.visual_qformer.") for k in keys)
    assert any(k.endswith("attn2.to_k_vision.weight") for k in keys) and all(k.split(".")[0] in ("mfi", "unet") for k in keys)
    back = trainable_tree(load_adapter(built, tmp_path))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(trainable_tree(bumped))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
