"""Single-file Stable Diffusion checkpoints (one ``.safetensors`` in the original LDM / CompVis /
Stability "sgm" names), read as diffusers' ``from_single_file`` reads them.

The file holds the whole pipeline under these prefixes (the *layout*, found from the keys):

    model.diffusion_model.*                 UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
    first_stage_model.*                     VAE (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` ...)
    sd1:  cond_stage_model.transformer.*    CLIP-L text encoder, transformers names
    sd2:  cond_stage_model.model.*          OpenCLIP ViT-H text encoder (``resblocks``, fused ``in_proj``)
    sdxl: conditioner.embedders.0.transformer.*  CLIP-L, and
          conditioner.embedders.1.model.*   OpenCLIP bigG with ``text_projection``

It carries no configs, so the architecture comes from a diffusers folder of the same model
(``model_index.json``, ``unet|vae|text_encoder[_2]/config.json``, ``scheduler/``, ``tokenizer[_2]/``;
weights in it are not read) or from a variant name, the published configs shipped in
``published_configs/``: "sd15" (runwayml/stable-diffusion-v1-5), "sd21" (stabilityai/
stable-diffusion-2-1: 768 px, v-prediction; a 2.x-base file needs its own configs folder), "sdxl"
(stable-diffusion-xl-base-1.0). With neither, the variant of the file's layout is taken (diffusers
picks the same defaults). A variant has no tokenizer: ``tokenizer=`` must name one.

Conversion: every parameter of our model (from the configs) names its source tensor in the file,
derived from the configs' block structure (layers per block, block types, layer counts); the
values go through :func:`customjax.weights.convert.convert` unchanged apart from three layout
steps diffusers also takes: the VAE mid attention's 1x1 convolutions become linear weights,
OpenCLIP's fused ``in_proj`` is split into q/k/v, and bigG's ``text_projection`` is transposed.
Loading is strict: missing, unexpected and wrongly shaped tensors raise
:class:`SingleFileMismatchError` naming the file's keys. Only the tensors of :data:`DROPPED` (EMA
copies, noise-schedule buffers, ``position_ids``, ``logit_scale``, SD-2's unused last text layer
and projection) are left out, by name, and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from customjax.weights import safetensors_io
from customjax.weights.convert import KeyedMismatchError, WeightMismatchError, convert, torch_key

log = logging.getLogger(__name__)

PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "published_configs"
VARIANTS = ("sd15", "sd21", "sdxl")

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# layout -> text-encoder prefixes in pipeline order ("...transformer.": transformers names, "...model.": OpenCLIP)
LAYOUTS = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
LAYOUT_VARIANT = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
_DESCRIBE = {"sd1": "SD-1.x (CLIP-L text encoder)", "sd2": "SD-2.x (OpenCLIP ViT-H text encoder)",
             "sdxl": "SDXL (CLIP-L + OpenCLIP bigG text encoders)"}

_SCHEDULE = ("betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
             "log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
             "posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
             "denoiser\\.sigmas")
# The only file tensors left out (besides SD-2's last text layer, see _dropped): (pattern, why).
DROPPED = (
    (r"model_ema\..+", "the UNet's EMA copy (diffusers' default too: the weights under model.diffusion_model "
                       "are loaded; an EMA-only file keeps its EMA weights there)"),
    (rf"({_SCHEDULE})", "noise-schedule buffers of the LDM / sgm wrapper (the schedule is scheduler_config.json's)"),
    (r"(cond_stage_model|conditioner\.embedders\.\d)\..*position_ids", "token position index buffers"),
    (r"(cond_stage_model|conditioner\.embedders\.\d)\.model\.logit_scale",
     "OpenCLIP's contrastive temperature (not used to encode text)"),
)


class SingleFileMismatchError(KeyedMismatchError):
    """A single-file checkpoint that does not fit the configs; every problem named by its key in the file."""

    layout = "the model of these configs"


# ----------------------------------------------------------------------------------------------
# Names: every diffusers parameter key -> (key in the file, value transform or None)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_rows(c) -> dict[str, tuple[str, dict]]:
    """UNet module prefixes, diffusers -> LDM (with renames inside the module), from a
    :class:`~customjax.models.unet_config.UNetConfig`: ``input_blocks`` count resnet(+attention)
    layers then a downsampler per block, ``output_blocks`` ``layers + 1`` per block with the
    upsampler after the last (at ``.2`` behind an attention, else ``.1``)."""
    rows = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
            "add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {}),
            "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
            "mid_block.resnets.0": ("middle_block.0", _RESNET), "mid_block.attentions.0": ("middle_block.1", {}),
            "mid_block.resnets.1": ("middle_block.2", _RESNET)}
    n, k = len(c.block_out_channels), 1
    for b, layers in enumerate(c.layers_per_block):
        for j in range(layers):
            rows[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{k}.0", _RESNET)
            rows[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if b < n - 1:
            rows[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    k = 0
    for b, layers in enumerate(c.layers_per_block[::-1]):
        for j in range(layers + 1):
            rows[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{k}.0", _RESNET)
            rows[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
            k += 1
        if b < n - 1:
            at = 2 if c.up_block_types[b].startswith("CrossAttn") else 1
            rows[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{at}.conv", {})
    return rows


def vae_rows(c) -> dict[str, tuple[str, dict]]:
    """VAE module prefixes, diffusers -> LDM, from a :class:`~customjax.models.vae.VAEConfig`
    (the LDM decoder numbers its ``up`` blocks from the lowest resolution)."""
    n = len(c.block_out_channels)
    rows = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for side in ("encoder", "decoder"):
        rows |= {f"{side}.conv_in": (f"{side}.conv_in", {}), f"{side}.conv_out": (f"{side}.conv_out", {}),
                 f"{side}.conv_norm_out": (f"{side}.norm_out", {}),
                 f"{side}.mid_block.resnets.0": (f"{side}.mid.block_1", _VAE_RESNET),
                 f"{side}.mid_block.resnets.1": (f"{side}.mid.block_2", _VAE_RESNET),
                 f"{side}.mid_block.attentions.0": (f"{side}.mid.attn_1", _VAE_ATTN)}
    for i in range(n):
        rows |= {f"encoder.down_blocks.{i}.resnets.{j}": (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
                 for j in range(c.layers_per_block)}
        rows[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        rows |= {f"decoder.up_blocks.{i}.resnets.{j}": (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
                 for j in range(c.layers_per_block + 1)}
        rows[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return rows


def _by_rows(rows: dict[str, tuple[str, dict]], key: str) -> str:
    """``key`` under the longest module prefix of ``rows`` that it starts with, renamed."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        hit = rows.get(".".join(parts[:i]))
        if hit:
            module = ".".join(parts[i:-1])
            return ".".join(p for p in (hit[0], hit[1].get(module, module), parts[-1]) if p)
    raise KeyError(f"no LDM name for parameter {key!r}")


