"""``python -m customjax.shapeworld.pretrain``: the ShapeWorld base model, from nothing to a diffusers folder.

    python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:cpu --workdir runs/base
    python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:cpu --workdir runs/base --install

Stages: render the training pool (``customjax.shapeworld.world``, training split only), train the
tokenizer, the VAE, the CLIP and the UNet, write ``workdir/model`` (see :mod:`.folder`), and
measure it on held-out prompts (``workdir/model/shapeworld.json``, a sample grid). A finished stage
is kept in ``workdir/stages`` and reused when the command runs again (delete it to retrain).
``--install`` copies the folder to the package (:data:`customjax.shapeworld.assets.SHAPEWORLD_BASE`).
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from flax import serialization
from ml_collections import config_flags
from tqdm import tqdm

from customjax.shapeworld import world as sw
from customjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from customjax.models.unet_config import UNetConfig
from customjax.models.vae import AutoencoderKL, VAEConfig
from customjax.models.vit import CLIPVisionConfig
from customjax.shapeworld.pretrain.clip import train_clip
from customjax.shapeworld.pretrain.evaluate import evaluate, headline
from customjax.shapeworld.pretrain.folder import write_folder
from customjax.shapeworld.pretrain import lineage
from customjax.shapeworld.pretrain.loop import StageConfig
from customjax.shapeworld.pretrain.tokenizer import train_tokenizer
from customjax.shapeworld.pretrain.unet import object_word_masks, train_unet
from customjax.shapeworld.pretrain.vae import encode, train_vae, with_latent_scale
from customjax.sampling.common import SAMPLERS
from customjax.schedulers import ScheduleConfig, noise_schedule
from customjax.tokenizer import load_tokenizer, tokenize
from customjax.zoo import SCHEDULER
from customjax.cli import fail, parse_flags

FLAGS = flags.FLAGS
PROG = "customjax.shapeworld.pretrain"


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "configs/shapeworld_base.py[:cpu|gpu|test]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder", required=True)
    flags.DEFINE_bool("install", False, "copy the finished model into the package (customjax/shapeworld/assets/)")
    flags.DEFINE_string("grid", None, "where to write the evaluation sample grid (default workdir/samples.png)")


def _stage(c) -> StageConfig:
    return StageConfig(steps=c.steps, batch=c.batch, lr=c.lr, warmup=c.warmup, ema=c.get("ema", 0.0),
                       decay=c.get("decay", 0.1))


def _key(c, *sections: str) -> str:
    """What a stage's result depends on: the seed, the pool and the named config sections."""
    return json.dumps([c.seed, c.pool, c.size] + [c[s].to_json_best_effort(sort_keys=True) for s in sections])


def _cached(workdir: Path, name: str, key: str, train):
    """``train(key)`` -> (params, history), or both from ``workdir/stages/name.msgpack`` if it was
    trained with the same ``key`` (see :func:`_key`; an interrupted stage resumes from its
    snapshot when the key matches)."""
    path = workdir / "stages" / f"{name}.msgpack"
    if path.is_file():
        d = serialization.msgpack_restore(path.read_bytes())
        if d.get("settings") == key:
            logging.info("reusing the finished %s stage from %s", name, path)
            return d["params"], json.loads(d["history"])
        logging.warning("%s was trained with other settings; training the %s stage again", path, name)
    params, history = train(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize({"params": jax.device_get(params), "history": json.dumps(history),
                                                      "settings": key}))
    return params, history


def configs(c, tokenizer_dir: Path) -> tuple:
    """(text, vision, VAE, UNet) model configs of the world's stack."""
    tok = load_tokenizer(tokenizer_dir)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=c.clip.hidden_size,
                          intermediate_size=c.clip.intermediate_size, num_hidden_layers=c.clip.num_hidden_layers,
                          num_attention_heads=c.clip.num_attention_heads,
                          max_position_embeddings=c.tokenizer.model_max_length, eos_token_id=tok.eos_token_id,
                          projection_dim=c.clip.projection_dim, with_projection=True)
    vision = CLIPVisionConfig(hidden_size=c.clip.hidden_size, intermediate_size=c.clip.intermediate_size,
                              num_hidden_layers=c.clip.num_hidden_layers, num_attention_heads=c.clip.num_attention_heads,
                              image_size=c.size, patch_size=c.clip.patch_size, projection_dim=c.clip.projection_dim,
                              with_projection=True)
    vae = VAEConfig(block_out_channels=tuple(c.vae.block_out_channels), layers_per_block=c.vae.layers_per_block,
                    norm_num_groups=c.vae.norm_num_groups, latent_channels=c.vae.latent_channels, sample_size=c.size)
    n = len(c.unet.block_out_channels)
    factor = 2 ** (len(c.vae.block_out_channels) - 1)
    unet = UNetConfig(sample_size=c.size // factor, in_channels=c.vae.latent_channels,
                      out_channels=c.vae.latent_channels, block_out_channels=tuple(c.unet.block_out_channels),
                      layers_per_block=(c.unet.layers_per_block,) * n, heads=tuple(c.unet.heads),
                      cross_attention_dim=(c.clip.hidden_size,) * n, transformer_layers=(1,) * n,
                      norm_num_groups=c.unet.norm_num_groups, down_block_types=tuple(c.unet.down_block_types),
                      up_block_types=tuple(c.unet.up_block_types))
    return text, vision, vae, unet


