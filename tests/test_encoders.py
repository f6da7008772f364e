"""Parity of customjax.models.clip_text / vit with transformers' CLIP, SigLIP, DINOv2 and ViT (DINO v1) encoders.

Each case saves a tiny randomised transformers model with ``save_pretrained``, loads it through
``load_pretrained`` and compares every output in float32 on the same random inputs.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

from conftest import max_abs  # noqa: E402
from customjax.models import clip_text, vit  # noqa: E402
from customjax.models.clip_text import CLIP_TEXT, CLIPTextConfig  # noqa: E402
from customjax.models.vit import CLIP_VISION, DINOV2, SIGLIP_VISION, Dinov2Config, bicubic_matrix  # noqa: E402
from customjax.weights.loaders import load_pretrained  # noqa: E402

TOL = 1e-4
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(TINY, image_size=16, patch_size=4)
TOKENS = dict(vocab_size=99, max_position_embeddings=16, bos_token_id=0, pad_token_id=1)


def _randomise(model, seed=0):
    """Weights far from their init, so that any mis-mapped tensor shows: all parameters perturbed,
    LayerNorm scales around 1, layer scales spread over [0.3, 1.5], embeddings / tokens of unit size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("lambda1"):
                p.copy_(0.3 + 1.2 * torch.rand(p.shape, generator=g))
            elif any(k in name for k in ("position_embedding", "class_embedding", "cls_token", "mask_token",
                                         "register_tokens", "probe")):
                p.copy_(noise)
            else:
                p.add_(0.15 * noise)
    return model.eval()


def _save(model, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return folder


def _apply(module, params, *args, **kw):
    """One jit per call site: the outputs of ``module`` as numpy."""
    fn = jax.jit(functools.partial(module.apply, **kw))
    return jax.tree_util.tree_map(np.asarray, fn({"params": params}, *args))


def _compare(report, name, ours, ref: dict):
    """``ref``: transformers' hidden_states / last_hidden_state / pooler_output / *_embeds."""
    hs, ref_hs = ours.hidden_states, ref["hidden_states"]
    assert len(hs) == len(ref_hs), f"{name}: {len(hs)} hidden states, transformers has {len(ref_hs)}"
    report(f"{name} hidden_states x{len(hs)}", max(max_abs(a, b) for a, b in zip(hs, ref_hs)), TOL)
    for key in ("last_hidden_state", "pooler_output", "text_embeds", "image_embeds"):
        if key in ref:
            report(f"{name} {key}", max_abs(getattr(ours, key), ref[key]), TOL)
    for key in ("text_embeds", "image_embeds"):
        if hasattr(ours, key) and key not in ref:
            assert getattr(ours, key) is None, f"{name}: {key} without a projection"


def _check_bf16(name, spec, config, params, ref: dict, *args, **kw):
    """dtype=bfloat16 runs in bfloat16 on the float32 parameters and stays near transformers' fp32."""
    ours = _apply(spec.build(config, jnp.bfloat16), params, *args, **kw)
    assert ours.last_hidden_state.dtype == jnp.bfloat16
    err = max_abs(ours.pooler_output.astype(np.float32), ref["pooler_output"])
    scale = float(np.abs(ref["pooler_output"]).max())
    print(f"\n[bf16] {name} pooler_output: max abs error {err:.3e} (max |value| {scale:.2f})")
    assert err < 0.05 * scale


def _np(t):
    return t.detach().numpy()


def _ref(out, **extra):
    ref = {"hidden_states": [_np(h) for h in out.hidden_states], "last_hidden_state": _np(out.last_hidden_state)}
    if getattr(out, "pooler_output", None) is not None:
        ref["pooler_output"] = _np(out.pooler_output)
    return {**ref, **{k: _np(v) for k, v in extra.items()}}


# ----------------------------------------------------------------------------------------------
# CLIP text

TEXT = {
    # SD-1.5's CLIP-L: quick_gelu, legacy eos_token_id 2 (pooled at the largest id).
    "clip_l_legacy_eos": (tr.CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=2)),
    # Non-legacy eos id: pooled at its first occurrence; with a padding mask.
    "clip_l_eos_id": (tr.CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=7)),
    # SDXL's OpenCLIP bigG: gelu and text_projection.
    "bigg_projection": (tr.CLIPTextModelWithProjection, dict(hidden_act="gelu", eos_token_id=2, projection_dim=24)),
}


def _token_ids():
    ids = np.random.default_rng(0).integers(8, 99, size=(2, 12))
    ids[0, [4, 9]] = 7  # eos id 7 twice in row 0: the first one is pooled, larger ids come after
    ids[1, 6] = 7
    ids[1, 7:] = 0  # padding after eos in row 1
    return ids


