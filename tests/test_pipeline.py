"""A whole pipeline folder: our tiny random pipelines in the diffusers layout load in diffusers /
transformers unchanged (our export names are theirs), and jitted txt2img equals the diffusers
pipeline on the same latents."""

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from conftest import max_abs
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.t2i import txt2img
from customjax.zoo import write_tiny_pipeline

PROMPTS = ["a red toy on a table", "a photo of a dog"]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
    folder = write_tiny_pipeline(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    return request.param, folder


def test_diffusers_loads_our_folder_strictly(tiny):
    kind, folder = tiny
    from diffusers import AutoencoderKL, UNet2DConditionModel
    for sub, model_cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        _, info = model_cls.from_pretrained(folder / sub, output_loading_info=True)
        assert not any(info.values()), info
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    _, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if kind == "sdxl":
        _, info = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_txt2img_matches_diffusers_pipeline(tiny, report):
    kind, folder = tiny
    pipe, params = load_stable_diffusion(folder)
    latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    ours = txt2img(pipe, params, PROMPTS, jax.random.key(0), steps=4, guidance=7.5, latents=latents)

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    kw = {} if kind == "sdxl" else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = cls.from_pretrained(folder, **kw)
    assert isinstance(ref.scheduler, DDIMScheduler)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=32, width=32,
                   latents=torch.from_numpy(latents).permute(0, 3, 1, 2), output_type="np").images
    report(f"txt2img {kind} (4 DDIM steps, CFG 7.5)", max_abs(ours, want), 1e-4)
    assert np.std(want) > 1e-3
    again = txt2img(pipe, params, PROMPTS, jax.random.key(0), steps=4, guidance=7.5, latents=latents)
    assert np.array_equal(ours, again)


def test_seeded_noise_and_size_errors(tiny):
    kind, folder = tiny
    pipe, params = load_stable_diffusion(folder)
    a = txt2img(pipe, params, PROMPTS[:1], jax.random.key(1), steps=2, sampler="dpm++2m")
    b = txt2img(pipe, params, PROMPTS[:1], jax.random.key(1), steps=2, sampler="dpm++2m")
    c = txt2img(pipe, params, PROMPTS[:1], jax.random.key(2), steps=2, sampler="dpm++2m")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        txt2img(pipe, params, PROMPTS[:1], jax.random.key(1), steps=2, height=33)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_stable_diffusion(folder / "unet")


def test_ancestral_txt2img_is_fixed_by_each_image_seed(tiny):
    """The ancestral sampler's fresh noise at every step comes from each image's initial latents:
    the same latents give the same image alone or in a batch; other latents another image."""
    kind, folder = tiny
    pipe, params = load_stable_diffusion(folder)
    latents = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
    kw = dict(steps=3, guidance=7.5, sampler="ancestral")
    both = txt2img(pipe, params, PROMPTS, None, latents=latents, **kw)
    alone = txt2img(pipe, params, PROMPTS[1:], None, latents=latents[1:], **kw)
    np.testing.assert_allclose(alone[0], both[1], atol=2e-5)
    ddim = txt2img(pipe, params, PROMPTS[1:], None, latents=latents[1:], steps=3, guidance=7.5)
    assert max_abs(ddim[0], both[1]) > 1e-3      # the step noise reaches the image