def scheduler_config(c) -> dict:
    """The diffusers DDIM scheduler config of the model: SD's, with the UNet's prediction type,
    beta schedule and inference timestep spacing."""
    u = c.unet
    return dict(SCHEDULER, prediction_type=u.get("prediction_type", "epsilon"),
                beta_schedule=u.get("beta_schedule", SCHEDULER["beta_schedule"]),
                timestep_spacing=u.get("timestep_spacing", SCHEDULER["timestep_spacing"]))


def training_pool(seed: int, n: int, size: int, indices=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images, object maps (N, H, W) uint8: 0 background, j + 1 where object j is drawn,
    captions) of training scenes ``indices`` (default ``range(n)``); scene ``i`` is a pure function
    of ``(seed, i)``, so any part of the pool can be regenerated alone."""
    images, labels, captions = [], [], []
    for i in tqdm(range(n) if indices is None else indices, desc="render", unit="scene", mininterval=5):
        ex_rng = np.random.default_rng([seed, 2, int(i)])
        scene = sw.sample_scene(ex_rng, size)
        captions.append(sw.caption(scene, ex_rng))
        image, masks = sw.render(scene, size)
        images.append(image)
        lab = np.zeros((size, size), np.uint8)
        for j, m in enumerate(masks):
            lab[m] = j + 1
        labels.append(lab)
    return np.stack(images), np.stack(labels), captions


def negative_captions(seed: int, n: int, size: int, indices=None) -> list[str]:
    """A hard-negative caption for each training scene of :func:`training_pool`: the scene's caption
    (same template, same omissions) with one object's category or named position changed
    (:func:`customjax.shapeworld.world.contrast_scene`, position half of the time when the caption
    names one). Scenes are sampled again, not rendered."""
    out = []
    for i in (range(n) if indices is None else indices):
        ex_rng = np.random.default_rng([seed, 2, int(i)])
        scene = sw.sample_scene(ex_rng, size)
        state = ex_rng.bit_generator.state
        positive = sw.caption(scene, ex_rng)
        rng = np.random.default_rng([seed, 3, int(i)])

        def described(s):
            r = np.random.default_rng()
            r.bit_generator.state = state
            return sw.caption(s, r)
        neg = described(sw.contrast_scene(scene, rng, "position")) if rng.random() < 0.5 else positive
        if neg == positive:
            neg = described(sw.contrast_scene(scene, rng, "category"))
        out.append(neg)
    return out


def pretrain(c, workdir, grid_out=None, command: str | None = None) -> Path:
    """Runs every stage; returns the model folder. ``command`` is recorded (default: the
    command of ``c.variant`` without overrides)."""
    if c.eval.sampler not in SAMPLERS:     # before hours of training, not after
        raise ValueError(f"config eval.sampler={c.eval.sampler!r}: choose one of {SAMPLERS}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    parent = lineage.load_parent(c) if c.get("init") else None      # before rendering, not after
    t0 = time.time()
    logging.info("rendering %d training scenes", c.pool)
    images, labels, captions = training_pool(c.seed, c.pool, c.size)
    if parent:
        tok_dir = lineage.copy_tokenizer(parent, workdir / "tokenizer")
    else:
        crng = np.random.default_rng([c.seed, 1])   # more captions (no rendering) so that rare words get merges
        corpus = captions + [sw.caption(sw.sample_scene(crng, c.size), crng) for _ in range(c.tokenizer.captions)]
        tok_dir = train_tokenizer(corpus, workdir / "tokenizer", max_merges=c.tokenizer.max_merges,
                                  model_max_length=c.tokenizer.model_max_length)
    tok = load_tokenizer(tok_dir)
    ids = tokenize(tok, captions)
    text_cfg, vision_cfg, vae_cfg, unet_cfg = configs(c, tok_dir)

    if parent:      # the parent's VAE (with its latent scale) and CLIP, kept as they are
        vae_cfg, vae_p, clip_p = parent.vae_cfg, parent.vae_p, parent.clip_p
        vae_h, clip_h = lineage.inherited_history(parent, "vae"), lineage.inherited_history(parent, "clip")
    else:
        vae_p, vae_h = _cached(workdir, "vae", _key(c, "vae"), lambda k: train_vae(
            vae_cfg, images, labels > 0, _stage(c.vae), workdir, kl_weight=c.vae.kl_weight,
            object_weight=c.vae.object_weight, seed=c.seed, resume_key=k))
    moments = encode(AutoencoderKL(vae_cfg), vae_p, images)
    if not parent:
        vae_cfg = with_latent_scale(vae_cfg, moments[:1024])
        neg_ids = (tokenize(tok, negative_captions(c.seed, c.pool, c.size)) if c.clip.get("hard_negatives", False)
                   else None)
        clip_p, clip_h = _cached(workdir, "clip", _key(c, "tokenizer", "clip"), lambda k: train_clip(
            text_cfg, vision_cfg, images, ids, _stage(c.clip), workdir, seed=c.seed, neg_ids=neg_ids,
            token_weight=c.clip.get("token_weight", 0.0), resume_key=k))
    scheduler = scheduler_config(c)
    sched = noise_schedule(ScheduleConfig.from_dict(scheduler))
    text = CLIPTextModel(text_cfg)
    empty = tokenize(tok, [""])
    train_text = c.unet.get("train_text", False)
    ground = c.unet.get("ground_weight", 0.0)
    words = object_word_masks(tok, captions) if ground else None
    unet_key = _key(c, "tokenizer", "vae", "clip", "unet")
    if parent:      # the same settings from other starting weights are another run
        unet_key = json.dumps([unet_key, parent.unet_sha256])
    unet_p, unet_h = _cached(workdir, "unet", unet_key, lambda k: train_unet(
        unet_cfg, text, clip_p["text"], sched, vae_cfg.scaling_factor, moments, ids, empty, _stage(c.unet),
        workdir, p_uncond=c.unet.p_uncond, prediction_type=c.unet.prediction_type, seed=c.seed,
        labels=labels, object_weight=c.unet.get("object_weight", 0.0), train_text=train_text, words=words,
        ground_weight=ground, init=parent.unet_p if parent else None, resume_key=k))
    text_p = None
    if train_text:      # the text tower trained with the UNet: the pipeline's text encoder
        unet_p, text_p = unet_p["unet"], unet_p["text"]
    command = command or (f"python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:{c.variant} "
                          f"--workdir {workdir}")
    hist = {"vae": vae_h, "clip": clip_h, "unet": unet_h}
    info = dict(command=command, config=json.loads(c.to_json_best_effort()),
                seed=c.seed, jax=jax.__version__, device=str(jax.devices()[0].device_kind), platform=platform.platform(),
                train_seconds=round(time.time() - t0, 1),   # this invocation (a resumed run: its last part)
                stage_seconds={k: h[-1]["seconds"] for k, h in hist.items()},
                final_loss={k: h[-1]["loss"] for k, h in hist.items()},
                loss_curves={k: [(m["step"], m["loss"]) for m in h] for k, h in hist.items()})
    if parent:      # vae and clip above are the parent's; its record says how it was made
        info.update(kept_stages=["tokenizer", "vae", "clip"], unet_init_sha256=parent.unet_sha256,
                    parent=parent.record)
    folder = write_folder(workdir / "model", scheduler=scheduler, tokenizer_dir=tok_dir, unet_cfg=unet_cfg, unet_p=unet_p, vae_cfg=vae_cfg,
                          vae_p=vae_p, text_cfg=text_cfg, vision_cfg=vision_cfg, clip_p=clip_p, info=info,
                          text_p=text_p)
    e = c.eval
    res = evaluate(folder, prompts=e.prompts, steps=e.steps, guidance=e.guidance, batch=e.batch, seed=c.seed,
                   sampler=e.sampler, grid_out=grid_out or workdir / "samples.png", grid_count=e.grid)
    info["eval"] = res
    (folder / "shapeworld.json").write_text(json.dumps(info, indent=2))
    logging.info("held-out prompts: %s", headline(res["summary"]))
    return folder


def main(argv) -> None:
    del argv
    if FLAGS.config is None:
        fail(PROG, "--config is required, e.g. --config configs/shapeworld_base.py:cpu")
    folder = pretrain(FLAGS.config, FLAGS.workdir, FLAGS.grid,
                      command=" ".join(["python -m customjax.shapeworld.pretrain"] + sys.argv[1:]))
    if FLAGS.install:
        from customjax.shapeworld.assets import SHAPEWORLD_BASE
        if SHAPEWORLD_BASE.exists():
            shutil.rmtree(SHAPEWORLD_BASE)
        shutil.copytree(folder, SHAPEWORLD_BASE)
        print(f"installed {folder} -> {SHAPEWORLD_BASE}")
    print(folder)


def run() -> None:
    """The command line (``python -m customjax.shapeworld.pretrain``)."""
    define_flags()
    app.run(main, flags_parser=parse_flags(PROG, ("config",), doc=__doc__))


class LazyRows:
    """A read-only stand-in for an (n, ...) array whose rows are computed on indexing
    (``rows[idx]`` -> ``fn(idx)``), for rerunning a few steps without rendering the whole pool."""

    def __init__(self, n: int, fn):
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.fn(np.atleast_1d(np.asarray(idx)))


def fingerprint(c, folder, workdir, steps: int = 3) -> dict:
    """The losses of the first ``steps`` steps of every stage, rerun from ``c`` (the recorded
    config) with the frozen parts that the UNet stage needs taken from the model ``folder``; equal
    (up to float reduction order and the float16 storage of the frozen weights) to the recorded
    ``loss_curves`` when the command, seed and settings are the same."""
    from customjax.pipeline import load_stable_diffusion

    folder, workdir = Path(folder), Path(workdir)
    rendered = functools.lru_cache(maxsize=4)(lambda key: training_pool(c.seed, c.pool, c.size, key))
    pool = lambda idx: rendered(tuple(int(i) for i in idx))     # each batch rendered once
    tok = load_tokenizer(folder / "tokenizer")
    text_cfg, vision_cfg, vae_cfg, unet_cfg = configs(c, folder / "tokenizer")
    images = LazyRows(c.pool, lambda idx: pool(idx)[0])
    ids = LazyRows(c.pool, lambda idx: tokenize(tok, pool(idx)[2]))
    labels = LazyRows(c.pool, lambda idx: pool(idx)[1])
    out = {"vae": train_vae(vae_cfg, images, LazyRows(c.pool, lambda idx: labels[idx] > 0), _stage(c.vae), workdir,
                            kl_weight=c.vae.kl_weight, object_weight=c.vae.object_weight, seed=c.seed,
                            max_steps=steps)[1]}
    neg_ids = (LazyRows(c.pool, lambda idx: tokenize(tok, negative_captions(c.seed, c.pool, c.size, idx)))
               if c.clip.get("hard_negatives", False) else None)
    out["clip"] = train_clip(text_cfg, vision_cfg, images, ids, _stage(c.clip), workdir, seed=c.seed,
                             neg_ids=neg_ids, token_weight=c.clip.get("token_weight", 0.0), max_steps=steps)[1]
    pipe, params = load_stable_diffusion(folder)
    train_text = c.unet.get("train_text", False)
    text, text_p = pipe.text_encoders[0], params["text_encoders"][0]
    if train_text:      # the UNet stage started from the CLIP's text tower
        from customjax.models.clip import load_clip
        clip_model, clip_params = load_clip(folder / "clip")
        text, text_p = clip_model.text, clip_params["text"]
    moments = LazyRows(c.pool, lambda idx: encode(pipe.vae, params["vae"], pool(idx)[0]))
    out["unet"] = train_unet(unet_cfg, text, text_p, noise_schedule(pipe.schedule),
                             pipe.vae.config.scaling_factor, moments, ids, tokenize(tok, [""]), _stage(c.unet),
                             workdir, p_uncond=c.unet.p_uncond, prediction_type=pipe.schedule.prediction_type,
                             seed=c.seed, labels=labels, object_weight=c.unet.get("object_weight", 0.0),
                             train_text=train_text, ground_weight=c.unet.get("ground_weight", 0.0),
                             words=LazyRows(c.pool, lambda idx: object_word_masks(tok, pool(idx)[2])),
                             max_steps=steps)[1]
    return {k: [(m["step"], m["loss"]) for m in h] for k, h in out.items()}
