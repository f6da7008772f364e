"""The published architectures (``customjax/weights/published_configs``, shipped with the package
for :func:`customjax.weights.single_file.load_single_file`'s variant names), for tests that want
the real sizes.

    from real_sizes import config_folder, PARAMS
    pipe, params = load_stable_diffusion(config_folder("sd15"), abstract=True)

``PARAMS`` holds the parameter counts that diffusers / transformers give for each model (checked
by ``tests/test_real_configs.py`` against both, on the meta device, and against our abstract
build).
"""

from __future__ import annotations

from pathlib import Path

from customjax.weights.single_file import PUBLISHED_CONFIGS as ROOT

FOLDERS = {
    "sd15": "sd15",                                      # runwayml/stable-diffusion-v1-5
    "sd21": "sd21",                                      # stabilityai/stable-diffusion-2-1
    "sdxl": "sdxl",                                      # stabilityai/stable-diffusion-xl-base-1.0
    "siglip": "siglip_so400m_patch14_384",               # google/siglip-so400m-patch14-384
    "dino": "dinov2_large_reg4",                         # facebook/dinov2-with-registers-large
    "clip_l": "clip_vit_large_patch14",                  # openai/clip-vit-large-patch14
    "ip_adapter_image_encoder": "ip_adapter_image_encoder_sd15",  # h94/IP-Adapter models/image_encoder
}

# Exact parameter counts (PyTorch ``sum(p.numel() for p in model.parameters())``; buffers excluded).
PARAMS = {
    "sd15/unet": 859_520_964,
    "sd21/unet": 865_910_724,
    "sdxl/unet": 2_567_463_684,
    "vae": 83_653_863,                         # the same AutoencoderKL in SD-1.5, SD-2.1, SDXL
    "clip_l_text": 123_060_480,                # SD-1.5 / SDXL text_encoder
    "openclip_h_text": 340_387_840,            # SD-2.1 text_encoder (23 layers)
    "openclip_bigg_text_proj": 694_659_840,    # SDXL text_encoder_2
    "siglip_vision": 428_225_600,              # SiglipVisionModel, with the attention-pool head
    "dino": 304_372_736,                       # Dinov2WithRegistersModel
    "clip_l_vision": 303_179_776,              # CLIPVisionModel (no projection)
    "ip_adapter_image_encoder": 632_076_800,   # CLIPVisionModelWithProjection, ViT-H/14
}


def config_folder(name: str) -> Path:
    """The folder of published configs of ``name``: "sd15" | "sd21" | "sdxl" (diffusers pipeline
    layout without weights) or "siglip" | "dino" | "clip_l" | "ip_adapter_image_encoder" (a
    ``config.json``)."""
    if name not in FOLDERS:
        raise KeyError(f"unknown real config {name!r}; choose from {sorted(FOLDERS)}")
    return ROOT / FOLDERS[name]
