"""The files other tools read after per-concept fine-tuning (numpy only, no torch).

* Textual Inversion token files: the safetensors file of diffusers' ``load_textual_inversion``,
  one token ``{token: float32 (n, D)}`` (n vectors: the token, then ``token_1`` ...); SDXL's is
  ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, the token named by the caller.
* Custom Diffusion weights (``pytorch_custom_diffusion_weights.safetensors``, what diffusers'
  ``UNet2DConditionModel.save_attn_procs`` writes and ``load_attn_procs`` reads): per
  cross-attention layer ``<layer>.processor.to_k_custom_diffusion.weight`` and
  ``to_v_custom_diffusion.weight`` (PyTorch (out, in)); with ``train_q_out`` also
  ``to_q_custom_diffusion.weight`` and ``to_out_custom_diffusion.0.{weight,bias}``.
* A whole diffusers pipeline folder (what DreamBooth exports), optionally with added tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from customjax.weights import safetensors_io
from customjax.weights.convert import to_torch_state, torch_key
from customjax.weights.folder import STEMS, weight_files

SDXL_KEYS = ("clip_l", "clip_g")
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
_FLOATS = {safetensors_io.DTYPES[n] for n in ("F64", "F32", "F16", "BF16")}
_KV = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")
_Q_OUT = ("to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias")
_OURS = dict(zip(_KV + _Q_OUT, ("to_k/kernel", "to_v/kernel", "to_q/kernel", "to_out_0/kernel", "to_out_0/bias")))


# ----------------------------------------------------------------------------------------------
# Textual Inversion token files

def _token_array(where: str, name: str, a: Any) -> np.ndarray:
    """``a`` as float32 (n, D), or a ValueError naming ``where`` and the tensor."""
    a = np.asarray(a)
    if a.dtype not in _FLOATS:
        raise ValueError(f"{where}: tensor {name!r} has dtype {a.dtype}; a token embedding is floating point")
    if a.ndim not in (1, 2) or a.size == 0:
        raise ValueError(f"{where}: tensor {name!r} has shape {a.shape}; a token embedding is (D,) or (n, D)")
    a = np.asarray(a, np.float32).reshape(-1, a.shape[-1])
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: tensor {name!r} holds non-finite values")
    return a


def _check_sdxl(where: str, out: Mapping[str, np.ndarray]) -> None:
    if any(k in out for k in SDXL_KEYS):
        if set(out) != set(SDXL_KEYS) or len(out["clip_l"]) != len(out["clip_g"]):
            raise ValueError(f"{where}: an SDXL token file holds exactly 'clip_l' and 'clip_g' with the "
                             f"same number of vectors; found {({k: v.shape for k, v in out.items()})}")


def save_token_file(path: str | os.PathLike, embeds: Mapping[str, Any], metadata: dict | None = None) -> None:
    """Writes ``{token: (D,) | (n, D)}`` as diffusers' Textual Inversion safetensors file (float32
    (n, D), metadata ``format: pt``). diffusers reads one token per file: give one token, or the
    SDXL pair ``{"clip_l", "clip_g"}``."""
    out = {k: _token_array(str(path), k, v) for k, v in embeds.items()}
    if len(out) != 1 and set(out) != set(SDXL_KEYS):
        raise ValueError(f"{path}: diffusers' load_textual_inversion reads one token per file (or SDXL's "
                         f"'clip_l' and 'clip_g'); got {sorted(out)}: write one file per token")
    _check_sdxl(str(path), out)
    safetensors_io.save_file(out, path, {"format": "pt", **(metadata or {})})


def load_token_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A Textual Inversion safetensors file as ``{token: float32 (n, D)}``. An SDXL file comes back
    as is, under ``"clip_l"`` (n, 768) and ``"clip_g"`` (n, 1280): its token's name is the caller's.
    A file of several tokens (which diffusers does not read) gives them all."""
    try:
        state = safetensors_io.load_file(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    if not state:
        raise ValueError(f"{path}: the token file holds no tensors")
    out = {k: _token_array(str(path), k, v) for k, v in state.items()}
    _check_sdxl(str(path), out)
    return out


# ----------------------------------------------------------------------------------------------
# Custom Diffusion weights

def _attention_layers(unet_params: Any) -> tuple[dict, list[str]]:
    """(flat params keyed by '/'-joined path, the paths of the attention layers, attn1 and attn2)."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(unet_params).items()}
    layers = sorted({p.rsplit("/", 2)[0] for p in flat if p.endswith("/to_k/kernel")
                     and p.rsplit("/", 3)[-3] in ("attn1", "attn2")})
    if not any(p.endswith("/attn2") for p in layers):
        raise ValueError("the UNet parameters hold no cross-attention (attn2) layers")
    return flat, layers


def custom_diffusion_state(unet_params: Any, *, train_q_out: bool = False,
                           self_attn_markers: bool = True) -> dict[str, np.ndarray]:
    """Every cross-attention layer's ``to_k`` / ``to_v`` kernels (and with ``train_q_out`` its
    ``to_q`` / ``to_out.0``) under the names of diffusers' Custom Diffusion processors, PyTorch
    layout, float32: the content of ``pytorch_custom_diffusion_weights.safetensors``.

    ``self_attn_markers`` adds a zero-length tensor ``<attn1 layer>.processor`` per self-attention
    layer: the empty state dict that diffusers' ``.bin`` file holds for those layers and its
    safetensors file drops. ``load_attn_procs(..., _pipeline=pipe)`` sets processors only when it
    gets one per attention layer; the markers make the file give all of them."""
    flat, layers = _attention_layers(unet_params)
    out = {}
    for layer in layers:
        proc = torch_key(layer) + ".processor"
        if layer.endswith("/attn1"):
            if self_attn_markers:
                out[proc] = np.zeros((0,), np.float32)
            continue
        for n in _KV + (_Q_OUT if train_q_out else ()):
            out[f"{proc}.{n}"] = np.ascontiguousarray(np.asarray(flat[f"{layer}/{_OURS[n]}"], np.float32).T)
    return out


def load_custom_diffusion(state: Mapping[str, Any], unet_params: Any, name: str) -> dict:
    """The inverse of :func:`custom_diffusion_state`: ``unet_params`` (a new tree) with the
    cross-attention kernels of ``state`` (file ``name``). Strict: every cross-attention layer's
    ``to_k`` and ``to_v`` must be there, with ``to_q`` / ``to_out.0`` all or none per layer;
    self-attention markers are optional and empty; anything else is an error."""
    flat, layers = _attention_layers(unet_params)
    expected, markers = {}, set()
    for layer in layers:
        proc = torch_key(layer) + ".processor"
        if layer.endswith("/attn1"):
            markers.add(proc)
            continue
        q_out = any(f"{proc}.{n}" in state for n in _Q_OUT)
        for n in _KV + (_Q_OUT if q_out else ()):
            expected[f"{proc}.{n}"] = f"{layer}/{_OURS[n]}"
    problems = [f"missing: {k!r}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected: {k!r}" for k in sorted(set(state) - set(expected) - markers)]
    problems += [f"marker {k!r} is not empty: shape {np.shape(state[k])}"
                 for k in sorted(markers & set(state)) if np.size(state[k])]
    new = dict(flat)
    for key, path in expected.items():
        if key not in state:
            continue
        a = np.asarray(state[key], np.float32)
        want = np.shape(flat[path])[::-1]
        if a.shape != want:
            problems.append(f"wrong shape: {key!r} is {a.shape}, expected {want} (PyTorch layout)")
        else:
            new[path] = np.ascontiguousarray(a.T)
    if problems:
        raise ValueError(f"{name}: Custom Diffusion weights do not fit the UNet:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in new.items()})


# ----------------------------------------------------------------------------------------------
# A whole pipeline folder

def _safetensors_files(folder: Path) -> list[Path]:
    files = weight_files(folder)
    pickled = [f.name for f in files if f.suffix != ".safetensors"]
    if pickled:
        raise ValueError(f"{folder}: weights are PyTorch pickles {pickled}; write_pipeline reads "
                         "safetensors only (convert the folder first)")
    return files


def _is_weight_file(name: str) -> bool:
    return name.split(".")[0] in STEMS and (".safetensors" in name or ".bin" in name)


def _rewrite(src: Path, dst: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """``tensors`` written to ``dst`` with the dtypes and metadata of the file ``src``."""
    header, _ = safetensors_io.read_header(src)
    dtypes = {k: safetensors_io.DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__"}
    out = {k: np.asarray(v).astype(dtypes[k], copy=False) for k, v in tensors.items()}
    safetensors_io.save_file(out, dst, header.get("__metadata__") or {"format": "pt"})


def write_pipeline(base_folder: str | os.PathLike, out_folder: str | os.PathLike, *, unet_params: Any = None,
                   added_tokens: Mapping[str, Any] | None = None) -> Path:
    """Copies the diffusers pipeline folder ``base_folder`` to ``out_folder`` (a new folder), with

    * ``unet_params``: the UNet's weights replaced (diffusers names via :func:`to_torch_state`; the
      key set and shapes must equal the base file's; each tensor keeps the base file's dtype);
    * ``added_tokens`` ``{token: (D,) | (1, D)}``: each token added to ``tokenizer/`` (transformers'
      ``add_tokens`` + ``save_pretrained``, and ``added_tokens.json`` for slow tokenizers) with id
      old vocabulary + k, its vector appended as that row of the text encoder's token embedding
      (``vocab_size`` bumped). One text encoder (SD 1.x / 2.x) and one vector per token only.

    A rewritten component's other weight files (variants) are left out; ``.bin`` weights of a
    rewritten component are refused. Returns ``out_folder``."""
    base, out = Path(base_folder), Path(out_folder)
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"{base}: no model_index.json; expected a diffusers pipeline folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    if out.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"{out}: the output folder is inside the base folder {base}")
    index = json.loads((base / "model_index.json").read_text())
    rewrite: dict[Path, tuple[Path, dict]] = {}      # base file -> (file under out, tensors)

    if unet_params is not None:
        files = _safetensors_files(base / "unet")
        state = to_torch_state(unet_params)
        have = {k: (f, v["shape"]) for f in files for k, v in safetensors_io.read_header(f)[0].items()
                if k != "__metadata__"}
        missing, extra = sorted(set(have) - set(state)), sorted(set(state) - set(have))
        wrong = [f"{k!r}: {state[k].shape} for {tuple(have[k][1])}" for k in sorted(set(have) & set(state))
                 if tuple(state[k].shape) != tuple(have[k][1])]
        if missing or extra or wrong:
            raise ValueError(f"{base / 'unet'}: unet_params do not match the base UNet's weights: missing "
                             f"{missing[:10]}, unexpected {extra[:10]}, wrong shape {wrong[:10]}")
        for f in files:
            rewrite[f] = (out / "unet" / f.name, {k: state[k] for k, (g, _) in have.items() if g == f})

    tokens: dict[str, np.ndarray] = {}
    if added_tokens:
        if (index.get("text_encoder_2") or [None])[0] or (base / "text_encoder_2").is_dir():
            raise ValueError(f"{base}: two text encoders (SDXL); write_pipeline adds tokens to one "
                             "text encoder (SD 1.x / 2.x) only")
        for t, v in added_tokens.items():
            a = _token_array("added_tokens", t, v)
            if len(a) != 1:
                raise ValueError(f"added token {t!r} has {len(a)} vectors; write_pipeline adds "
                                 "single-vector tokens only")
            tokens[t] = a[0]
        tok = _base_tokenizer(base / "tokenizer", tokens)
        files = _safetensors_files(base / "text_encoder")
        src = next((f for f in files if TOKEN_EMBEDDING in safetensors_io.read_header(f)[0]), None)
        if src is None:
            raise ValueError(f"{base / 'text_encoder'}: no tensor {TOKEN_EMBEDDING!r}")
        te = dict(safetensors_io.load_file(src))
        table = te[TOKEN_EMBEDDING]
        n = len(tok)
        if len(table) != n:
            raise ValueError(f"{src}: token embedding has {len(table)} rows for the tokenizer's {n} tokens")
        wrong = {t: v.shape for t, v in tokens.items() if v.shape != table.shape[1:]}
        if wrong:
            raise ValueError(f"added tokens {wrong}: the text encoder's embeddings are ({table.shape[1]},)")
        te[TOKEN_EMBEDDING] = np.concatenate([np.asarray(table, np.float32), np.stack(list(tokens.values()))])
        _add_tokens(tok, list(tokens), base / "tokenizer")
        rewrite[src] = (out / "text_encoder" / src.name, te)

    kept: dict[Path, set[str]] = {}                  # rewritten component -> files to copy as they are
    for f in rewrite:
        chosen = {g.name for g in weight_files(f.parent)}
        chosen |= {i.name for i in f.parent.glob("*.index.json")
                   if chosen & set(json.loads(i.read_text()).get("weight_map", {}).values())}
        kept[f.parent.resolve()] = chosen - {g.name for g in rewrite if g.parent == f.parent}

    def ignore(folder: str, names: list[str]) -> set[str]:
        keep = kept.get(Path(folder).resolve())
        return set() if keep is None else {n for n in names if _is_weight_file(n) and n not in keep}

    shutil.copytree(base, out, ignore=ignore, dirs_exist_ok=True)
    for src, (dst, tensors) in rewrite.items():
        _rewrite(src, dst, tensors)

    if tokens:
        _save_tokenizer(tok, out / "tokenizer")
        _bump_vocab(out / "text_encoder" / "config.json", n + len(tokens))
    return out


def _base_tokenizer(folder: Path, tokens) -> Any:
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    taken = sorted(t for t in tokens if t in tok.get_vocab())
    if taken:
        raise ValueError(f"{folder}: tokens {taken} are already in the vocabulary")
    return tok


def _add_tokens(tok, tokens: list[str], where: Path) -> None:
    n = len(tok)
    tok.add_tokens(tokens)
    ids = tok.convert_tokens_to_ids(tokens)
    if ids != list(range(n, n + len(tokens))):
        raise ValueError(f"{where}: added tokens {tokens} got ids {ids}, expected {n}, {n + 1}, ...")


def _save_tokenizer(tok, out: Path) -> None:
    tok.save_pretrained(out)
    (out / "added_tokens.json").write_text(json.dumps(
        {t: i for t, i in tok.get_added_vocab().items() if i >= tok.vocab_size}, ensure_ascii=False))


def _bump_vocab(cfg_file: Path, vocab: int) -> None:
    cfg = json.loads(cfg_file.read_text())
    cfg["vocab_size"] = vocab
    cfg_file.write_text(json.dumps(cfg, indent=2))


def write_text_encoder(base_folder: str | os.PathLike, out_folder: str | os.PathLike, text_params: Any,
                       added_tokens: Mapping[str, Any]) -> Path:
    """The fine-tuned text encoder ``text_params`` (our tree, ``{"text_model": ...}``) as diffusers
    component folders ``out/text_encoder`` (transformers ``CLIPTextModel``: ``config.json`` and
    ``model.safetensors``) and ``out/tokenizer``, with ``added_tokens`` ``{token: (D,)}`` added to the base
    folder's tokenizer (ids old vocabulary + k) and appended as rows of the token embedding. The key set
    and shapes must be the base's (``position_ids`` buffers aside). Returns ``out``."""
    base, out = Path(base_folder), Path(out_folder)
    if not (base / "text_encoder" / "config.json").is_file() or not (base / "tokenizer").is_dir():
        raise FileNotFoundError(f"{base}: no text_encoder/config.json or tokenizer/ (a diffusers pipeline folder)")
    names = list(added_tokens)
    tok = _base_tokenizer(base / "tokenizer", names)
    flat = traverse_util.flatten_dict(text_params)
    key = ("text_model", "embeddings", "token_embedding", "embedding")
    table = np.asarray(flat[key], np.float32)
    if len(table) != len(tok):
        raise ValueError(f"the text encoder's table has {len(table)} rows for {base / 'tokenizer'}'s {len(tok)} tokens")
    rows = [np.asarray(v, np.float32).reshape(-1) for v in added_tokens.values()]
    flat[key] = np.concatenate([table, np.stack(rows)]) if rows else table
    state = to_torch_state(traverse_util.unflatten_dict(flat))
    have = {k: v["shape"] for f in _safetensors_files(base / "text_encoder")
            for k, v in safetensors_io.read_header(f)[0].items() if k != "__metadata__" and not k.endswith("position_ids")}
    missing, extra = sorted(set(have) - set(state)), sorted(set(state) - set(have))
    wrong = [k for k in set(have) & set(state) if k != TOKEN_EMBEDDING and tuple(have[k]) != state[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"{base / 'text_encoder'}: the text encoder parameters do not match its weights: missing "
                         f"{missing[:10]}, unexpected {extra[:10]}, wrong shape {wrong[:10]}")
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "text_encoder" / "config.json", out / "text_encoder" / "config.json")
    safetensors_io.save_file(state, out / "text_encoder" / "model.safetensors", {"format": "pt"})
    _add_tokens(tok, names, base / "tokenizer")
    _save_tokenizer(tok, out / "tokenizer")
    _bump_vocab(out / "text_encoder" / "config.json", len(tok))
    return out
