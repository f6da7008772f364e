"""Single-file LDM checkpoints (customjax.weights.single_file).

Tiny SD-1.5, SD-2.x (OpenCLIP text encoder, 23 of 24 layers as SD-2 ships it) and SDXL pipelines
are written as diffusers folders, then saved as ONE file in the original LDM names by this file's
own map (diffusers -> LDM, written apart from the loader's). diffusers' ``from_single_file`` reads
the file back to the folder's exact weights (so the map is the layout diffusers reads), and our
loader gives exactly the parameters that loading the folder gives. Every tensor is random (no zero
biases or unit norm scales that would hide a swapped name). SDXL's two encoders differ in width
(32, 48), as the real ones do: diffusers tells them apart by it. At the published sizes, diffusers'
own converter inverts the names we read. Errors name the file's keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from customjax.models.clip_text import CLIPTextConfig
from customjax.pipeline import load_stable_diffusion
from customjax.weights.safetensors_io import load_file, save_file
from customjax.weights.single_file import SingleFileMismatchError, load_single_file, tokenizer_paths
from customjax.zoo import (SCHEDULER, TINY, TINY_VAE, VOCAB, clip_text_config_dict, unet_config_dict,
                           vae_config_dict, write_random_pipeline_from_configs, write_tiny_pipeline)

KINDS = ("sd15", "sd21", "sdxl")
SD2_LAYERS = 23        # SD-2.x: the file has 24 OpenCLIP layers, diffusers' text encoder the first 23


# ----------------------------------------------------------------------------------------------
# diffusers -> LDM, written from the LDM module structure (uniform layers_per_block, as diffusers assumes)

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _split(rest: str) -> tuple[str, str]:
    module, _, leaf = rest.rpartition(".")
    return module, leaf


def ldm_unet(sd: dict, cfg: dict) -> dict:
    lpb, ups = cfg["layers_per_block"], cfg["up_block_types"]
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            idx = 1 + b * (lpb + 1) + j if side == "down" else b * (lpb + 1) + j
            if kind == "resnets":
                module, leaf = _split(rest)
                rest = f"{RESNET[module]}.{leaf}"
            name = f"{'input' if side == 'down' else 'output'}_blocks.{idx}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", k):
            name = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", k):
            b = int(m[1])
            name = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if ups[b].startswith('CrossAttn') else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", k):
            module, leaf = _split(m[2])
            name = f"middle_block.{2 * int(m[1])}.{RESNET[module]}.{leaf}"
        elif k.startswith("mid_block.attentions.0."):
            name = "middle_block.1." + k[len("mid_block.attentions.0."):]
        else:
            module, leaf = _split(k)
            name = f"{UNET_TOP[module]}.{leaf}"
        out["model.diffusion_model." + name] = v
    return out


def ldm_vae(sd: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        name = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(\w+)", name):
            name = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                v = v.reshape(*v.shape, 1, 1)          # the LDM VAE attention is 1x1 convolutions
        out["first_stage_model." + name] = v
    return out


def ldm_openclip(sd: dict, prefix: str, layers: int, rng, extra_layer: bool) -> dict:
    """transformers CLIP text -> OpenCLIP names; ``extra_layer``: SD-2's unused 24th layer (and its
    unused projection) as the real files hold them."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": np.array(4.6, np.float32)}
    width = out["ln_final.weight"].shape[0]
    out["text_projection"] = sd["text_projection.weight"].T if "text_projection.weight" in sd else \
        rng.standard_normal((width, width), np.float32)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        p, r = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[r + f"attn.in_proj_{leaf}"] = np.concatenate([sd[p + f"self_attn.{c}_proj.{leaf}"] for c in "qkv"])
            out |= {r + f"{o}.{leaf}": sd[p + f"{d}.{leaf}"] for d, o in names.items()}
    if extra_layer:
        last = f"transformer.resblocks.{layers - 1}."
        out |= {k.replace(last, f"transformer.resblocks.{layers}."): rng.standard_normal(v.shape, np.float32)
                for k, v in list(out.items()) if k.startswith(last)}
    return {prefix + k: v for k, v in out.items()}


