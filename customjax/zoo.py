"""Tiny Stable Diffusion pipelines with random weights, written in the diffusers folder layout.

No weights can be downloaded here, so the tests and the README's first command build one of these
and load it through the same loader as a real SD-1.5 / SDXL folder:

    python -m customjax.zoo --kind sd15 --out /tmp/tiny-sd15

The tokenizer is a character-level CLIP BPE (byte alphabet, no merges): real tokenizer files that
the normal tokenizer path reads.

:func:`write_random_pipeline_from_configs` and :func:`write_random_model` write such folders from
any config dicts, the published ones included (``benchmarks/real_size_folders.py``), drawing the
weights tensor by tensor into the safetensors file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.clip_text import CLIPTextConfig, clip_text_spec
from customjax.models.unet import UNET
from customjax.models.unet_config import UNetConfig
from customjax.models.vae import VAE, VAEConfig
from customjax.weights.convert import to_torch_state
from customjax.weights.loaders import param_shapes
from customjax.tokenizer import VOCAB, write_char_tokenizer  # noqa: F401  (re-exported: the tiny pipelines write it)
from customjax.weights.safetensors_io import save_file


TINY_VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                     latent_channels=4)
TINY = {
    "sd15": dict(
        unet=UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=(1, 1), heads=(2, 4),
                        cross_attention_dim=(32, 32), transformer_layers=(1, 1), norm_num_groups=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text=(CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, eos_token_id=VOCAB - 1),)),
    "sdxl": dict(
        unet=UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=(1, 1), heads=(2, 4),
                        cross_attention_dim=(64, 64), transformer_layers=(1, 2), norm_num_groups=8,
                        use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        text=(CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, eos_token_id=VOCAB - 1),
              CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, eos_token_id=VOCAB - 1, hidden_act="gelu",
                             projection_dim=32, with_projection=True))),
}
# Real-scale architectures with random weights, for benchmarks (the shapes of SD-1.5 and SDXL base).
FULL_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
CLIP_L = CLIPTextConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, eos_token_id=VOCAB - 1)
FULL = {
    "sd15": dict(unet=UNetConfig(), text=(CLIP_L,), vae=FULL_VAE),
    "sdxl": dict(
        unet=UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2),
                        heads=(5, 10, 20), cross_attention_dim=(2048,) * 3, transformer_layers=(1, 2, 10),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text=(CLIP_L, CLIPTextConfig(vocab_size=VOCAB, hidden_size=1280, intermediate_size=5120,
                                     num_hidden_layers=32, num_attention_heads=20, eos_token_id=VOCAB - 1,
                                     hidden_act="gelu", projection_dim=1280, with_projection=True)),
        vae=FULL_VAE),
}
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading"}


def unet_config_dict(c: UNetConfig) -> dict:
    """Our UNet config as diffusers ``config.json``."""
    d = dict(_class_name="UNet2DConditionModel", sample_size=c.sample_size, in_channels=c.in_channels,
             out_channels=c.out_channels, block_out_channels=list(c.block_out_channels),
             down_block_types=list(c.down_block_types), up_block_types=list(c.up_block_types),
             layers_per_block=list(c.layers_per_block), attention_head_dim=list(c.heads),
             cross_attention_dim=c.cross_attention_dim[0],
             transformer_layers_per_block=list(c.transformer_layers), norm_num_groups=c.norm_num_groups,
             norm_eps=c.norm_eps, use_linear_projection=c.use_linear_projection,
             flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift, conv_in_kernel=c.conv_in_kernel,
             conv_out_kernel=c.conv_out_kernel, addition_embed_type=c.addition_embed_type,
             addition_time_embed_dim=c.addition_time_embed_dim,
             projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim)
    if c.up_transformer_layers is not None:
        d["reverse_transformer_layers_per_block"] = [list(x) for x in c.up_transformer_layers]
    return d


def vae_config_dict(c: VAEConfig) -> dict:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()}
    n = len(c.block_out_channels)
    return dict(d, _class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n)


def clip_text_config_dict(c: CLIPTextConfig) -> dict:
    d = dataclasses.asdict(c)
    proj = d.pop("with_projection")
    return dict(d, model_type="clip_text_model", bos_token_id=c.eos_token_id - 1, pad_token_id=c.eos_token_id,
                architectures=["CLIPTextModelWithProjection" if proj else "CLIPTextModel"])


def _random(shapes, key: jax.Array | int, std: float) -> dict:
    """N(0, std^2) arrays of the tree's shapes, drawn on the host with numpy (no per-shape
    compilation, unlike eager ``jax.random``)."""
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1)) if isinstance(key, jax.Array) else int(key)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape, np.float32)), shapes)


def _save_component(folder: Path, config: dict, params, weights: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_torch_state(params), folder / weights)


def random_pipeline(kind: str = "sd15", scale: str = "tiny", seed: int = 0, std: float = 0.02,
                    dtype=jnp.float32, tokenizer_dir: str | os.PathLike | None = None):
    """(pipeline, params) held in memory with random weights: ``scale`` "tiny" (the shapes of
    :func:`write_tiny_pipeline`) or "full" (SD-1.5 / SDXL base shapes, for benchmarks)."""
    import tempfile

    from customjax.models.clip_text import CLIPTextModel
    from customjax.models.unet import UNet2DConditionModel
    from customjax.models.vae import AutoencoderKL
    from customjax.pipeline import StableDiffusion
    from customjax.schedulers import ScheduleConfig
    from customjax.tokenizer import load_tokenizer

    table = {"tiny": TINY, "full": FULL}[scale]
    if kind not in table:
        raise ValueError(f"unknown pipeline {kind!r}; choose from {sorted(table)}")
    spec = table[kind]
    vae_cfg = spec.get("vae", TINY_VAE)
    keys = jax.random.split(jax.random.key(seed), 4)
    tok_root = Path(tokenizer_dir or tempfile.mkdtemp(prefix="customjax-tok-"))
    toks = []
    for i in range(len(spec["text"])):
        write_char_tokenizer(tok_root / f"tokenizer{i}", pad="!" if i == 1 else "<|endoftext|>")
        toks.append(load_tokenizer(tok_root / f"tokenizer{i}"))
    params = {"unet": _random(param_shapes(UNET, spec["unet"]), keys[0], std),
              "vae": _random(param_shapes(VAE, vae_cfg), keys[1], std),
              "text_encoders": tuple(_random(param_shapes(clip_text_spec(tc.with_projection), tc), keys[2 + i], std)
                                     for i, tc in enumerate(spec["text"]))}
    pipe = StableDiffusion(UNet2DConditionModel(spec["unet"], dtype=dtype), AutoencoderKL(vae_cfg, dtype),
                           tuple(CLIPTextModel(tc, dtype) for tc in spec["text"]), tuple(toks),
                           ScheduleConfig.from_dict(SCHEDULER))
    return pipe, params


def write_tiny_pipeline(out: str | os.PathLike, kind: str = "sd15", seed: int = 0, std: float = 0.1) -> Path:
    """Writes a random tiny ``kind`` ("sd15" | "sdxl") pipeline in the diffusers layout."""
    if kind not in TINY:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose from {sorted(TINY)}")
    out = Path(out)
    spec = TINY[kind]
    keys = jax.random.split(jax.random.key(seed), 4)
    _save_component(out / "unet", unet_config_dict(spec["unet"]),
                    _random(param_shapes(UNET, spec["unet"]), keys[0], std), "diffusion_pytorch_model.safetensors")
    _save_component(out / "vae", vae_config_dict(TINY_VAE), _random(param_shapes(VAE, TINY_VAE), keys[1], std),
                    "diffusion_pytorch_model.safetensors")
    index = {"_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    for i, tc in enumerate(spec["text"]):
        sfx = "" if i == 0 else "_2"
        p = _random(param_shapes(clip_text_spec(tc.with_projection), tc), keys[2 + i], std)
        _save_component(out / f"text_encoder{sfx}", clip_text_config_dict(tc), p, "model.safetensors")
        write_char_tokenizer(out / f"tokenizer{sfx}", pad="!" if i == 1 else "<|endoftext|>")
        index[f"text_encoder{sfx}"] = ["transformers", "CLIPTextModelWithProjection" if tc.with_projection
                                       else "CLIPTextModel"]
        index[f"tokenizer{sfx}"] = ["transformers", "CLIPTokenizer"]
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


PROG = "customjax.zoo"
PARSE = dict(usage=f"python -m {PROG} --out OUT [--kind {'|'.join(sorted(TINY))}] [--seed N]", doc=__doc__,
             positionals=())


def define_flags(flag_values=None) -> None:
    """The command's flags (defined on use, so that importing this module defines none), on absl's
    ``flags.FLAGS`` or ``flag_values``."""
    from absl import flags

    fv = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_enum("kind", "sd15", sorted(TINY), "which tiny pipeline", **fv)
    flags.DEFINE_string("out", None, "output folder (the diffusers layout)", required=True, **fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights", **fv)


def main(argv, flag_values=None) -> None:
    """The command (``python -m customjax.zoo``): writes a tiny pipeline, prints its folder. The flags
    are parsed into ``flag_values`` (default ``flags.FLAGS``)."""
    from absl import flags

    f = flags.FLAGS if flag_values is None else flag_values
    del argv
    print(write_tiny_pipeline(f.out, f.kind, f.seed))


# ----------------------------------------------------------------------------------------------
# Random-weight folders of any size, from config dicts (published architectures included)
#
# The weights are drawn tensor by tensor straight into the safetensors file, under the PyTorch
# names and layouts that :func:`to_torch_state` gives (the same naming rule, applied to shapes),
# so a multi-GB folder never needs more memory than its largest tensor.


def init_kind(path: tuple[str, ...]) -> str:
    """How a random folder fills one parameter (our Flax path): biases "zeros", norm scales and
    DINOv2 layer scales "ones", everything else (kernels, embeddings, tokens) "normal"."""
    leaf = path[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return "zeros"
    if leaf in ("scale", "lambda1"):
        return "ones"
    return "normal"


def torch_entries(shapes, rename=None) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{PyTorch key: (PyTorch shape, init kind)}`` of a parameter tree of our model (arrays or
    ``jax.ShapeDtypeStruct`` leaves); ``rename`` maps our derived key to the checkpoint's name (as
    in :func:`to_torch_state`)."""
    from flax import traverse_util

    from customjax.weights.convert import _torch_shape, torch_key

    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        key = torch_key("/".join(path))
        key = rename(key) if rename else key
        if key in out:
            raise ValueError(f"two parameters export to the same key {key!r}")
        out[key] = (tuple(_torch_shape(tuple(leaf.shape), path[-1])), init_kind(path))
    return out