def _conv1x1_to_linear(a):
    """(O, I, 1, 1) or (O, I, 1) -> (O, I); anything else as it is (a wrong shape is reported later)."""
    return a.reshape(a.shape[:2]) if a.ndim > 2 and all(s == 1 for s in a.shape[2:]) else a


def openclip_source(key: str, hidden_size: int) -> tuple[str, Callable | None]:
    """An OpenCLIP text tower's name (no prefix) for a transformers CLIP text key."""
    whole = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    if key in whole:
        return whole[key], None
    if key == "text_projection.weight":       # OpenCLIP applies x @ P: (width, dim); a Linear holds P.T
        return "text_projection", lambda a: a.T
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
        raise KeyError(f"no OpenCLIP name for parameter {key!r}")
    i, module, leaf = m.groups()
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if module in qkv:                         # fused in_proj: rows [q; k; v] (another height: reported whole)
        s = slice(qkv[module] * hidden_size, (qkv[module] + 1) * hidden_size)
        return f"transformer.resblocks.{i}.attn.in_proj_{leaf}", lambda a: a[s] if len(a) == 3 * hidden_size else a
    return f"transformer.resblocks.{i}.{_OPENCLIP_LAYER.get(module, module)}.{leaf}", None


def ldm_sources(pipe, shapes: dict, layout: str) -> list[tuple[str, Any, dict[str, tuple[str, Callable | None]]]]:
    """``[(component, parameter shapes, {diffusers key: (file key, transform)})]`` for the pipeline
    ``pipe`` (its configs) and its parameter tree ``shapes`` (arrays or ``ShapeDtypeStruct``)."""
    def keys(tree):
        return [torch_key("/".join(p)) for p in traverse_util.flatten_dict(tree)]

    urows, vrows = unet_rows(pipe.unet.config), vae_rows(pipe.vae.config)
    out = [("unet", shapes["unet"], {k: (UNET + _by_rows(urows, k), None) for k in keys(shapes["unet"])})]
    vae = {}
    for k in keys(shapes["vae"]):
        src = VAE + _by_rows(vrows, k)
        vae[k] = (src, _conv1x1_to_linear if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", src) else None)
    out.append(("vae", shapes["vae"], vae))
    for i, (prefix, enc, tree) in enumerate(zip(LAYOUTS[layout], pipe.text_encoders, shapes["text_encoders"])):
        table = {}
        for k in keys(tree):
            src, fn = (k, None) if prefix.endswith(".transformer.") else openclip_source(k, enc.config.hidden_size)
            table[k] = (prefix + src, fn)
        out.append((f"text_encoder{'_2' if i else ''}", tree, table))
    return out


# ----------------------------------------------------------------------------------------------
# Layout, configs, tokenizers


def detect_layout(keys, name: str) -> str:
    """"sd1" | "sd2" | "sdxl" from a file's tensor names, or a ValueError naming the file and a key."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    sample = next((k for k in sorted(keys) if not any(re.fullmatch(p, k) for p, _ in DROPPED)), None)
    if not has(UNET):
        hint = (" (diffusers names: load a diffusers folder with load_stable_diffusion instead)"
                if sample and sample.split(".")[0] in ("down_blocks", "unet", "conv_in", "time_embedding") else "")
        raise ValueError(f"{name}: not a single-file Stable Diffusion checkpoint in the LDM layout: no "
                         f"{UNET}* tensors (e.g. {sample!r}){hint}")
    if has("conditioner.embedders.1.model."):
        if not has(LAYOUTS["sdxl"][0]):
            raise ValueError(f"{name}: SDXL layout without {LAYOUTS['sdxl'][0]}* (the CLIP-L text encoder)")
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"{name}: an SDXL refiner (conditioner.embedders.0.model.*: one OpenCLIP bigG text "
                         "encoder) is not supported")
    for layout in ("sd2", "sd1"):
        if has(LAYOUTS[layout][0]):
            return layout
    raise ValueError(f"{name}: a UNet in the LDM layout but no known text encoder (cond_stage_model.transformer.*, "
                     f"cond_stage_model.model.* or conditioner.embedders.*); e.g. key {sample!r}")


def config_root(configs: str | os.PathLike | None, variant: str | None, layout: str) -> Path:
    """The folder of configs: ``configs`` (a folder, or a variant name), ``variant``, or the
    published configs of ``layout``'s variant."""
    if configs is not None and variant is not None:
        raise ValueError("give configs (a folder) or variant (a name), not both")
    if configs is not None:
        if Path(configs).is_dir():
            return Path(configs)
        if str(configs) not in VARIANTS:
            raise FileNotFoundError(f"configs={str(configs)!r}: neither a folder nor a variant name {VARIANTS}")
        variant = str(configs)
    if variant is None:
        variant = LAYOUT_VARIANT[layout]
        log.info("single-file checkpoint in the %s layout: using the published %r configs", layout, variant)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS} or pass a folder of configs")
    return PUBLISHED_CONFIGS / variant