def folder_state(folder: Path, part: str) -> dict:
    return dict(load_file(next((folder / part).glob("*.safetensors"))))


def to_ldm(folder: Path, kind: str, rng) -> dict:
    """The whole tiny pipeline in one LDM-named state, with the harmless extras real files carry."""
    cfg = lambda part: json.loads((folder / part / "config.json").read_text())
    state = ldm_unet(folder_state(folder, "unet"), cfg("unet")) | ldm_vae(folder_state(folder, "vae"), cfg("vae"))
    clip_l = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in folder_state(folder, "text_encoder").items()}
    if kind == "sd15":
        state |= {"cond_stage_model.transformer." + k: v for k, v in clip_l.items()}
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    elif kind == "sd21":
        state |= ldm_openclip(clip_l, "cond_stage_model.model.", SD2_LAYERS, rng, extra_layer=True)
    else:
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
        state |= ldm_openclip(folder_state(folder, "text_encoder_2"), "conditioner.embedders.1.model.",
                              cfg("text_encoder_2")["num_hidden_layers"], rng, extra_layer=False)
    state |= {"alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32), "model_ema.decay": np.array(0.9999, np.float32)}
    return state


# ----------------------------------------------------------------------------------------------
# Tiny folders


def _randomize(folder: Path, seed: int) -> None:
    """Every tensor N(0, 0.1^2): zero biases and unit norm scales would hide swapped names."""
    rng = np.random.default_rng(seed)
    for f in sorted(folder.rglob("*.safetensors")):
        save_file({k: 0.1 * rng.standard_normal(v.shape, np.float32) for k, v in load_file(f).items()}, f)


def write_tiny(out: Path, kind: str) -> Path:
    """zoo's tiny SD-1.5; SD-2.x with an OpenCLIP-style text encoder (gelu, 23 layers); SDXL as
    zoo's but with a 48-wide second encoder: diffusers tells the two SDXL encoders apart by width."""
    if kind == "sd15":
        write_tiny_pipeline(out, kind)
    else:
        base = "sdxl" if kind == "sdxl" else "sd15"
        index = json.loads((write_tiny_pipeline(out.parent / f"index-{base}", base) / "model_index.json").read_text())
        text = [CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, eos_token_id=VOCAB - 1)]
        if kind == "sd21":
            unet = TINY["sd15"]["unet"].replace(use_linear_projection=True)
            text = [dataclasses.replace(text[0], num_hidden_layers=SD2_LAYERS, hidden_act="gelu")]
        else:
            text.append(dataclasses.replace(text[0], hidden_size=48, intermediate_size=96, hidden_act="gelu",
                                            projection_dim=48, with_projection=True))
            unet = TINY["sdxl"]["unet"].replace(cross_attention_dim=(80, 80), projection_class_embeddings_input_dim=48 + 6 * 8)
        configs = dict(model_index=index, unet=unet_config_dict(unet), vae=vae_config_dict(TINY_VAE),
                       scheduler=dict(SCHEDULER, prediction_type="v_prediction") if kind == "sd21" else SCHEDULER)
        configs |= {f"text_encoder{'_2' if i else ''}": clip_text_config_dict(t) for i, t in enumerate(text)}
        write_random_pipeline_from_configs(out, configs)
        _randomize(out, len(kind))
    # diffusers' single-file conversion reads layers_per_block as one number
    cfg = json.loads((out / "unet" / "config.json").read_text())
    cfg["layers_per_block"] = cfg["layers_per_block"][0]
    (out / "unet" / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (diffusers folder, single file (fp32), LDM state)."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for i, kind in enumerate(KINDS):
        folder = write_tiny(root / kind, kind)
        state = to_ldm(folder, kind, np.random.default_rng(i))
        save_file(state, root / f"{kind}.safetensors")
        out[kind] = (folder, root / f"{kind}.safetensors", state)
    return out


def _flat(tree) -> dict:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(
        jax.tree_util.tree_map(np.asarray, {"unet": tree["unet"], "vae": tree["vae"],
                                            "text": dict(enumerate(tree["text_encoders"]))})).items()}