def write_random_safetensors(path: str | os.PathLike, entries, *, dtype=np.float32, std: float = 0.02,
                             seed: int = 0, fixed=None) -> int:
    """Writes a safetensors file of random tensors, one tensor at a time; returns its size in bytes.

    ``entries``: ``{name: (shape, kind)}`` with kind "normal" (N(0, std^2)), "zeros" or "ones";
    ``fixed``: ``{name: array}`` stored as given (cast to ``dtype``). The layout is
    :func:`customjax.weights.safetensors_io.save_file`'s (sorted names, 8-byte aligned data).
    """
    import struct

    from customjax.weights.safetensors_io import _NAMES

    dt = np.dtype(dtype)
    fixed = {k: np.asarray(v, dt) for k, v in (fixed or {}).items()}
    clash = set(fixed) & set(entries)
    if clash:
        raise ValueError(f"tensors given both as random and fixed: {sorted(clash)}")
    shapes = {k: tuple(s) for k, (s, _) in entries.items()} | {k: v.shape for k, v in fixed.items()}
    header, offset = {}, 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name], dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(shapes):
            if name in fixed:
                a = fixed[name]
            else:
                shape, kind = entries[name]
                if kind == "normal":
                    a = rng.standard_normal(shape, dtype=np.float32)
                    a *= std
                    a = a.astype(dt, copy=False)
                elif kind in ("zeros", "ones"):
                    a = (np.zeros if kind == "zeros" else np.ones)(shape, dt)
                else:
                    raise ValueError(f"{name}: unknown init kind {kind!r}")
            f.write(np.ascontiguousarray(a).data)
    return 8 + len(blob) + offset


