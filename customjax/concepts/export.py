"""A fine-tuned concept as files other tools read, and back into a pipeline.

``export_concept`` writes ``<out>/concept.json`` (method, token, the prompt phrase, class word) and, as
the method trained them:
  * ``learned_embeds.safetensors``: {token: (1, D)}, what diffusers' ``load_textual_inversion`` reads
    (Textual Inversion, Custom Diffusion, Contrastive Inversion; the auxiliary words are dropped);
  * ``pytorch_custom_diffusion_weights.safetensors``: every cross-attention K / V under diffusers'
    Custom Diffusion processor names (``pipe.unet.load_attn_procs``; Custom Diffusion, Contrastive
    Inversion's stage 2 without K^a, V^a);
  * ``model/``: a whole diffusers pipeline folder with the word in its tokenizer (DreamBooth).

``export_joint`` writes one folder for concepts learnt together (CLIF): ``text_encoder/`` and
``tokenizer/`` (diffusers components: the fine-tuned text encoder, every concept's tokens added),
``pytorch_lora_weights.safetensors`` (the UNet's LoRA, PEFT / diffusers names: ``load_lora_weights``)
or the Custom Diffusion K / V file, and ``concept.json`` with each concept's words.

``load_concept`` reads such a folder into a (pipeline, params) pair for text-to-image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import traverse_util

from customjax.concepts import files
from customjax.concepts.tokens import add_placeholders, wider_pipe, with_table
from customjax.control.params import merge

TOKEN_FILE = "learned_embeds.safetensors"
KV_FILE = "pytorch_custom_diffusion_weights.safetensors"
CONCEPT_FILE = "concept.json"


def export_concept(config, built, concept, rows: np.ndarray, unet_trained, out: Path) -> Path:
    """Writes one concept's files to ``out`` (see the module docstring); ``rows``: its learnt rows (S*
    first), ``unet_trained``: its trained UNet parameters (a partial tree) or None."""
    from customjax.concepts.data import concept_phrase

    c = config.concept
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method = built.method
    meta = {"method": method.name, "token": c.token, "phrase": concept_phrase(c.phrase, c.token, concept.class_word),
            "class": concept.class_word, "images": list(concept.files), "base": config.model.path}
    trained = set(p for st in config.stage_order.split(",") if st for p in config.stages[st].parts.split(","))
    word = {c.token: np.asarray(rows[:1], np.float32)}
    if "unet" in trained:
        if not config.model.path:
            raise ValueError("DreamBooth exports a whole pipeline folder: config.model.path must be a diffusers folder")
        unet = sampling_unet(merge(_frozen_unet(built, unet_trained), unet_trained))
        files.write_pipeline(config.model.path, out / "model", unet_params=unet, added_tokens=word)
        meta["model"] = "model"
    else:
        files.save_token_file(out / TOKEN_FILE, word, metadata={"method": method.name})
        meta["token_file"] = TOKEN_FILE
        if "kv" in trained:
            kv = {k: v for k, v in traverse_util.flatten_dict(unet_trained).items() if not k[-2].endswith("_aux")}
            unet = merge(_frozen_unet(built, traverse_util.unflatten_dict(kv)), traverse_util.unflatten_dict(kv))
            from customjax.weights.safetensors_io import save_file
            save_file(files.custom_diffusion_state(sampling_unet(unet)), out / KV_FILE, metadata={"method": method.name})
            meta["kv_file"] = KV_FILE
    (out / CONCEPT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def export_joint(config, built, concepts, phrases: dict, tokens: list[str], rows: np.ndarray, text_params,
                 unet_trained, out: Path) -> Path:
    """Writes concepts learnt together (see the module docstring); ``tokens`` / ``rows`` (K, D): every
    concept's placeholder tokens and their rows, ``text_params``: the (fine-tuned) text encoder,
    ``unet_trained``: the trained UNet entries (LoRA pairs, K / V) or None."""
    from customjax.weights.lora import LORA_FILE, lora_state
    from customjax.weights.safetensors_io import save_file

    if not config.model.path:
        raise ValueError(f"{built.method.name} exports its text encoder as a diffusers component folder: "
                         "config.model.path must be a diffusers folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text_encoder(config.model.path, out, text_params, dict(zip(tokens, np.asarray(rows, np.float32))))
    meta = {"method": built.method.name, "base": config.model.path, "text_encoder": "text_encoder", "tokenizer": "tokenizer",
            "concepts": {k.name: {"phrase": phrases[k.name], "class": k.class_word, "images": list(k.files)} for k in concepts}}
    flat = traverse_util.flatten_dict(unet_trained or {})
    if any(n in ("lora_down", "lora_up") for k in flat for n in k):
        lora = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "lora_down" in k or "lora_up" in k})
        save_file(lora_state(lora, built.image_side.lora_scale), out / LORA_FILE, metadata={"method": built.method.name})
        meta["lora_file"] = LORA_FILE
    kv = {k: v for k, v in flat.items() if k[-2] in ("to_k", "to_v") and "attn2" in k}
    if kv:
        kv = traverse_util.unflatten_dict(kv)
        save_file(files.custom_diffusion_state(sampling_unet(merge(_frozen_unet(built, kv), kv))), out / KV_FILE,
                  metadata={"method": built.method.name})
        meta["kv_file"] = KV_FILE
    (out / CONCEPT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_joint(pipe, params: dict, folder: str | Path):
    """(pipe, params, meta) of :func:`export_joint`'s folder: its text encoder and tokenizer in place of the
    base's, its LoRA merged into the UNet kernels, its K / V set."""
    import dataclasses

    from customjax.models.clip_text import clip_text_spec
    from customjax.tokenizer import load_tokenizer
    from customjax.weights.lora import load_lora
    from customjax.weights.loaders import load_pretrained
    from customjax.weights.safetensors_io import load_file

    folder = Path(folder)
    meta = read_concept_meta(folder)
    if pipe.is_sdxl:
        raise ValueError(f"{folder}: concepts learnt together load into SD-1.x / 2.x pipelines (one text encoder)")
    enc, tp, _ = load_pretrained(folder / meta["text_encoder"], clip_text_spec(None))
    tok = load_tokenizer(folder / meta["tokenizer"])
    if len(tok) != enc.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tok)} tokens, the text encoder's table {enc.config.vocab_size} rows")
    unet = params["unet"]
    if meta.get("lora_file"):
        unet = load_lora(load_file(folder / meta["lora_file"]), unet, str(folder / meta["lora_file"]))
    if meta.get("kv_file"):
        unet = files.load_custom_diffusion(load_file(folder / meta["kv_file"]), unet, str(folder / meta["kv_file"]))
    wide = dataclasses.replace(pipe, text_encoders=(enc,), tokenizers=(tok,))
    return wide, dict(params, unet=unet, text_encoders=(tp,)), meta