# ----------------------------------------------------------------------------------------------
# Tests


def test_diffusers_from_single_file_reads_our_ldm_files_as_the_folder_weights(tiny):
    """The test's diffusers -> LDM map writes the layout diffusers' from_single_file reads: every
    tensor of every component comes back equal to the folder's."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for kind, (folder, file, _) in tiny.items():
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
        parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
        for part in parts:
            want = {k.removeprefix("text_model."): v for k, v in folder_state(folder, part).items()}
            sd = getattr(pipe, part).state_dict()
            assert all(v.dtype == torch.float32 for v in sd.values())
            got = {k.removeprefix("text_model."): v.numpy() for k, v in sd.items() if not k.endswith("position_ids")}
            assert got.keys() == want.keys(), (kind, part, sorted(got.keys() ^ want.keys())[:5])
            bad = [k for k in want if not np.array_equal(got[k], want[k])]
            assert not bad, (kind, part, bad[:5])


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_loads_exactly_the_folder_parameters(tiny, kind, caplog):
    folder, file, _ = tiny[kind]
    ref_pipe, ref = load_stable_diffusion(folder)
    with caplog.at_level(logging.INFO, logger="customjax.weights.single_file"):
        pipe, params = load_single_file(file, configs=folder)
    want, got = _flat(ref), _flat(params)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
    assert pipe.unet.config == ref_pipe.unet.config and pipe.schedule == ref_pipe.schedule
    assert [t.pad_token for t in pipe.tokenizers] == [t.pad_token for t in ref_pipe.tokenizers]
    # the harmless extras are left out by name, and said so
    log = caplog.text
    assert "model_ema.decay" in log and "alphas_cumprod" in log
    if kind == "sd21":
        assert f"resblocks.{SD2_LAYERS}." in log and "cond_stage_model.model.text_projection" in log


@pytest.mark.parametrize("kind,dtype", [("sd15", ml_dtypes.bfloat16), ("sdxl", np.float16)])
def test_half_precision_files_load_as_their_float32_values(tiny, tmp_path, kind, dtype):
    folder, _, state = tiny[kind]
    half = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()}
    save_file(half, tmp_path / "half.safetensors")
    _, params = load_single_file(tmp_path / "half.safetensors", configs=folder)
    _, ref = load_stable_diffusion(folder)
    want, got = _flat(ref), _flat(params)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k].astype(dtype).astype(np.float32))
               for k in want)


def test_mismatches_name_the_file_keys(tiny, tmp_path):
    folder, _, state = tiny["sd15"]
    bad = dict(state)
    gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del bad[gone]
    bad["model.diffusion_model.input_blocks.1.1.extra.weight"] = np.zeros((2, 2), np.float32)
    wrong = "first_stage_model.decoder.mid.attn_1.q.weight"
    bad[wrong] = np.zeros((32, 31, 1, 1), np.float32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(SingleFileMismatchError) as e:
        load_single_file(tmp_path / "bad.safetensors", configs=folder)
    msg = str(e.value)
    assert f"missing: {gone!r}" in msg
    assert "unexpected: 'model.diffusion_model.input_blocks.1.1.extra.weight'" in msg
    assert f"wrong shape: {wrong!r}" in msg and "found (32, 31, 1, 1)" in msg
    assert e.value.missing == [gone] and len(e.value.mismatched) == 1 and str(tmp_path / "bad.safetensors") in msg

    # a fused OpenCLIP in_proj of the wrong width is named by its own key
    folder21, _, state21 = tiny["sd21"]
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    save_file(dict(state21, **{key: np.zeros((96, 40), np.float32)}), tmp_path / "bad21.safetensors")
    with pytest.raises(SingleFileMismatchError, match=re.escape(f"wrong shape: {key!r}")):
        load_single_file(tmp_path / "bad21.safetensors", configs=folder21)


def test_layout_and_configs_errors(tiny, tmp_path):
    folder15, file15, _ = tiny["sd15"]
    _, file21, _ = tiny["sd21"]
    # a variant ships no tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer= a folder holding tokenizer/"):
        load_single_file(file15, variant="sd15")
    with pytest.raises(FileNotFoundError, match="tokenizer/ and tokenizer_2/"):
        load_single_file(tiny["sdxl"][1], variant="sdxl", tokenizer=folder15)
    # the file's family and the configs' disagree
    with pytest.raises(ValueError, match=r"SD-2\.x .* configs .* SD-1\.x"):
        load_single_file(file21, configs=folder15)
    # not an LDM checkpoint: the file and a key are named
    save_file({"down_blocks.0.resnets.0.conv1.weight": np.zeros((1,), np.float32)}, tmp_path / "diffusers.safetensors")
    with pytest.raises(ValueError, match=r"diffusers\.safetensors: not a single-file .*'down_blocks\.0\.resnets\.0\.conv1\.weight'"):
        load_single_file(tmp_path / "diffusers.safetensors", configs=folder15)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a variant"):
        load_single_file(file15, configs=tmp_path / "nowhere")


def test_variant_with_a_tokenizer_builds_the_published_architecture(tiny):
    """A variant name and a tokenizer folder: the published SD-1.5 configs, abstractly (header only)."""
    folder, file, _ = tiny["sd15"]
    assert tokenizer_paths(file, configs="", tokenizer=folder) == [folder / "tokenizer"]   # "": from the file
    pipe, shapes = load_single_file(file, variant="sd15", tokenizer=folder, abstract=True)
    assert pipe.unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert pipe.text_encoders[0].config.hidden_size == 768 and len(pipe.tokenizers) == 1
    assert isinstance(jax.tree_util.tree_leaves(shapes)[0], jax.ShapeDtypeStruct)


def test_config_model_path_to_a_file_loads_it(tiny):
    import ml_collections

    from customjax.base_model import base_pipeline

    folder, file, _ = tiny["sdxl"]
    config = ml_collections.ConfigDict(dict(seed=0, model=dict(
        path=str(file), random="sdxl", dtype="float32", single_file_config=str(folder), single_file_tokenizer="")))
    pipe, params = base_pipeline(config)
    _, ref = load_stable_diffusion(folder)
    want, got = _flat(ref), _flat(params)
    assert pipe.is_sdxl and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("variant,layout", [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")])
def test_published_sizes_names_are_diffusers_conversion_inverse(variant, layout):
    """At the published architectures (2 layers a block, 4 or 3 blocks, SDXL's 10-deep transformers),
    diffusers' own LDM converter maps the file name we read for each UNet and VAE parameter back to
    that parameter's name (tensors tagged by index; nothing of real size is allocated)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from customjax.weights.single_file import PUBLISHED_CONFIGS, ldm_sources

    root = PUBLISHED_CONFIGS / variant
    pipe, shapes = load_stable_diffusion(root, abstract=True)
    tables = {part: table for part, _, table in ldm_sources(pipe, shapes, layout)}
    for part, diffusers_convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        cfg = json.loads((root / part / "config.json").read_text())
        cfg["layers_per_block"] = np.ravel(cfg["layers_per_block"])[0].item()
        names = sorted(src for src, _ in tables[part].values())
        back = diffusers_convert({s: torch.full((1,), float(i)) for i, s in enumerate(names)}, cfg)
        assert {k: names[int(v.item())] for k, v in back.items()} == {k: s for k, (s, _) in tables[part].items()}
