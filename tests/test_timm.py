"""timm / open_clip checkpoints of the reference encoders (customjax.weights.timm) and
``load_vision_encoder``.

timm itself needs torchvision at import, which the test environment does not install, so the
always-run tests build timm-layout state dicts from tiny randomised transformers models by a
mapping written here by hand (independent of the loader's), save them as .safetensors / .pth /
open_clip .bin, load them and compare every hidden state, the last hidden state and the pooled
output with transformers' in float32 to TOL = 1e-4 absolute. Against timm itself (1.0.31, tiny
models of both families, forward_features / forward_intermediates / the attention-pool head, and
the 518 -> 384 position resampling at load) the loader was checked once outside CI (worst error
1.9e-5; docs/encoders.md).
"""

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_encoders import TOL, _apply, _compare, _pixels, _randomise, _ref, _save  # noqa: E402

from customjax.models.vit import Dinov2Config, SiglipVisionConfig  # noqa: E402
from customjax.weights import timm as T  # noqa: E402
from customjax.weights.convert import WeightMismatchError  # noqa: E402

assert TOL == 1e-4
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
# The tables' architectures at a tiny width: exact GELU and eps 1e-6 as timm's.
SIGLIP_CFG = SiglipVisionConfig(**SMALL, intermediate_size=64, image_size=384, hidden_act="gelu", layer_norm_eps=1e-6)
DINO_CFG = Dinov2Config(**SMALL, image_size=518, num_register_tokens=4, interpolate_antialias=True,
                        use_mask_token=False)


def _t(x):
    return x.detach().clone().contiguous()


