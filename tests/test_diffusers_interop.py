"""The shipped ShapeWorld base (``customjax/shapeworld/assets/shapeworld_base``) in the tools users take
it to: diffusers' ``StableDiffusionPipeline`` loaded and called plainly (no dtype arguments) samples
what :func:`customjax.sampling.t2i.txt2img` samples from the same latents; transformers' ``CLIPModel``
loads ``clip/`` strictly and embeds like :mod:`customjax.metrics.clip_score`; the encoders load as
float32. And the folder writer of the pretraining writes exactly the shipped files (dtype-declaring
configs, a scalar ``logit_scale``); a folder written before that is brought up to date in place."""

import filecmp
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline

from conftest import max_abs
from customjax.metrics.clip_score import load_clip_scorer
from customjax.models.clip import load_clip
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.t2i import txt2img
from customjax.shapeworld import world as sw
from customjax.shapeworld.assets import SHAPEWORLD_BASE
from customjax.shapeworld.pretrain.folder import LOAD_DTYPE, fix_transformers_files, write_folder
from customjax.weights.safetensors_io import load_file, read_header, save_file

STEPS = 5
# OpenAI CLIP's pixel statistics (the transformers CLIPImageProcessor defaults), written out here
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
ENCODERS = ("text_encoder", "image_encoder", "clip")


def _strict(info: dict) -> None:
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info


@pytest.fixture(scope="module")
def record():
    return json.loads((SHAPEWORLD_BASE / "shapeworld.json").read_text())


@pytest.fixture(scope="module")
def scenes():
    """Two training-distribution scenes: uint8 images (2, 64, 64, 3) and their captions."""
    rng = np.random.default_rng(7)
    picked = [sw.sample_scene(rng, 64) for _ in range(2)]
    return np.stack([sw.render(s, 64)[0] for s in picked]), [sw.caption(s, rng) for s in picked]