def _frozen_unet(built, trained) -> dict:
    """The built UNet's parameters minus the paths of ``trained``."""
    have = set(traverse_util.flatten_dict(trained or {}))
    flat = traverse_util.flatten_dict(built.params["unet"])
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in have})


def sampling_unet(unet_params, lora_scale: float = 1.0) -> dict:
    """The UNet parameters without the training-only extra K/V (Contrastive Inversion's K^a, V^a), LoRA
    pairs merged into their kernels (:func:`customjax.weights.lora.fold_lora`): the plain UNet's."""
    from customjax.weights.lora import fold_lora

    flat = traverse_util.flatten_dict(unet_params)
    out = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not any(n.endswith("_aux") for n in k)})
    return fold_lora(out, lora_scale) if any("lora_down" in k for k in flat) else out


def read_concept_meta(folder: str | Path) -> dict:
    path = Path(folder) / CONCEPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONCEPT_FILE} (a folder written by customjax.finetune's export)")
    return json.loads(path.read_text())


def concept_pipe(pipe, token: str):
    """A pipeline that reads the learnt word ``token`` (one vector): a copy of the tokenizer with the
    word added, the text encoder's table one row wider. Make it once and sample any number of concepts
    exported with that word through :func:`concept_params` (one compiled sampler)."""
    import copy
    import dataclasses

    if pipe.is_sdxl:
        raise ValueError("learnt words are supported on SD-1.x / 2.x pipelines (one text encoder)")
    tok = copy.deepcopy(pipe.tokenizers[0])
    vocab = pipe.text_encoders[0].config.vocab_size
    if len(tok) != vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, the text encoder's table {vocab} rows")
    ids = add_placeholders(tok, [token])
    if ids != [vocab]:
        raise ValueError(f"the word {token!r} is already in the tokenizer (id {ids[0]})")
    return dataclasses.replace(wider_pipe(pipe, 1), tokenizers=(tok,) + tuple(pipe.tokenizers[1:]))


def concept_params(pipe, base_params: dict, folder: str | Path) -> tuple[dict, dict]:
    """(params, meta): the base parameters with the concept exported to ``folder`` (its word's row, its
    K / V; DreamBooth: its whole pipeline's UNet and text encoder) for ``pipe`` from :func:`concept_pipe`."""
    folder = Path(folder)
    meta = read_concept_meta(folder)
    vocab = pipe.text_encoders[0].config.vocab_size - 1
    tok = pipe.tokenizers[0]
    if tok.convert_tokens_to_ids(meta["token"]) != vocab:
        raise ValueError(f"{folder}: the concept's word is {meta['token']!r}; the pipeline reads "
                         f"{tok.convert_ids_to_tokens(vocab)!r} (make it with concept_pipe(pipe, {meta['token']!r}))")
    if meta.get("model"):
        from customjax.pipeline import load_stable_diffusion
        _, params = load_stable_diffusion(folder / meta["model"])
        table = params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"]
        if table.shape[0] != vocab + 1:
            raise ValueError(f"{folder / meta['model']}: its text encoder has {table.shape[0]} rows, expected {vocab + 1}")
        return dict(base_params, unet=params["unet"], text_encoders=params["text_encoders"]), meta
    words = files.load_token_file(folder / meta["token_file"])
    if list(words) != [meta["token"]] or np.shape(words[meta["token"]]) != (1, pipe.text_encoders[0].config.hidden_size):
        raise ValueError(f"{folder / meta['token_file']}: expected one vector for {meta['token']!r} of width "
                         f"{pipe.text_encoders[0].config.hidden_size}; got { {k: np.shape(v) for k, v in words.items()} }")
    params = with_table(base_params, words[meta["token"]], vocab)
    if meta.get("kv_file"):
        from customjax.weights.safetensors_io import load_file
        unet = files.load_custom_diffusion(load_file(folder / meta["kv_file"]), base_params["unet"],
                                           str(folder / meta["kv_file"]))
        params = dict(params, unet=unet)
    return params, meta


def load_concept(pipe, params: dict, folder: str | Path):
    """(pipe, params, meta) that sample the concept exported to ``folder`` with text-to-image (concepts
    learnt together: :func:`load_joint`; ``meta["concepts"]`` names their phrases)."""
    meta = read_concept_meta(folder)
    if "concepts" in meta:
        return load_joint(pipe, params, folder)
    wide = concept_pipe(pipe, meta["token"])
    p, meta = concept_params(wide, params, folder)
    return wide, p, meta