def _siglip_to_timm(model) -> dict:
    """transformers SiglipVisionModel -> timm ``vit_*_siglip`` keys, by hand."""
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    out = {"pos_embed": sd["embeddings.position_embedding.weight"][None],
           "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
           "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"],
           "attn_pool.latent": sd["head.probe"]}
    d = sd["head.probe"].shape[-1]
    for leaf in ("weight", "bias"):
        out[f"attn_pool.q.{leaf}"] = sd[f"head.attention.in_proj_{leaf}"][:d]
        out[f"attn_pool.kv.{leaf}"] = sd[f"head.attention.in_proj_{leaf}"][d:]
        out[f"attn_pool.proj.{leaf}"] = sd[f"head.attention.out_proj.{leaf}"]
        out[f"attn_pool.norm.{leaf}"] = sd[f"head.layernorm.{leaf}"]
        out[f"attn_pool.mlp.fc1.{leaf}"] = sd[f"head.mlp.fc1.{leaf}"]
        out[f"attn_pool.mlp.fc2.{leaf}"] = sd[f"head.mlp.fc2.{leaf}"]
        for j in range(model.config.num_hidden_layers):
            s = f"encoder.layers.{j}."
            out[f"blocks.{j}.norm1.{leaf}"] = sd[s + f"layer_norm1.{leaf}"]
            out[f"blocks.{j}.norm2.{leaf}"] = sd[s + f"layer_norm2.{leaf}"]
            out[f"blocks.{j}.attn.qkv.{leaf}"] = torch.cat([sd[s + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out[f"blocks.{j}.attn.proj.{leaf}"] = sd[s + f"self_attn.out_proj.{leaf}"]
            out[f"blocks.{j}.mlp.fc1.{leaf}"] = sd[s + f"mlp.fc1.{leaf}"]
            out[f"blocks.{j}.mlp.fc2.{leaf}"] = sd[s + f"mlp.fc2.{leaf}"]
    return {k: _t(v) for k, v in out.items()}


def _dino_to_timm(model, meta: bool = False) -> dict:
    """transformers Dinov2WithRegistersModel (its module names: ``attention.{q,k,v,o}_proj``) -> timm
    ``vit_*_reg4_dinov2`` keys, by hand: the class
    position folded into ``cls_token`` and ``pos_embed`` the patch grid alone (timm's no_embed_class),
    ``reg_token``, no ``mask_token``; ``meta``: Meta's original layout (``pos_embed`` with the class
    position, ``register_tokens``, ``mask_token``)."""
    sd = model.state_dict()
    pos = sd["embeddings.position_embeddings"]
    out = {"patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if meta:
        out.update({"cls_token": sd["embeddings.cls_token"], "pos_embed": pos,
                    "register_tokens": sd["embeddings.register_tokens"], "mask_token": sd["embeddings.mask_token"]})
    else:
        out.update({"cls_token": sd["embeddings.cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:],
                    "reg_token": sd["embeddings.register_tokens"]})
    for j in range(model.config.num_hidden_layers):
        s = f"encoder.layer.{j}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{j}.norm1.{leaf}"] = sd[s + f"norm1.{leaf}"]
            out[f"blocks.{j}.norm2.{leaf}"] = sd[s + f"norm2.{leaf}"]
            out[f"blocks.{j}.attn.qkv.{leaf}"] = torch.cat([sd[s + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
            out[f"blocks.{j}.attn.proj.{leaf}"] = sd[s + f"attention.o_proj.{leaf}"]
            out[f"blocks.{j}.mlp.fc1.{leaf}"] = sd[s + f"mlp.fc1.{leaf}"]
            out[f"blocks.{j}.mlp.fc2.{leaf}"] = sd[s + f"mlp.fc2.{leaf}"]
        out[f"blocks.{j}.ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
        out[f"blocks.{j}.ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
    return {k: _t(v) for k, v in out.items()}


def _write(state: dict, folder, fmt: str):
    """``state`` as timm's model.safetensors, a .pth file, or open_clip's .bin (the trunk under
    ``visual.trunk.``, a text tower and logit scale / bias beside it) with its open_clip_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        path = folder / "model.safetensors"
        safetensors_torch.save_file(state, str(path))
    elif fmt == "pth":
        path = folder / "weights.pth"
        torch.save(state, path)
    else:
        path = folder / "open_clip_pytorch_model.bin"
        text = {"text.token_embedding.weight": torch.randn(50, 8), "text.ln_final.weight": torch.ones(8),
                "logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-10.0)}
        torch.save({**{"visual.trunk." + k: v for k, v in state.items()}, **text}, path)
        cfg = {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_so400m_patch14_siglip_384"}}}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tr.SiglipVisionConfig(**SMALL, intermediate_size=64, image_size=384, hidden_act="gelu", layer_norm_eps=1e-6)
    model = _randomise(tr.SiglipVisionModel(cfg))
    return model, _siglip_to_timm(model), tmp_path_factory.mktemp("timm_siglip")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tr.Dinov2WithRegistersConfig(**SMALL, image_size=518, num_register_tokens=4, layerscale_value=0.5)
    model = _randomise(tr.Dinov2WithRegistersModel(cfg))
    return model, tmp_path_factory.mktemp("timm_dino")


def _torch_ref(model, size):
    x_t, x = _pixels(size, size)
    with torch.no_grad():
        return _ref(model(torch.tensor(x_t), output_hidden_states=True)), x


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "open_clip"])
def test_siglip_timm(siglip, fmt, report, caplog):
    model, state, tmp = siglip
    path = _write(state, tmp / fmt, fmt)
    with caplog.at_level(logging.INFO, logger=T.__name__):
        # open_clip: the folder (its open_clip_config.json names the architecture); else the file
        module, params = T.load_timm(path.parent if fmt == "open_clip" else path, "siglip", config=SIGLIP_CFG)
    if fmt == "open_clip":
        assert "text.token_embedding.weight" in caplog.text and "logit_bias" in caplog.text
    ref, x = _torch_ref(model, 384)
    ours = _apply(module, params, x)
    assert ours.last_hidden_state.shape == (2, 729, 32)
    _compare(report, f"timm siglip ({fmt}) 384px", ours, ref)


@pytest.mark.parametrize("layout,size", [("timm", 518), ("timm", 384), ("meta", 384)])
def test_dinov2_reg4_timm(dino, layout, size, report):
    """timm's reg4 layout at its own 518 px and at 384 px (37 x 37 -> 27 x 27, antialiased bicubic, as
    timm resamples it at img_size=384); Meta's original layout (with mask_token) too."""
    model, tmp = dino
    fmt = "pth" if layout == "meta" else "safetensors"
    path = _write(_dino_to_timm(model, meta=layout == "meta"), tmp / f"{layout}_{size}", fmt)
    module, params = T.load_timm(path, "dino", config=DINO_CFG)
    assert module.config.use_mask_token == (layout == "meta")
    if layout == "timm":   # the class position is zero: timm folded it into cls_token
        np.testing.assert_array_equal(np.asarray(params["embeddings"]["position_embeddings"][0, 0]), 0.0)
    ref, x = _torch_ref(model, size)
    ours = _apply(module, params, x)
    assert ours.last_hidden_state.shape == (2, 1 + 4 + (size // 14) ** 2, 32)
    _compare(report, f"timm dinov2 reg4 ({layout}) {size}px", ours, ref)


# ----------------------------------------------------------------------------------------------
# Refusals


def test_timm_errors(siglip, dino, tmp_path):
    s_model, s_state, _ = siglip
    d_model, _ = dino
    d_state = _dino_to_timm(d_model)
    # registers: a reg4 file into a register-free config, and a register-free file into a reg4 config
    with pytest.raises(ValueError, match=r"has 4 register tokens \(reg_token \(1, 4, 32\)\) and the config has 0"):
        T.timm_config(d_state, "dino", "f", config=Dinov2Config(**SMALL, image_size=518))
    no_reg = {k: v for k, v in d_state.items() if k != "reg_token"}
    with pytest.raises(ValueError, match="has 0 register tokens and the config has 4"):
        T.timm_config(no_reg, "dino", "f", config=DINO_CFG)
    # the wrong family
    with pytest.raises(ValueError, match="DINOv2 .* asked to load as 'siglip'"):
        T.timm_config(d_state, "siglip", "f", config=SIGLIP_CFG)
    with pytest.raises(ValueError, match="no timm CLIP"):
        T.timm_config(s_state, "clip", "f")
    # the full-size table refuses a tiny file, naming what differs
    with pytest.raises(ValueError, match=r"hidden 32 \(expected 1152\), blocks 2 \(expected 27\).*"
                                         r"vit_so400m_patch14_siglip_384"):
        T.timm_config(s_state, "siglip", "f")
    # key-level strictness names the timm keys
    bad = dict(s_state, **{"blocks.1.attn.qkv.weight": torch.zeros(96, 31), "blocks.0.extra": torch.zeros(1)})
    del bad["attn_pool.kv.bias"]
    with pytest.raises(WeightMismatchError) as e:
        T.convert_timm(bad, "siglip", SIGLIP_CFG, "f")
    msg = str(e.value)
    assert "'blocks.1.attn.qkv.weight': expected (96, 32), found (96, 31)" in msg
    assert "missing: 'attn_pool.kv.bias'" in msg and "unexpected: 'blocks.0.extra'" in msg
    # an open_clip visual tensor outside the trunk (a projection head) has no place in the model
    with pytest.raises(WeightMismatchError, match="visual.head.proj.weight"):
        T.timm_state({"visual.trunk.pos_embed": 0, "visual.head.proj.weight": 0}, "f")
    # a folder declaring another timm architecture
    folder = tmp_path / "declared"
    _write(s_state, folder, "safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_siglip_224"}))
    with pytest.raises(ValueError, match="'vit_base_patch16_siglip_224' is not one this loader knows"):
        T.load_vision_encoder(folder, "siglip")


def test_full_size_table():
    """The table's two configs against the released checkpoints' shapes (zero-stride arrays: nothing
    is allocated): timm's DINOv2-L reg4 (37 x 37 pos_embed, no class position) and so400m-384."""
    def fake(shapes):
        return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}

    for arch, (kind, cfg) in T.TIMM_MODELS.items():
        shapes = T._expected(kind, cfg, {})
        assert T.timm_config(fake(shapes), kind, arch) == cfg
    dino = T._expected("dino", T.TIMM_MODELS["vit_large_patch14_reg4_dinov2"][1], {})
    assert dino["pos_embed"] == (1, 1369, 1024) and dino["reg_token"] == (1, 4, 1024) and "mask_token" not in dino
    assert dino["blocks.23.mlp.fc1.weight"] == (4096, 1024) and dino["blocks.0.ls2.gamma"] == (1024,)
    siglip = T._expected("siglip", T.TIMM_MODELS["vit_so400m_patch14_siglip_384"][1], {})
    assert siglip["pos_embed"] == (1, 729, 1152) and siglip["blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert siglip["attn_pool.kv.weight"] == (2304, 1152) and len(siglip) == 2 + 2 + 27 * 12 + 13 + 1


# ----------------------------------------------------------------------------------------------
# load_vision_encoder


def test_load_vision_encoder_folders(dino, tmp_path_factory, report):
    """Hugging Face folders go through load_pretrained; DINOv2 register tokens must match the config."""
    torch.manual_seed(0)
    clip = _randomise(tr.CLIPVisionModel(tr.CLIPVisionConfig(**SMALL, intermediate_size=64, image_size=224)))
    module, params = T.load_vision_encoder(_save(clip, tmp_path_factory, "hf_clip"), "clip")
    ref, x = _torch_ref(clip, 224)
    _compare(report, "load_vision_encoder clip 224px", _apply(module, params, x), ref)

    siglip = _randomise(tr.SiglipVisionModel(tr.SiglipVisionConfig(**SMALL, intermediate_size=64, image_size=384)))
    module, params = T.load_vision_encoder(_save(siglip, tmp_path_factory, "hf_siglip"), "siglip")
    assert module.config.hidden_act == "gelu_pytorch_tanh"   # transformers' SigLIP, unlike timm's
    ref, x = _torch_ref(siglip, 384)
    _compare(report, "load_vision_encoder siglip 384px", _apply(module, params, x), ref)

    model, _ = dino
    folder = _save(model, tmp_path_factory, "hf_dino_reg4")
    module, params = T.load_vision_encoder(folder, "dino")
    assert module.config.num_register_tokens == 4 and module.config.image_size == 518
    ref, x = _torch_ref(model, 384)
    _compare(report, "load_vision_encoder dinov2 reg4 384px", _apply(module, params, x), ref)
    # the same weights under a register-free config: one clear error
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="dinov2", num_register_tokens=0, architectures=["Dinov2Model"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has 4 register tokens \(embeddings.register_tokens \(1, 4, 32\)\) "
                                         r"and the config \(model_type 'dinov2'\) has 0"):
        T.load_vision_encoder(folder, "dino")
    # and the reverse: a plain DINOv2's weights under a config with registers
    plain = _randomise(tr.Dinov2Model(tr.Dinov2Config(**SMALL, image_size=518)))
    folder = _save(plain, tmp_path_factory, "hf_dino_plain")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="dinov2_with_registers", num_register_tokens=4)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has 0 register tokens and the config .* has 4"):
        T.load_vision_encoder(folder, "dino")
    with pytest.raises(ValueError, match="kind 'dinov2'"):
        T.load_vision_encoder(folder, "dinov2")


def test_load_vision_encoder_timm_file(siglip, dino):
    """A timm file or timm hub folder goes to load_timm with the table (a tiny file is refused by it)."""
    _, s_state, tmp = siglip
    model, _ = dino
    folder = tmp / "hub"
    _write(_dino_to_timm(model), folder, "safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_reg4_dinov2",
                                                    "num_classes": 0}))
    assert T.is_timm(folder) and T.is_timm(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"hidden 32 \(expected 1024\).*timm vit_large_patch14_reg4_dinov2"):
        T.load_vision_encoder(folder, "dino")
    with pytest.raises(ValueError, match="asked to load as 'siglip'"):
        T.load_vision_encoder(folder / "model.safetensors", "siglip")