@pytest.mark.parametrize("case", sorted(TEXT))
def test_clip_text(case, report, tmp_path_factory):
    cls, kw = TEXT[case]
    torch.manual_seed(0)
    model = _randomise(cls(tr.CLIPTextConfig(**TOKENS, **TINY, **kw)))
    module, params, config = load_pretrained(_save(model, tmp_path_factory, case), CLIP_TEXT)
    assert config.with_projection == (cls is tr.CLIPTextModelWithProjection)
    ids = _token_ids()
    mask = (np.arange(12)[None] < np.array([[12], [7]])).astype(np.int32) if case == "clip_l_eos_id" else None
    t_ids, t_mask = torch.tensor(ids), None if mask is None else torch.tensor(mask)
    with torch.no_grad():
        tower = model.text_model if config.with_projection else model
        out = tower(t_ids, attention_mask=t_mask, output_hidden_states=True)
        extra = {"text_embeds": model(t_ids, attention_mask=t_mask).text_embeds} if config.with_projection else {}
    if kw["eos_token_id"] != 2:  # the rule is exercised: argmax of ids would pool elsewhere
        assert (ids.argmax(-1) != (ids == 7).argmax(-1)).any()
    ours = _apply(module, params, ids, mask)
    _compare(report, case, ours, _ref(out, **extra))


# ----------------------------------------------------------------------------------------------
# CLIP vision and the full CLIPModel folder


def _pixels(h, w, seed=1):
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)
    return x, x.transpose(0, 2, 3, 1)  # torch NCHW, ours NHWC


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(**TINY_VISION, projection_dim=24)))
    return model, load_pretrained(_save(model, tmp_path_factory, "clip_vision"), CLIP_VISION)


@pytest.mark.parametrize("size", [(16, 16), (24, 20)])
def test_clip_vision(clip_vision, size, report):
    model, (module, params, config) = clip_vision
    assert config.with_projection
    interp = size != (16, 16)
    x_t, x = _pixels(*size)
    with torch.no_grad():
        out = model.vision_model(torch.tensor(x_t), interpolate_pos_encoding=interp, output_hidden_states=True)
        embeds = model(torch.tensor(x_t), interpolate_pos_encoding=interp).image_embeds
    ours = _apply(module, params, x, interpolate_pos_encoding=interp)
    _compare(report, f"clip_vision {size[0]}x{size[1]}", ours, _ref(out, image_embeds=embeds))


def test_clip_full_model_towers(report, tmp_path_factory, caplog):
    """Both towers load from one CLIPModel folder; the other tower's tensors are skipped and logged."""
    torch.manual_seed(0)
    cfg = tr.CLIPConfig(text_config=dict(TINY, **TOKENS, eos_token_id=2),
                        vision_config=TINY_VISION, projection_dim=24)
    model = _randomise(tr.CLIPModel(cfg))
    folder = _save(model, tmp_path_factory, "clip_full")
    with caplog.at_level(logging.INFO, logger="customjax.weights.convert"):
        text, text_params, text_cfg = load_pretrained(folder, CLIP_TEXT)
        vision, vision_params, vision_cfg = load_pretrained(folder, CLIP_VISION)
    assert "vision_model.embeddings.class_embedding" in caplog.text and "logit_scale" in caplog.text
    assert text_cfg.with_projection and vision_cfg.with_projection and text_cfg.projection_dim == 24
    ids, (x_t, x) = _token_ids(), _pixels(16, 16)
    with torch.no_grad():
        t = model.text_model(torch.tensor(ids), output_hidden_states=True)
        v = model.vision_model(torch.tensor(x_t), output_hidden_states=True)
        t_ref = _ref(t, text_embeds=model.text_projection(t.pooler_output))
        v_ref = _ref(v, image_embeds=model.visual_projection(v.pooler_output))
    _compare(report, "clip_full text", _apply(text, text_params, ids), t_ref)
    _compare(report, "clip_full vision", _apply(vision, vision_params, x), v_ref)


# ----------------------------------------------------------------------------------------------
# SigLIP

