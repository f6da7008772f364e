"""Random-weight model folders at the real sizes of the published architectures.

Reads the published configs of ``customjax/weights/published_configs`` and writes, tensor by
tensor, a folder that our loaders (``customjax.pipeline.load_stable_diffusion``,
``customjax.weights.loaders.load_pretrained``) and diffusers / transformers ``from_pretrained``
load as they would the real checkpoint:

    sd15 | sd21 | sdxl      diffusers layout: model_index.json, scheduler/, tokenizer/ (+ tokenizer_2/),
                            unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors),
                            text_encoder/ (+ text_encoder_2/) (config.json + model.safetensors)
    siglip | dino | clip_l | ip_image_encoder
                            Hugging Face folder: the published config.json + model.safetensors

Weights: N(0, std^2) for kernels, embeddings and tokens, ones for norm scales (and DINOv2 layer
scales), zeros for biases, under the PyTorch names and layouts of the published checkpoints
(DINOv2's ``attention.attention.query``, SigLIP's and CLIP's ``vision_model.`` prefix). The
tokenizers are the character-level CLIP tokenizer of ``customjax.zoo`` (model_max_length 77).
The SigLIP folder holds the vision tower only (the published config is the two-tower
``SiglipModel``'s; ``SiglipVisionModel.from_pretrained`` and our ``SIGLIP_VISION`` read it); the
CLIP-L folder holds both towers, a loadable ``CLIPModel``.

    python benchmarks/real_size_folders.py --what sd15 --out /work/realsize/sd15
    python benchmarks/real_size_folders.py --what siglip --out /work/realsize/siglip --check

``--check`` loads the written folder with our loader and runs it once (the UNet at 64x64 latents,
the encoders at their image size) and fails unless the output is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_CONFIGS = ROOT / "customjax" / "weights" / "published_configs"
FOLDERS = {"sd15": "sd15", "sd21": "sd21", "sdxl": "sdxl", "siglip": "siglip_so400m_patch14_384",
           "dino": "dinov2_large_reg4", "clip_l": "clip_vit_large_patch14",
           "ip_image_encoder": "ip_adapter_image_encoder_sd15"}
PIPELINES = ("sd15", "sd21", "sdxl")
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # transformers' logit_scale_init_value (2.6592)


def read_configs(what: str, root: Path = REAL_CONFIGS) -> dict:
    """The config dicts of ``what``: for a pipeline ``{model_index, unet, vae, text_encoder[,
    text_encoder_2], scheduler}``, for an encoder ``{"config": ...}``."""
    folder = root / FOLDERS[what]
    if what not in PIPELINES:
        return {"config": json.loads((folder / "config.json").read_text())}
    out = {"model_index": json.loads((folder / "model_index.json").read_text()),
           "scheduler": json.loads((folder / "scheduler" / "scheduler_config.json").read_text())}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / part / "config.json").is_file():
            out[part] = json.loads((folder / part / "config.json").read_text())
    return out


def _dinov2_checkpoint_name(key: str) -> str:
    """Our attention names -> the published DINOv2 checkpoints' (inverse of the loader's rename)."""
    from customjax.models.vit import _DINOV2_RENAMES

    for old, new in _DINOV2_RENAMES:
        key = key.replace(new, old)
    return key


def encoder_specs(what: str) -> tuple[list, dict]:
    """(``[(spec, rename)]``, fixed tensors) of an encoder folder."""
    from customjax.models.clip_text import clip_text_spec
    from customjax.models.vit import DINOV2, SIGLIP_VISION, clip_vision_spec

    if what == "siglip":
        return [(SIGLIP_VISION, None)], {}
    if what == "dino":
        return [(DINOV2, _dinov2_checkpoint_name)], {}
    if what == "clip_l":
        return ([(clip_vision_spec(True), None), (clip_text_spec(True), None)],
                {"logit_scale": np.array(CLIP_LOGIT_SCALE, np.float32)})
    if what == "ip_image_encoder":
        return [(clip_vision_spec(None), None)], {}
    raise ValueError(f"unknown --what {what!r}; choose from {sorted(FOLDERS)}")


def write(what: str, out: str | Path, *, dtype: str = "float32", std: float = 0.02, seed: int = 0,
          configs: dict | None = None) -> Path:
    """Writes the random folder of ``what`` to ``out``; ``configs`` (as :func:`read_configs`
    returns them) overrides the published ones, e.g. with a scaled-down copy in the tests."""
    from customjax import zoo

    configs = configs if configs is not None else read_configs(what)
    dt = np.dtype(dtype)
    if what in PIPELINES:
        return zoo.write_random_pipeline_from_configs(out, configs, dtype=dt, std=std, seed=seed)
    specs, fixed = encoder_specs(what)
    return zoo.write_random_model(out, configs["config"], specs, dtype=dt, std=std, seed=seed, fixed=fixed)


def check(what: str, out: str | Path, seed: int = 0) -> dict:
    """Loads ``out`` with our loader, runs it once on random inputs and returns output statistics;
    raises unless the output is finite."""
    import jax
    import jax.numpy as jnp

    from customjax.weights.loaders import load_pretrained

    rng = np.random.default_rng(seed)
    out = Path(out)
    t0 = time.perf_counter()
    if what in PIPELINES:
        from customjax.models.unet import UNET, dummy_inputs

        module, params, cfg = load_pretrained(out / "unet", UNET)
        args = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
                for a in dummy_inputs(cfg, size=64, text_len=77)]
        args[1] = jnp.full(args[1].shape, 500.0)
        if cfg.addition_embed_type == "text_time":
            args[4] = jnp.asarray([[1024, 1024, 0, 0, 1024, 1024]], jnp.float32)
        loaded = time.perf_counter()
        y = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, *args)
    else:
        specs, _ = encoder_specs(what)
        module, params, cfg = load_pretrained(out, specs[0][0])
        size = cfg.image_size
        x = jnp.asarray(rng.standard_normal((1, size, size, cfg.num_channels)), jnp.float32)
        loaded = time.perf_counter()
        res = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
        y = res.last_hidden_state
    y = np.asarray(jax.block_until_ready(y))
    stats = {"shape": list(y.shape), "finite": bool(np.isfinite(y).all()), "std": float(y.std()),
             "load_s": round(loaded - t0, 1), "run_s": round(time.perf_counter() - loaded, 1)}
    if not stats["finite"]:
        raise SystemExit(f"CHECK FAILED: {what} output is not finite: {stats}")
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", required=True, choices=sorted(FOLDERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="load with our loader and run once (finite output)")
    a = ap.parse_args(argv)
    from customjax.zoo import folder_bytes

    t0 = time.perf_counter()
    out = write(a.what, a.out, dtype=a.dtype, std=a.std, seed=a.seed)
    took = time.perf_counter() - t0
    report = {"what": a.what, "out": str(out), "dtype": a.dtype, "bytes": folder_bytes(out),
              "write_s": round(took, 1)}
    if a.check:
        report["check"] = check(a.what, out, a.seed)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