def test_plain_diffusers_pipeline_samples_like_txt2img(record, scenes, report):
    settings = record["eval"]["settings"]
    assert settings["sampler"] == "ddim"
    prompts, guidance = scenes[1], settings["guidance"]
    ref = StableDiffusionPipeline.from_pretrained(SHAPEWORLD_BASE)       # as a user does: no dtype
    assert isinstance(ref.scheduler, DDIMScheduler)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        assert getattr(ref, name).dtype == torch.float32, (name, getattr(ref, name).dtype)
    ref.set_progress_bar_config(disable=True)

    pipe, params = load_stable_diffusion(SHAPEWORLD_BASE)
    f = pipe.vae_scale
    size = pipe.unet.config.sample_size * f
    latents = np.random.default_rng(0).standard_normal(
        (len(prompts), size // f, size // f, pipe.unet.config.in_channels)).astype(np.float32)
    ours = txt2img(pipe, params, prompts, None, steps=STEPS, guidance=guidance, latents=latents)
    with torch.no_grad():
        want = ref(prompts, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np",
                   latents=torch.from_numpy(latents).permute(0, 3, 1, 2)).images
    assert want.shape == ours.shape == (len(prompts), size, size, 3)
    report(f"shipped base: diffusers StableDiffusionPipeline vs txt2img ({STEPS} DDIM steps, CFG {guidance})",
           max_abs(ours, want), 1e-4)
    assert np.std(want) > 1e-2


def test_transformers_clip_model_loads_strictly_and_embeds_like_ours(scenes, report):
    images, captions = scenes
    model, info = transformers.CLIPModel.from_pretrained(SHAPEWORLD_BASE / "clip", output_loading_info=True)
    _strict(info)
    assert model.dtype == torch.float32
    ours_scale = load_file(SHAPEWORLD_BASE / "clip" / "model.safetensors")["logit_scale"]
    assert ours_scale.shape == () and model.logit_scale.shape == ()
    assert model.logit_scale.item() == float(np.float32(ours_scale))

    scorer = load_clip_scorer(SHAPEWORLD_BASE / "clip", SHAPEWORLD_BASE / "tokenizer")
    ids = transformers.CLIPTokenizer.from_pretrained(SHAPEWORLD_BASE / "tokenizer")(
        captions, padding="max_length", return_tensors="np")["input_ids"]
    pixels = ((images.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
    text, image = scorer.embed_text(captions), scorer.embed_images(images)
    report("shipped clip/: transformers CLIPModel text embeddings vs clip_score", max_abs(out.text_embeds, text), 1e-4)
    report("shipped clip/: transformers CLIPModel image embeddings vs clip_score", max_abs(out.image_embeds, image),
           1e-4)
    logits = np.exp(np.float32(ours_scale)) * image @ text.T
    report("shipped clip/: transformers CLIPModel logits_per_image vs ours", max_abs(out.logits_per_image, logits), 1e-3)
    assert np.argmax(logits, 1).tolist() == [0, 1]     # each image nearest its own caption


def test_transformers_encoders_load_as_float32(scenes, report):
    images, captions = scenes
    vision, info = transformers.CLIPVisionModelWithProjection.from_pretrained(SHAPEWORLD_BASE / "image_encoder",
                                                                              output_loading_info=True)
    _strict(info)
    text, info = transformers.CLIPTextModel.from_pretrained(SHAPEWORLD_BASE / "text_encoder", output_loading_info=True)
    _strict(info)
    assert vision.dtype == text.dtype == torch.float32
    # a single tower's config taken from the two-tower folder says float32 too
    assert transformers.CLIPTextConfig.from_pretrained(SHAPEWORLD_BASE / "clip").dtype == torch.float32
    assert transformers.CLIPVisionConfig.from_pretrained(SHAPEWORLD_BASE / "clip").dtype == torch.float32

    pipe, params = load_stable_diffusion(SHAPEWORLD_BASE)
    ids = np.asarray(pipe.tokenizers[0](captions, padding="max_length", return_tensors="np")["input_ids"])
    pixels = ((images.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        hidden = text(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
        embeds = vision(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    ours = pipe.text_encoders[0].apply({"params": params["text_encoders"][0]}, ids).last_hidden_state
    report("shipped text_encoder/: transformers CLIPTextModel vs ours (last hidden state)", max_abs(hidden, ours), 1e-4)
    scorer = load_clip_scorer(SHAPEWORLD_BASE / "clip", SHAPEWORLD_BASE / "tokenizer")
    unit = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
    report("shipped image_encoder/: transformers CLIPVisionModelWithProjection vs clip_score",
           max_abs(unit, scorer.embed_images(images)), 1e-4)


def _write_from(folder, out):
    """``folder`` read with our loaders and written again by the pretraining's folder writer."""
    pipe, params = load_stable_diffusion(folder)
    clip, clip_p = load_clip(folder / "clip")
    clip_p["logit_scale"] = np.asarray(load_file(folder / "clip" / "model.safetensors")["logit_scale"], np.float32)
    return write_folder(out, scheduler=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
                        tokenizer_dir=folder / "tokenizer", unet_cfg=pipe.unet.config, unet_p=params["unet"],
                        vae_cfg=pipe.vae.config, vae_p=params["vae"], text_cfg=clip.text.config,
                        vision_cfg=clip.vision.config, clip_p=clip_p,
                        info=json.loads((folder / "shapeworld.json").read_text()), text_p=params["text_encoders"][0])


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_folder_writer_writes_the_shipped_files(tmp_path):
    """A fresh folder from :func:`write_folder` (the shipped weights, read with our loaders, float16 ->
    float32 -> float16 exactly) declares float32 in its transformers configs, stores a scalar
    ``logit_scale``, and is the shipped folder byte for byte."""
    out = _write_from(SHAPEWORLD_BASE, tmp_path / "model")
    for name in ENCODERS:
        d = json.loads((out / name / "config.json").read_text())
        assert {k: d.get(k) for k in LOAD_DTYPE} == LOAD_DTYPE, name
    clip = json.loads((out / "clip" / "config.json").read_text())
    assert all({k: clip[sub].get(k) for k in LOAD_DTYPE} == LOAD_DTYPE for sub in ("text_config", "vision_config"))
    assert read_header(out / "clip" / "model.safetensors")[0]["logit_scale"]["shape"] == []
    assert _files(out) == _files(SHAPEWORLD_BASE)
    differ = [f for f in _files(out) if not filecmp.cmp(out / f, SHAPEWORLD_BASE / f, shallow=False)]
    assert not differ, differ


def test_a_folder_written_before_reads_and_is_fixed_in_place(tmp_path):
    """The earlier files (no dtype in the configs, ``logit_scale`` of shape [1]) still load with our
    loaders, and :func:`fix_transformers_files` turns them into the current ones (same weight bytes)."""
    old = shutil.copytree(SHAPEWORLD_BASE, tmp_path / "old")
    for name in ENCODERS:
        path = old / name / "config.json"
        d = json.loads(path.read_text())
        d = {k: v for k, v in d.items() if k not in LOAD_DTYPE}
        for sub in ("text_config", "vision_config"):
            if sub in d:
                d[sub] = {k: v for k, v in d[sub].items() if k not in LOAD_DTYPE}
        path.write_text(json.dumps(d, indent=2))
    weights = old / "clip" / "model.safetensors"
    state = {k: np.array(v) for k, v in load_file(weights).items()}
    save_file(dict(state, logit_scale=state["logit_scale"].reshape(1)), weights)
    assert read_header(weights)[0]["logit_scale"]["shape"] == [1]

    _, old_p = load_clip(old / "clip")                      # our loaders read the earlier files
    _, new_p = load_clip(SHAPEWORLD_BASE / "clip")
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, old_p, new_p)))
    load_stable_diffusion(old)
    assert load_clip_scorer(old / "clip", old / "tokenizer").embed_text(["a red circle"]).shape == (1, 64)

    assert sorted(fix_transformers_files(old)) == sorted([f"{n}/config.json" for n in ENCODERS]
                                                         + ["clip/model.safetensors"])
    assert fix_transformers_files(old) == []
    differ = [f for f in _files(old) if not filecmp.cmp(old / f, SHAPEWORLD_BASE / f, shallow=False)]
    assert not differ, differ