SIGLIP_VISION_CFG = dict(TINY_VISION, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def test_siglip_vision(report, tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(tr.SiglipVisionModel(tr.SiglipVisionConfig(**SIGLIP_VISION_CFG)))
    module, params, config = load_pretrained(_save(model, tmp_path_factory, "siglip_vision"), SIGLIP_VISION)
    assert config.vision_use_head
    x_t, x = _pixels(16, 16)
    with torch.no_grad():
        out = model(torch.tensor(x_t), output_hidden_states=True)
    ours = _apply(module, params, x)
    assert ours.hidden_states[0].shape == (2, 16, 32)  # no CLS token
    _compare(report, "siglip_vision", ours, _ref(out))
    _check_bf16("siglip_vision", SIGLIP_VISION, config, params, _ref(out), x)


def test_siglip_vision_from_full_model(report, tmp_path_factory, caplog):
    torch.manual_seed(0)
    cfg = tr.SiglipConfig(text_config=dict(TINY, **TOKENS, eos_token_id=2),
                          vision_config=SIGLIP_VISION_CFG)
    model = _randomise(tr.SiglipModel(cfg))
    with caplog.at_level(logging.INFO, logger="customjax.weights.convert"):
        module, params, config = load_pretrained(_save(model, tmp_path_factory, "siglip_full"), SIGLIP_VISION)
    assert "text_model.embeddings.token_embedding.weight" in caplog.text and "logit_bias" in caplog.text
    assert config.hidden_size == 32 and config.image_size == 16
    x_t, x = _pixels(16, 16)
    with torch.no_grad():
        out = model.vision_model(torch.tensor(x_t), output_hidden_states=True)
    _compare(report, "siglip_full vision", _apply(module, params, x), _ref(out))


# ----------------------------------------------------------------------------------------------
# DINOv2

DINO = {
    "plain": (tr.Dinov2Model, tr.Dinov2Config, dict(layerscale_value=0.5)),
    "registers": (tr.Dinov2WithRegistersModel, tr.Dinov2WithRegistersConfig,
                  dict(layerscale_value=0.5, num_register_tokens=3)),
    "swiglu_nobias": (tr.Dinov2Model, tr.Dinov2Config, dict(use_swiglu_ffn=True, qkv_bias=False)),
}


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """variant -> (torch model, load_pretrained result), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            model_cls, cfg_cls, kw = DINO[name]
            torch.manual_seed(0)
            cfg = {k: v for k, v in TINY_VISION.items() if k != "intermediate_size"}  # DINOv2 uses mlp_ratio
            model = _randomise(model_cls(cfg_cls(**cfg, **kw)))
            cache[name] = model, load_pretrained(_save(model, tmp_path_factory, f"dino_{name}"), DINOV2)
        return cache[name]
    return get


# (16, 16) is the pretraining size (run with masked patches: the mask token is a loaded parameter);
# (24, 20) upsamples the 4x4 position grid to 6x5, (8, 12) shrinks it to 2x3 (antialiased with registers).
@pytest.mark.parametrize("name,size", [("plain", (16, 16)), ("plain", (24, 20)), ("registers", (16, 16)),
                                       ("registers", (24, 20)), ("registers", (8, 12)),
                                       ("swiglu_nobias", (16, 16))])
def test_dinov2(dino, name, size, report):
    model, (module, params, config) = dino(name)
    assert config.num_register_tokens == (3 if name == "registers" else 0)
    assert config.interpolate_antialias == (name == "registers")
    x_t, x = _pixels(*size)
    masked = np.random.default_rng(2).random((2, 16)) < 0.3 if size == (16, 16) else None
    with torch.no_grad():
        out = model(torch.tensor(x_t), bool_masked_pos=None if masked is None else torch.tensor(masked),
                    output_hidden_states=True)
    ours = _apply(module, params, x, masked)
    label = f"dinov2 {name} {size[0]}x{size[1]}{' masked' if masked is not None else ''}"
    _compare(report, label, ours, _ref(out))
    if (name, size) == ("registers", (24, 20)):
        _check_bf16(label, DINOV2, config, params, _ref(out), x)


def test_vit_dino_v1(tmp_path_factory, report):
    """transformers' ViTModel (DINO v1, DreamBench's DINO-I encoder) with its pooler: every hidden state at
    the model's size and with interpolated positions (24 x 20 px); the pooler's tensors are skipped (logged)."""
    from customjax.models.vit import VIT
    torch.manual_seed(0)
    model = _randomise(tr.ViTModel(tr.ViTConfig(**TINY_VISION), add_pooling_layer=True))
    module, params, config = load_pretrained(_save(model, tmp_path_factory, "vit"), VIT)
    for size, interp in (((16, 16), False), ((24, 20), True)):
        x_t, x = _pixels(*size)
        with torch.no_grad():
            out = model(torch.tensor(x_t), output_hidden_states=True, interpolate_pos_encoding=interp)
        ours = _apply(module, params, x, interpolate_pos_encoding=interp)
        ref = _ref(out)
        ref["pooler_output"] = ref["last_hidden_state"][:, 0]     # ours: the normed CLS token (DINO-I's embedding)
        _compare(report, f"vit {size[0]}x{size[1]}", ours, ref)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        module.apply({"params": params}, jnp.zeros((1, 24, 20, 3)))


def test_vit_dino_vits16_at_its_real_size():
    """facebook/dino-vits16's published config: our abstract parameter tree has transformers' parameter count
    (without the pooler DINO-I does not use) and the real 224 px input traces to 197 tokens of 384."""
    from customjax.models.vit import VIT, ViTConfig
    from customjax.weights.loaders import count_params, param_shapes

    published = dict(model_type="vit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     intermediate_size=1536, image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12,
                     hidden_act="gelu", architectures=["ViTModel"])
    config = ViTConfig.from_dict(published)
    ref = tr.ViTModel(tr.ViTConfig(**{k: v for k, v in published.items() if k != "model_type"}), add_pooling_layer=False)
    assert count_params(param_shapes(VIT, config)) == sum(p.numel() for p in ref.parameters())
    out = jax.eval_shape(lambda p, x: VIT.build(config, jnp.float32).apply({"params": p}, x),
                         param_shapes(VIT, config), jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.pooler_output.shape == (2, 384) and out.last_hidden_state.shape == (2, 197, 384)


# ----------------------------------------------------------------------------------------------
# Bicubic kernels and config handling


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matches_torch(antialias, report):
    """The position-embedding resize against torch's F.interpolate, by size and by scale factor
    (the original DINOv2 code passes ``scale_factor=(grid + 0.1) / sqrt(N)``). Each case must agree
    with torch's float32 result about as well as torch's float32 agrees with its own float64."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for n_in, n_out in [(4, 6), (4, 3), (27, 37), (37, 27), (16, 16), (7, 13), (5, 2)]:
        x = rng.standard_normal((1, 3, n_in, n_in))
        for sf in (None, (n_out + 0.1) / n_in):
            kw = dict(size=(n_out, n_out)) if sf is None else dict(scale_factor=(sf, sf))
            ref32, ref64 = (torch.nn.functional.interpolate(torch.tensor(x, dtype=dt), mode="bicubic",
                                                            align_corners=False, antialias=antialias, **kw)
                            .numpy()[0].transpose(1, 2, 0) for dt in (torch.float32, torch.float64))
            ours = vit.resize_bicubic(x[0].transpose(1, 2, 0).astype(np.float32), (n_out, n_out),
                                      scale_factor=None if sf is None else (sf, sf), antialias=antialias)
            err, noise = max_abs(ours, ref32), max_abs(ref32, ref64)
            assert err <= 2 * noise + 1e-6, \
                f"{n_in}->{n_out} scale_factor={sf}: {err:.2e} (torch's own fp32 noise {noise:.2e})"
            worst = max(worst, err)
            if antialias:  # the antialiased weights are exact: float64 agrees to rounding
                m = bicubic_matrix(n_in, n_out, scale_factor=sf, antialias=True)
                assert max_abs(np.einsum("oh,pw,chw->opc", m, m, x[0]), ref64) < 1e-12
    report(f"bicubic resize antialias={antialias}", worst, 2e-5)
    assert np.allclose(bicubic_matrix(5, 5), np.eye(5))


def test_config_errors(caplog):
    with pytest.raises(ValueError, match="hidden_act='relu6'"):
        CLIPTextConfig.from_dict({"model_type": "clip_text_model", "hidden_act": "relu6"})
    with pytest.raises(ValueError, match="model_type='dinov2'"):
        CLIPTextConfig.from_dict({"model_type": "dinov2"})
    with pytest.raises(ValueError, match="image_size=\\[16, 24\\]"):
        Dinov2Config.from_dict({"model_type": "dinov2", "image_size": [16, 24]})
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        vit.SiglipVisionConfig.from_dict({"hidden_size": 32, "num_attention_heads": 5})
    with caplog.at_level(logging.WARNING, logger=clip_text.__name__):
        cfg = Dinov2Config.from_dict({"model_type": "dinov2", "hidden_size": 48, "new_knob": 1,
                                      "out_indices": [2], "drop_path_rate": 0.1})
    assert "new_knob" in caplog.text and "out_indices" not in caplog.text and cfg.hidden_size == 48
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        module = vit.CLIPVisionModel(vit.CLIPVisionConfig(**TINY_VISION))
        jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 20, 20, 3), np.float32))