def tokenizer_folders(root: Path, tokenizer: str | os.PathLike | None, count: int) -> list[Path]:
    """The ``tokenizer/`` (and SDXL ``tokenizer_2/``) folders: under ``tokenizer`` when given (or
    ``tokenizer`` itself for a one-tokenizer model), else under the configs folder ``root``."""
    names = ("tokenizer", "tokenizer_2")[:count]
    base = Path(tokenizer) if tokenizer is not None else Path(root)
    if all((base / n).is_dir() for n in names):
        return [base / n for n in names]
    if tokenizer is not None and count == 1 and any((base / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        return [base]
    want = " and ".join(f"{n}/" for n in names)
    if tokenizer is not None:
        raise FileNotFoundError(f"tokenizer={str(tokenizer)!r}: expected a folder holding {want}"
                                + (" (or a tokenizer folder itself)" if count == 1 else ""))
    raise FileNotFoundError(
        f"{root} has no {want} and a single-file checkpoint holds no tokenizer (nor do the variants' published "
        f"configs): pass tokenizer= a folder holding {want} (e.g. the model's diffusers repository with only its "
        "tokenizer files; config.model.single_file_tokenizer)")


def _family(pipe) -> str:
    if len(pipe.text_encoders) == 2:
        return "sdxl"
    return "sd1" if pipe.text_encoders[0].config.hidden_act == "quick_gelu" else "sd2"


def _dropped(layout: str, pipe) -> list[tuple[str, str]]:
    rules = list(DROPPED)
    if layout == "sd2":
        n = pipe.text_encoders[0].config.num_hidden_layers
        rules.append((rf"cond_stage_model\.model\.(transformer\.resblocks\.{n}\..+|text_projection)",
                      f"SD-2.x's text encoder ends at the penultimate OpenCLIP layer ({n} of {n + 1}, as "
                      "diffusers') and has no projection"))
    return rules


# ----------------------------------------------------------------------------------------------
# Loading


def convert_single_file(state: Mapping[str, Any], pipe, shapes: dict, layout: str, *, name: str = "checkpoint") -> dict:
    """Our parameter tree ``{"unet", "vae", "text_encoders"}`` (float32 numpy) from an LDM-named
    ``state`` (numpy arrays, any float dtype), for the pipeline ``pipe`` with parameter shapes
    ``shapes``. Strict; raises :class:`SingleFileMismatchError` naming the file's keys."""
    used, missing, mismatched, unexpected, parts = set(), set(), [], [], {}
    for part, tree, table in ldm_sources(pipe, shapes, layout):
        sd = {}
        for key, (src, fn) in table.items():
            if src not in state:
                missing.add(src)
                continue
            used.add(src)
            sd[key] = fn(state[src]) if fn else state[src]
        try:
            parts[part] = convert(sd, tree, name=f"{name} ({part})")
        except WeightMismatchError as e:    # missing ones are already counted by their file key
            mismatched += [(table[k][0], f"{part}/{p}", want, tuple(np.shape(state[table[k][0]])))
                           for k, p, want, _ in e.mismatched]
            unexpected += [table[k][0] for k in e.unexpected]
    dropped: dict[str, list[str]] = {}
    rules = _dropped(layout, pipe)
    for key in sorted(set(state) - used):
        why = next((why for pattern, why in rules if re.fullmatch(pattern, key)), None)
        (dropped.setdefault(why, []) if why else unexpected).append(key)
    if missing or unexpected or mismatched:
        raise SingleFileMismatchError(
            name, sorted(missing), unexpected, mismatched,
            hint=f"(the file is {_DESCRIBE[layout]}; the configs must be those of the model it was saved from)")
    for why, keys in dropped.items():
        (log.warning if keys[0].startswith("model_ema.") else log.info)(
            "%s: left out %d tensors, %s: %s", name, len(keys), why, keys[:3] + (["..."] if len(keys) > 3 else []))
    return {"unet": parts["unet"], "vae": parts["vae"],
            "text_encoders": tuple(parts[p] for p in ("text_encoder", "text_encoder_2") if p in parts)}


def _file_keys(path: Path) -> list[str]:
    return [k for k in safetensors_io.read_header(path)[0] if k != "__metadata__"]


def _resolve(path: Path, keys, configs, variant, tokenizer) -> tuple[str, Path, list[Path]]:
    """(layout, configs folder, tokenizer folders) of a file; "" counts as not given."""
    configs, variant, tokenizer = (None if x is not None and not str(x) else x for x in (configs, variant, tokenizer))
    layout = detect_layout(keys, str(path))
    root = config_root(configs, variant, layout)
    return layout, root, tokenizer_folders(root, tokenizer, len(LAYOUTS[layout]))


def tokenizer_paths(path: str | os.PathLike, *, configs=None, variant=None, tokenizer=None) -> list[Path]:
    """The tokenizer folders :func:`load_single_file` would use (reads the file's header only):
    to check prompts before anything loads."""
    path = Path(path)
    return _resolve(path, _file_keys(path), configs, variant, tokenizer)[2]


def load_single_file(path: str | os.PathLike, *, configs: str | os.PathLike | None = None,
                     variant: str | None = None, tokenizer: str | os.PathLike | None = None,
                     dtype: Any = jnp.float32, abstract: bool = False):
    """(pipeline, params) from a single-file LDM checkpoint, as
    :func:`customjax.pipeline.load_stable_diffusion` gives them from a diffusers folder.

    Args:
      path: the ``.safetensors`` file (fp32, fp16 or bf16 tensors; parameters become float32).
      configs: a diffusers folder of the same model (its configs, scheduler and tokenizers are
        read; its weights are not), or a variant name.
      variant: "sd15" | "sd21" | "sdxl": the published configs shipped with customjax. With
        neither, the variant of the file's layout.
      tokenizer: a folder holding ``tokenizer/`` (+ ``tokenizer_2/`` for SDXL), or for SD-1/2 a
        tokenizer folder itself; required when the configs folder has none (every variant).
      dtype: compute dtype. abstract: read the file's header only; parameters are
        ``jax.ShapeDtypeStruct`` (see :func:`load_stable_diffusion`).
    """
    from customjax.pipeline import load_stable_diffusion
    from customjax.tokenizer import load_tokenizer

    path = Path(path)
    state = None if abstract else safetensors_io.load_file(path)
    layout, root, toks = _resolve(path, _file_keys(path) if abstract else list(state), configs, variant, tokenizer)
    pipe, shapes = load_stable_diffusion(root, dtype=dtype, abstract=True)
    if _family(pipe) != layout:
        raise ValueError(f"{path}: the file is {_DESCRIBE[layout]} but the configs {root} are "
                         f"{_DESCRIBE[_family(pipe)]}: pass the configs of the model the file was saved "
                         f"from (or variant {LAYOUT_VARIANT[layout]!r})")
    pipe = dataclasses.replace(pipe, tokenizers=tuple(load_tokenizer(t) for t in toks))
    if abstract:
        return pipe, shapes
    params = convert_single_file(state, pipe, shapes, layout, name=str(path))
    return pipe, jax.tree_util.tree_map(jnp.asarray, params)