def write_random_model(folder: str | os.PathLike, config: dict, specs, *, weights: str = "model.safetensors",
                       dtype=np.float32, std: float = 0.02, seed: int = 0, fixed=None) -> Path:
    """A model folder (``config.json`` + random weights) from a ``config.json`` dict.

    ``specs``: one :class:`customjax.weights.loaders.ModelSpec` or a sequence of
    ``(spec, rename)`` pairs whose parameters share the file (e.g. both towers of a CLIPModel);
    ``rename`` maps our derived PyTorch key to the checkpoint's name. ``config`` is written as
    given (indent 2), so a published config stays field for field what it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(specs, (list, tuple)):
        specs = [(specs, None)]
    entries: dict = {}
    for spec, rename in specs:
        part = torch_entries(param_shapes(spec, spec.config_from_dict(config)), rename)
        dup = entries.keys() & part.keys()
        if dup:
            raise ValueError(f"{folder}: specs share tensors {sorted(dup)[:5]}")
        entries.update(part)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_random_safetensors(folder / weights, entries, dtype=dtype, std=std, seed=seed, fixed=fixed)
    return folder


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def write_random_pipeline_from_configs(out: str | os.PathLike, configs: dict, *, dtype=np.float32,
                                       std: float = 0.02, seed: int = 0) -> Path:
    """A diffusers Stable Diffusion folder with random weights from config dicts.

    ``configs``: ``model_index``, ``unet``, ``vae``, ``text_encoder``, optionally
    ``text_encoder_2`` (SDXL; written with projection) and ``scheduler``, each the dict its file
    holds (e.g. the published ones of ``customjax/weights/published_configs/sd15``). Weights go to
    ``unet|vae/diffusion_pytorch_model.safetensors`` and ``text_encoder[_2]/model.safetensors``;
    ``tokenizer[_2]/`` are the character-level tokenizer of :func:`write_char_tokenizer`
    (``model_max_length`` 77); components of ``model_index`` that are not written (safety checker,
    feature extractor) become ``[null, null]`` so diffusers loads the folder as it is.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in configs else [])
    write_random_model(out / "unet", configs["unet"], UNET, weights="diffusion_pytorch_model.safetensors",
                       dtype=dtype, std=std, seed=seed)
    write_random_model(out / "vae", configs["vae"], VAE, weights="diffusion_pytorch_model.safetensors",
                       dtype=dtype, std=std, seed=seed + 1)
    for i, n in enumerate(names):
        write_random_model(out / n, configs[n], clip_text_spec(with_projection=n == "text_encoder_2" or None),
                           dtype=dtype, std=std, seed=seed + 2 + i)
        write_char_tokenizer(out / n.replace("text_encoder", "tokenizer"), pad="!" if i == 1 else "<|endoftext|>")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs.get("scheduler", SCHEDULER), indent=2) + "\n")
    index = dict(configs["model_index"])
    for k, v in index.items():
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and k not in PIPELINE_PARTS:
            index[k] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


if __name__ == "__main__":
    from customjax.cli import run

    run(PROG, define_flags, main, **PARSE)
