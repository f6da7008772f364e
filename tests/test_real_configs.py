"""The published architectures (``customjax/weights/published_configs``) through our config
classes, built abstractly at the real sizes, and the random-weight folder writer of
``benchmarks/real_size_folders.py`` checked against diffusers / transformers on small copies.

Parameter counts are compared three ways: our abstract build (``jax.eval_shape``), the PyTorch
model of diffusers / transformers built on the meta device from the same JSON (nothing allocated),
and the known figure in :data:`real_sizes.PARAMS`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from customjax.models.clip_text import clip_text_spec
from customjax.models.unet import UNET
from customjax.models.vae import VAE
from customjax.models.vit import DINOV2, SIGLIP_VISION, clip_vision_spec
from customjax.pipeline import load_stable_diffusion
from customjax.weights.folder import WeightsNotFoundError
from customjax.weights.loaders import count_params, load_pretrained
from real_sizes import PARAMS, config_folder

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("real_size_folders", ROOT / "benchmarks" / "real_size_folders.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Abstract builds at the real sizes


def _diffusers(cls_name):
    def build(folder):
        import diffusers
        cls = getattr(diffusers, cls_name)
        return cls.from_config(cls.load_config(folder))
    return build


def _transformers(cls_name, config_cls=None, tower=None):
    def build(folder):
        import transformers
        cfg = getattr(transformers, config_cls or "AutoConfig").from_pretrained(folder)
        if tower:
            cfg = getattr(cfg, tower)
        cls = getattr(transformers, cls_name)
        return cls(cfg) if cls_name != "AutoModel" else cls.from_config(cfg)
    return build


# (name, folder under published_configs, our spec, PyTorch builder, key of the known count)
COMPONENTS = [
    ("sd15-unet", ("sd15", "unet"), UNET, _diffusers("UNet2DConditionModel"), "sd15/unet"),
    ("sd15-vae", ("sd15", "vae"), VAE, _diffusers("AutoencoderKL"), "vae"),
    ("sd15-text", ("sd15", "text_encoder"), clip_text_spec(), _transformers("CLIPTextModel"), "clip_l_text"),
    ("sd21-unet", ("sd21", "unet"), UNET, _diffusers("UNet2DConditionModel"), "sd21/unet"),
    ("sd21-vae", ("sd21", "vae"), VAE, _diffusers("AutoencoderKL"), "vae"),
    ("sd21-text", ("sd21", "text_encoder"), clip_text_spec(), _transformers("CLIPTextModel"), "openclip_h_text"),
    ("sdxl-unet", ("sdxl", "unet"), UNET, _diffusers("UNet2DConditionModel"), "sdxl/unet"),
    ("sdxl-vae", ("sdxl", "vae"), VAE, _diffusers("AutoencoderKL"), "vae"),
    ("sdxl-text", ("sdxl", "text_encoder"), clip_text_spec(), _transformers("CLIPTextModel"), "clip_l_text"),
    ("sdxl-text2", ("sdxl", "text_encoder_2"), clip_text_spec(True),
     _transformers("CLIPTextModelWithProjection"), "openclip_bigg_text_proj"),
    ("siglip", ("siglip", None), SIGLIP_VISION,
     _transformers("SiglipVisionModel", "SiglipConfig", "vision_config"), "siglip_vision"),
    ("dino", ("dino", None), DINOV2, _transformers("AutoModel"), "dino"),
    ("clip_l-vision", ("clip_l", None), clip_vision_spec(False),
     _transformers("CLIPVisionModel", "CLIPConfig", "vision_config"), "clip_l_vision"),
    ("ip-image-encoder", ("ip_adapter_image_encoder", None), clip_vision_spec(None),
     _transformers("CLIPVisionModelWithProjection", "CLIPVisionConfig"), "ip_adapter_image_encoder"),
]


@pytest.mark.parametrize("name,where,spec,torch_build,known", COMPONENTS, ids=[c[0] for c in COMPONENTS])
def test_published_config_builds_abstractly_with_the_pytorch_parameter_count(name, where, spec, torch_build, known):
    folder = config_folder(where[0]) / where[1] if where[1] else config_folder(where[0])
    module, params, config = load_pretrained(folder, spec, abstract=True)
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(l, jax.ShapeDtypeStruct) and l.dtype == np.float32 for l in leaves)
    ours = count_params(params)
    with torch.device("meta"):
        theirs = _torch_count(torch_build(folder))
    assert ours == theirs == PARAMS[known], (name, ours, theirs, PARAMS[known])


def test_published_configs_read_as_published():
    """Spot checks that the configs say what the published models are."""
    unet21 = json.loads((config_folder("sd21") / "unet" / "config.json").read_text())
    assert unet21["attention_head_dim"] == [5, 10, 20, 20] and unet21["use_linear_projection"] is True
    assert unet21["sample_size"] == 96 and unet21["cross_attention_dim"] == 1024
    sched21 = json.loads((config_folder("sd21") / "scheduler" / "scheduler_config.json").read_text())
    assert sched21["prediction_type"] == "v_prediction"
    te21 = json.loads((config_folder("sd21") / "text_encoder" / "config.json").read_text())
    assert (te21["hidden_size"], te21["num_hidden_layers"], te21["hidden_act"]) == (1024, 23, "gelu")
    xl = json.loads((config_folder("sdxl") / "unet" / "config.json").read_text())
    assert xl["transformer_layers_per_block"] == [1, 2, 10] and xl["projection_class_embeddings_input_dim"] == 2816
    ip = json.loads((config_folder("ip_adapter_image_encoder") / "config.json").read_text())
    assert (ip["hidden_size"], ip["num_hidden_layers"], ip["projection_dim"]) == (1280, 32, 1024)
    for name in ("sd15", "sd21", "sdxl", "siglip", "dino", "clip_l", "ip_adapter_image_encoder"):
        assert config_folder(name).is_dir()
    with pytest.raises(KeyError):
        config_folder("sd3")


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_pipeline_loads_abstractly_from_the_config_folder(name):
    pipe, params = load_stable_diffusion(config_folder(name), abstract=True)
    assert count_params(params["unet"]) == PARAMS[f"{name}/unet"]
    assert count_params(params["vae"]) == PARAMS["vae"]
    want_text = {"sd15": ["clip_l_text"], "sd21": ["openclip_h_text"],
                 "sdxl": ["clip_l_text", "openclip_bigg_text_proj"]}[name]
    assert [count_params(p) for p in params["text_encoders"]] == [PARAMS[k] for k in want_text]
    assert pipe.is_sdxl == (name == "sdxl")
    assert pipe.schedule.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
    assert pipe.unet.config.cross_attention_dim[0] == {"sd15": 768, "sd21": 1024, "sdxl": 2048}[name]
    assert pipe.vae_scale == 8
    # no tokenizer folder: the character-level stand-in, 77 tokens; SDXL's second pads with "!"
    assert [t.model_max_length for t in pipe.tokenizers] == [77] * len(want_text)
    assert pipe.tokenizers[-1].pad_token == ("!" if name == "sdxl" else "<|endoftext|>")
    # the same folder without abstract needs weights
    with pytest.raises(WeightsNotFoundError):
        load_stable_diffusion(config_folder(name))


def test_abstract_pipeline_uses_a_tokenizer_folder_when_present(tmp_path):
    import shutil

    from customjax.zoo import write_char_tokenizer

    root = tmp_path / "sd15"
    shutil.copytree(config_folder("sd15"), root)
    write_char_tokenizer(root / "tokenizer", pad="!")
    pipe, _ = load_stable_diffusion(root, abstract=True)
    assert pipe.tokenizers[0].pad_token == "!"


# ----------------------------------------------------------------------------------------------
# Random-weight folders: the real writer on scaled-down copies of the published configs

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
TINY_VISION = dict(TINY_TEXT, image_size=28, patch_size=14)


def _small_configs(what: str) -> dict:
    """The published configs of ``what`` with small widths, every other field as published."""
    c = copy.deepcopy(_script().read_configs(what))
    if what == "sd15":
        c["unet"].update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, layers_per_block=1)
        c["text_encoder"].update(TINY_TEXT, projection_dim=32)
    elif what == "sdxl":
        c["unet"].update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
                         transformer_layers_per_block=[1, 2, 2], layers_per_block=1, addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=32 + 6 * 8)
        c["text_encoder"].update(TINY_TEXT, projection_dim=32)
        c["text_encoder_2"].update(TINY_TEXT, projection_dim=32)
    if what in ("sd15", "sdxl"):
        c["vae"].update(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, sample_size=16)
    elif what == "siglip":
        c["config"]["vision_config"].update(TINY_VISION)
        c["config"]["text_config"].update(TINY_TEXT)
    elif what == "dino":
        c["config"].update(TINY_VISION)
        c["config"].update(stage_names=["stem", "stage1", "stage2"], out_features=["stage2"], out_indices=[2])
    elif what == "clip_l":
        cfg = c["config"]
        cfg["projection_dim"] = 16
        cfg["vision_config"].update(TINY_VISION, projection_dim=16)
        cfg["text_config"].update(TINY_TEXT, projection_dim=16)
        cfg["vision_config_dict"].update(TINY_VISION, projection_dim=16)
        cfg["text_config_dict"].update(TINY_TEXT, projection_dim=16)
    elif what == "ip_image_encoder":
        c["config"].update(TINY_VISION, projection_dim=16)
    return c


def _close(ours, theirs, rel=2e-4):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.isfinite(ours).all() and np.abs(theirs).max() > 0
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err < rel, err


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _no_missing(info, other_tower=()):
    """No key missing, unexpected or of the wrong shape, except the unexpected keys of another
    tower (top-level names ``other_tower``) that the folder also holds."""
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = {k for k in info.get(key) or () if not (key == "unexpected_keys" and k.split(".")[0] in other_tower)}
        assert not bad, (key, sorted(bad)[:8])


@pytest.mark.parametrize("what", ["sd15", "sdxl"])
def test_written_pipeline_loads_in_ours_and_diffusers_with_equal_outputs(what, tmp_path):
    import diffusers
    import transformers

    from customjax.models.unet import dummy_inputs
    from customjax.tokenizer import tokenize

    out = _script().write(what, tmp_path / what, std=0.05, configs=_small_configs(what))
    published = json.loads((config_folder(what) / "unet" / "config.json").read_text())
    assert json.loads((out / "unet" / "config.json").read_text()).keys() == published.keys()
    pipe, params = load_stable_diffusion(out)
    rng = np.random.default_rng(0)

    # text encoders, on the written tokenizer's ids
    ids = tokenize(pipe.tokenizers[0], ["a photo of a dog"])
    for i, name in enumerate(["text_encoder", "text_encoder_2"][:len(pipe.text_encoders)]):
        cls = transformers.CLIPTextModelWithProjection if i == 1 else transformers.CLIPTextModel
        ref, info = cls.from_pretrained(out / name, dtype=torch.float32, output_loading_info=True)
        _no_missing(info)
        with torch.no_grad():
            r = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        o = jax.jit(pipe.text_encoders[i].apply)({"params": params["text_encoders"][i]}, ids)
        _close(o.last_hidden_state, r.last_hidden_state)
        _close(o.hidden_states[-2], r.hidden_states[-2])
        if i == 1:
            _close(o.text_embeds, r.text_embeds)

    # UNet
    ref, info = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    _no_missing(info)
    args = [rng.standard_normal(a.shape).astype(np.float32) for a in dummy_inputs(pipe.unet.config, size=8, text_len=5)]
    args[1] = np.array([321.0], np.float32)
    kw = {}
    if pipe.is_sdxl:
        args[4] = np.array([[64, 64, 0, 0, 64, 64]], np.float32)
        kw["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(args[3]), "time_ids": torch.from_numpy(args[4])}
    o = jax.jit(pipe.unet.apply)({"params": params["unet"]}, *args)
    with torch.no_grad():
        r = ref(_nchw(args[0]), torch.from_numpy(args[1]), torch.from_numpy(args[2]), **kw).sample
    _close(o, r.numpy().transpose(0, 2, 3, 1))

    # VAE
    ref, info = diffusers.AutoencoderKL.from_pretrained(out / "vae", output_loading_info=True)
    _no_missing(info)
    x = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    mean, _ = jax.jit(functools.partial(pipe.vae.apply, method="encode"))({"params": params["vae"]}, x)
    dec = jax.jit(functools.partial(pipe.vae.apply, method="decode"))({"params": params["vae"]}, mean)
    with torch.no_grad():
        r_mean = ref.encode(_nchw(x)).latent_dist.mean
        r_dec = ref.decode(r_mean).sample
    _close(mean, r_mean.numpy().transpose(0, 2, 3, 1))
    _close(dec, r_dec.numpy().transpose(0, 2, 3, 1))

    # the whole folder as a diffusers pipeline (model_index.json, scheduler, tokenizers)
    p = diffusers.DiffusionPipeline.from_pretrained(out)
    want = "StableDiffusionXLPipeline" if what == "sdxl" else "StableDiffusionPipeline"
    assert type(p).__name__ == want
    assert p.tokenizer("a photo of a dog").input_ids == ids[0][:len(p.tokenizer("a photo of a dog").input_ids)].tolist()


ENCODERS = {
    # what: (our spec, transformers class, compare image_embeds, compare pooler_output)
    "siglip": (SIGLIP_VISION, "SiglipVisionModel", False, True),
    "dino": (DINOV2, "Dinov2WithRegistersModel", False, True),
    "clip_l": (clip_vision_spec(True), "CLIPVisionModelWithProjection", True, False),
    "ip_image_encoder": (clip_vision_spec(None), "CLIPVisionModelWithProjection", True, False),
}


@pytest.mark.parametrize("what", sorted(ENCODERS))
def test_written_encoder_loads_in_ours_and_transformers_with_equal_outputs(what, tmp_path):
    import transformers

    spec, cls_name, embeds, pooled = ENCODERS[what]
    out = _script().write(what, tmp_path / what, std=0.05, configs=_small_configs(what))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    module, params, cfg = load_pretrained(out, spec)
    ref, info = getattr(transformers, cls_name).from_pretrained(out, dtype=torch.float32,
                                                                output_loading_info=True)
    _no_missing(info, other_tower=("text_model", "text_projection", "logit_scale") if what == "clip_l" else ())
    x = np.random.default_rng(1).standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    o = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        r = ref(pixel_values=_nchw(x))
    _close(o.last_hidden_state, r.last_hidden_state)
    if pooled:
        _close(o.pooler_output, r.pooler_output)
    if embeds:
        _close(o.image_embeds, r.image_embeds)
    if what == "clip_l":   # the folder is a whole CLIPModel: both towers and the logit scale
        full, info = transformers.CLIPModel.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        _no_missing(info)
        assert abs(full.logit_scale.item() - np.log(1 / 0.07)) < 1e-6


def test_written_weights_follow_the_init_rule_and_dtype(tmp_path):
    from customjax.weights.safetensors_io import load_file, read_header

    out = _script().write("ip_image_encoder", tmp_path / "ip", dtype="float16", std=0.02,
                          configs=_small_configs("ip_image_encoder"))
    header, _ = read_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    t = load_file(out / "model.safetensors")
    assert np.all(t["vision_model.post_layernorm.weight"] == 1)
    assert np.all(t["vision_model.encoder.layers.0.mlp.fc1.bias"] == 0)
    w = np.asarray(t["vision_model.encoder.layers.0.mlp.fc1.weight"], np.float32)
    assert w.shape == (64, 32) and 0.015 < w.std() < 0.025
    _, params, _ = load_pretrained(out, clip_vision_spec(None))   # float16 file, float32 parameters
    assert params["visual_projection"]["kernel"].dtype == np.float32
