"""Per-concept fine-tuning: ``python -m customjax.finetune``.

    python -m customjax.finetune --config configs/contrastive_inversion.py:sd15 \
        --config.model.path /weights/sd15 --config.encoders.clip /weights/clip-vit-large-patch14 \
        --concept data/teapot --token "<s*>" --workdir runs/teapot
    python -m customjax.finetune --config configs/textual_inversion.py:sd15 --concepts data/concepts ...

``--concept DIR`` (repeatable) or ``--concepts PARENT`` (every sub-folder): folders of a few images of
one concept (:mod:`customjax.concepts.data`). All concepts train at once, stacked along a concept axis
split over the devices (:mod:`customjax.concepts.stack`): one jitted step trains every concept. The
method's stages (``config.stage_order``; Contrastive Inversion: ``inversion,finetune``) run in turn,
each with its own optimizer (AdamW, ``config.stages.<stage>.lr`` / ``.steps``), checkpoints
(``workdir/<stage>/checkpoints``, Orbax; a run resumes where it stopped, SIGTERM saves and exits 75),
``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``; per concept ``concept/<name>/loss``), a
progress bar and previews (``workdir/previews``: ``config.finetune.preview_prompts`` with each concept's
phrase, every ``config.train.preview_every`` steps and at the end of each stage).

Exports (``workdir/export/<concept>/``, :mod:`customjax.concepts.export`): ``learned_embeds.safetensors``
(diffusers' ``load_textual_inversion``), ``pytorch_custom_diffusion_weights.safetensors`` (the
cross-attention K/V under diffusers' Custom Diffusion processor names), DreamBooth's whole pipeline as
a diffusers folder (``model/``), and ``concept.json`` (method, token, the prompt phrase). Sample with
``python -m customjax.txt2img --model BASE --concept workdir/export/<concept> --prompt "a photo of <s*>"``.

A joint method (CLIF, ``configs/clif.py``) learns all concepts in one model: its data are curated into
``workdir/data/`` (:func:`prepare_joint`), one stack entry trains with the batch split over the devices,
and one folder ``workdir/export/clif/`` holds the text encoder, tokenizer and LoRA
(:func:`customjax.concepts.export.export_joint`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from customjax import parallel, resume, trainer
from customjax.checkpoint import Checkpointer, run_path, write_config
from customjax.cli import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, fail, parse_flags
from customjax.concepts import stack as S
from customjax.concepts.data import ConceptBatches, concept_phrase, concept_seed, posteriors, read_concept
from customjax.concepts.tokens import init_rows
from customjax.methods.build import build
from customjax.methods.common import abstract
from customjax.methods.finetune import aux_names, init_words
from customjax.methods.objective import ObjectiveConfig
from customjax.methods.registry import get as get_method
from customjax.train import Diverged, JsonLines, Preemption, every, json_safe, metrics_writer

FLAGS = flags.FLAGS
PROG = "customjax.finetune"


def define_flags() -> None:
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "method config file[:variant[,preset...]]", lock_config=True)
    flags.DEFINE_multi_string("concept", [], "a concept folder (repeatable)")
    flags.DEFINE_string("concepts", None, "a folder whose sub-folders are concept folders")
    flags.DEFINE_string("token", None, "the learnt word (default: config.concept.token, '<s*>')")
    flags.DEFINE_string("class_word", None, "the concepts' class word, when their concept.json names none")
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, previews, export)", required=True)
    flags.DEFINE_integer("stop_after", None, "exit (with a checkpoint) after this many steps of this run; for tests")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-process runs: the concept "
                      "axis spans every process's devices)")


def concept_dirs(concept: list[str], parent: str | None) -> list[Path]:
    dirs = [Path(d) for d in concept]
    if parent:
        p = Path(parent)
        if not p.is_dir():
            raise FileNotFoundError(f"--concepts {parent}: no such folder")
        dirs += sorted(d for d in p.iterdir() if d.is_dir())
    if not dirs:
        raise ValueError("give --concept DIR (repeatable) or --concepts PARENT")
    names = [d.name for d in dirs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"concept folders must have distinct names (they name the exports): {dup}")
    return dirs


@dataclasses.dataclass
class Stage:
    name: str
    parts: tuple[str, ...]
    lr: float
    steps: int
    batch: int = 0          # 0: config.train.batch
    loss: str = "diffusion"  # or the method's own stage loss (CLIF's "contrastive", Eq. 5)


def stages(config) -> list[Stage]:
    out = []
    for name in [s for s in config.stage_order.split(",") if s]:
        if name not in config.stages:
            raise ValueError(f"config.stage_order names {name!r}; config.stages has {sorted(config.stages)}")
        st = config.stages[name]
        out.append(Stage(name, tuple(p for p in st.parts.split(",") if p), float(st.lr), int(st.steps),
                         int(st.get("batch", 0)), str(st.get("loss", "diffusion"))))
    return out


def say(line: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(f"{PROG}: {line}", file=sys.stderr)


@dataclasses.dataclass
class Prepared:
    """What every stage reads: the build, the concepts (padded to the stack size), their initial
    words, the batches and the mesh."""

    config: Any
    built: Any
    concepts: list                 # the user's concepts
    stacked: list                  # padded with copies of the last to a multiple of the devices
    rows: Any                      # (C, K, D) initial words per stacked concept
    batches: Any                   # ConceptBatches, or JointBatches (concepts learnt together)
    mesh: Any
    phrases: list = dataclasses.field(default_factory=list)     # each concept's words in prompts
    slots: list = dataclasses.field(default_factory=list)       # each stack entry's name (its random stream)
    logged: list = dataclasses.field(default_factory=list)      # the names of the metrics' entries
    over: str = "concepts"         # what the mesh's data axis splits: the concepts, or (joint) the batch


def prepare(config, dirs: list[Path], mesh=None, class_dir: str | Path | None = None,
            data_dir: str | Path | None = None) -> Prepared:
    """Reads the concept folders (``config.concept.images`` is set from them for the auxiliary words),
    builds the model, initialises each concept's words from its initializer (the class word) and, with
    ``config.prior.images``, makes (or reads from ``class_dir``) the class images of prior preservation.
    A joint method (CLIF) curates its data into ``data_dir`` (:func:`prepare_joint`)."""
    c = config.concept
    concepts = [read_concept(d, int(config.train.image_size), class_word=c.class_word) for d in dirs]
    if get_method(config.method).joint:
        return prepare_joint(config, concepts, mesh, data_dir)
    for k in concepts:                                # a phrase naming the class needs one, before any model loads
        concept_phrase(c.phrase, c.token, k.class_word)
    if get_method(config.method).auxiliary:        # one auxiliary word per input image
        with config.unlocked():
            c.images = len(concepts[0].images)
    built = build(config)
    tok = built.pipe.tokenizers[0]
    mesh = parallel.make_mesh(1) if mesh is None else mesh
    C = S.pad_to(len(concepts), mesh.shape["data"])
    stacked = concepts + [concepts[-1]] * (C - len(concepts))
    table = np.asarray(built.params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    K = int(built.params["image"]["tokens"]["rows"].shape[0])
    rows = np.stack([init_rows(tok, table, init_words(c, k.class_word, K)) for k in stacked])
    aux, extra = [], {}
    if built.method.auxiliary:
        names = aux_names(c.token, int(c.images), int(c.aux_vectors))
        n = int(c.aux_vectors)
        aux = [names[i * n:(i + 1) * n] for i in range(int(c.images))]
        extra["image_embeds"] = clip_embeddings(built, stacked)
    post = posteriors(built.pipe, built.params["vae"], stacked, bool(c.hflip))
    prior = None
    if int(config.prior.images):
        prior = class_prior(config, built, stacked, Path(class_dir) if class_dir else None)
    return Prepared(config, built, concepts, stacked, rows, ConceptBatches(stacked, tok, config, post, aux=aux,
                                                                           extra=extra, prior=prior), mesh,
                    phrases=[concept_phrase(c.phrase, c.token, k.class_word) for k in concepts],
                    slots=[k.name for k in stacked], logged=[k.name for k in concepts])


def prepare_joint(config, concepts: list, mesh=None, data_dir: str | Path | None = None) -> Prepared:
    """Concepts learnt together in one model (CLIF): their names and class words go to the config
    (``concept.joint_names`` / ``joint_classes``: the method's tokens), the model is built, the contexts
    of G-Aug made or read (:func:`context_images`, ``data_dir/contexts``), the curated set
    (:mod:`customjax.concepts.augment`) written as ArrayRecord to ``data_dir/curated`` and read back from
    there for the batches. One stack entry ("joint"); the mesh's data axis splits its batch."""
    import tempfile

    from customjax.concepts import augment
    from customjax.concepts.data import JointBatches, encode_images

    c = config.concept
    method = get_method(config.method)
    for k in concepts:
        if not k.class_word:
            raise ValueError(f"concept {k.name}: {config.method} initialises its tokens from the super-category "
                             f"word; give it in {k.name}/concept.json ({{\"class\": \"dog\"}}) or --class_word")
    augment.check_masks(concepts)          # before any model loads
    if c.token:
        raise ValueError(f"{config.method} names each concept's tokens after its folder (<name> <name_1>); "
                         f"--token / config.concept.token={c.token!r} does not apply")
    if not config.model.path:
        raise ValueError(f"{config.method} exports its fine-tuned text encoder as a diffusers component folder: "
                         "set --config.model.path to a diffusers folder")
    phrases = [concept_phrase(c.phrase, " ".join(method.concept_tokens(config, k.name)), k.class_word) for k in concepts]
    with config.unlocked():
        c.joint_names = tuple(k.name for k in concepts)
        c.joint_classes = tuple(k.class_word for k in concepts)
    mesh = parallel.make_mesh(1) if mesh is None else mesh
    for st in stages(config):           # the data axis splits each stage's batch
        B = st.batch or int(config.train.batch)
        if B % mesh.shape["data"]:
            raise ValueError(f"config.stages.{st.name}.batch: {B} examples do not split over the mesh's "
                             f"{mesh.shape['data']} data devices")
    built = build(config)
    data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="customjax-joint-"))
    contexts = context_images(config, built, data_dir / "contexts")
    items = augment.curate(concepts, phrases, contexts, config.curation, tuple(c.templates), int(config.seed))
    if jax.process_index() == 0:
        augment.write_curated(items, data_dir / "curated")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("curated")
    items = augment.read_curated(data_dir / "curated")
    n = augment.counts(items)
    say(f"curated {len(items)} examples ({', '.join(f'{v} {k}' for k, v in n.items())}) in {data_dir / 'curated'}")
    vae = built.params["vae"]
    batches = JointBatches(items, built.pipe.tokenizers[0], config,
                           encode=lambda im: encode_images(built.pipe, vae, im),
                           embed=lambda im: image_embeddings(built, im))
    rows = np.asarray(built.params["image"]["tokens"]["rows"])[None]
    return Prepared(config, built, concepts, concepts[:1], rows, batches, mesh, phrases=phrases, slots=["joint"],
                    logged=["joint"], over="batch")


def base_images(config, built, prompt: str, n: int, folder: Path | None) -> np.ndarray:
    """(n, S, S, 3): ``prompt`` sampled by the frozen base (seeds 0..n-1, ``config.sample``, S =
    ``train.image_size``), kept as ``folder/NNNN.png`` and read back from there on a rerun."""
    from customjax.images import save_png
    from customjax.sampling.common import seed_latents
    from customjax.sampling.t2i import txt2img

    s, pipe, size = config.sample, built.pipe, int(config.train.image_size)
    files = sorted(folder.glob("*.png")) if folder and folder.is_dir() else []
    if len(files) >= n:
        return np.stack([read_concept(folder, size).images[i] for i in range(n)])
    say(f"making {n} images of {prompt!r} with the base model")
    f, imgs = pipe.vae_scale, []
    for i in range(0, n, s.batch):
        seeds = list(range(i, min(i + s.batch, n)))
        lat = seed_latents(seeds, (size // f, size // f, pipe.unet.config.in_channels))
        imgs.append(txt2img(pipe, built.params, [prompt] * len(seeds), None, steps=int(s.steps),
                            guidance=float(s.guidance), sampler=s.sampler, height=size, width=size, latents=lat))
    imgs = np.concatenate(imgs)
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            save_png(im, folder / f"{i:04d}.png")
    return imgs


def context_images(config, built, folder: Path) -> list[tuple[str, np.ndarray]]:
    """G-Aug's contexts, (caption, image (S, S, 3)): the images of ``curation.context_dir`` (captions from
    its ``captions.json`` {file name: caption}, else the file stems with ``_`` for spaces), or
    ``curation.context_images`` of each of ``curation.context_prompts`` made by the base (kept in
    ``folder/<k>/``). None when ``curation.global_per_view`` is 0."""
    from customjax.concepts.data import IMAGE_SUFFIXES, _square
    from customjax.data.images import ImageError, open_rgb

    cu, size = config.curation, int(config.train.image_size)
    if not int(cu.global_per_view):
        return []
    if cu.context_dir:
        d = Path(cu.context_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"config.curation.context_dir={d}: no such folder")
        names = json.loads((d / "captions.json").read_text()) if (d / "captions.json").is_file() else {}
        out = []
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                im, _ = open_rgb(f.read_bytes(), str(f))
            except ImageError as e:
                raise ValueError(f"context image {f}: {e}") from None
            out.append((names.get(f.name, f.stem.replace("_", " ")), np.asarray(_square(im, size), np.float32) / 255.0))
        if not out:
            raise ValueError(f"config.curation.context_dir={d} holds no image")
        return out
    return [(prompt, im) for k, prompt in enumerate(cu.context_prompts)
            for im in base_images(config, built, prompt, int(cu.context_images), folder / str(k))]


def class_prior(config, built, concepts, folder: Path | None):
    """DreamBooth's prior preservation (Ruiz et al. 2023, Eq. 2): ``config.prior.images`` images of each
    concept's class made by the frozen base with ``config.prior.prompt`` (seeds 0, 1, ...; kept in
    ``folder/<class>/`` and reused), as (mean, logvar, prompts) for :class:`ConceptBatches`. The loss is
    the mean over the concept's and the class's examples, a prior weight of 1 (the diffusers default)."""
    from customjax.concepts.data import posteriors as encode

    pr, pipe, n = config.prior, built.pipe, int(config.prior.images)
    made = {}
    for cls in dict.fromkeys(k.class_word for k in concepts):
        if not cls:
            raise ValueError("prior preservation needs each concept's class word (concept.json or --class_word)")
        prompt = pr.prompt.format(cls)
        made[cls] = (prompt, base_images(config, built, prompt, n, folder / cls if folder else None))
    from customjax.concepts.data import Concept
    fake = [Concept(k.name, made[k.class_word][1], None, k.class_word, ()) for k in concepts]
    mean, logvar = encode(pipe, built.params["vae"], fake, False)
    return mean[:, :, 0], logvar[:, :, 0], [made[k.class_word][0] for k in concepts]


def check_resume(config, dirs: list[Path], workdir) -> None:
    """Before anything is built: a run resumed in ``workdir`` trains the same concepts with a config
    that trains the same way (:mod:`customjax.resume`; stage step counts and ``finetune.*`` may change)."""
    names = [d.name for d in dirs]
    current = json.loads(config.to_json_best_effort())
    allow = [f"stages.{n}.steps" for n in config.stages] + ["finetune.", "concept.images"]
    for st in stages(config):
        ckpt = Checkpointer(Path(workdir) / st.name, config.train.max_to_keep, False)
        try:
            steps = ckpt.all_steps()
            meta = ckpt.read_meta(steps[0]) if steps else {}
        finally:
            ckpt.close()
        if meta.get("concepts", names) != names:
            raise ValueError(f"{workdir}/{st.name}: its checkpoint trains the concepts {meta['concepts']}, this run "
                             f"{names}; use a new --workdir for another set of concepts")
        if meta.get("config"):
            resume.check(meta["config"], current, steps[0], f"{workdir}/{st.name}", allow)


def finetune(config, dirs: list[Path], workdir: str, stop_after: int | None = None) -> dict:
    """Fine-tunes every concept of ``dirs`` through the config's stages; returns {"status", "step",
    "stage", "concepts", "exports", "loss" (per concept, last logged)}. ``status``: "finished",
    "preempted" or "stopped" (``stop_after`` steps of this run)."""
    from customjax.concepts.preview import ConceptPreview

    workdir_p = run_path(workdir)
    check_resume(config, dirs, workdir_p)
    t0 = time.time()
    p = prepare(config, dirs, class_dir=workdir_p / "class_images", data_dir=workdir_p / "data")
    say(f"{config.method} ({config.variant}): {len(p.concepts)} concept(s) stacked as {len(p.stacked)} on "
        f"{jax.device_count()} device(s), built in {time.time() - t0:.0f} s")
    if jax.process_index() == 0:
        write_config(workdir_p, config)
    writer = metrics_writer(workdir_p)
    log = JsonLines(workdir_p / "metrics.jsonl", after=10 ** 12) if jax.process_index() == 0 else None
    preview = ConceptPreview(config, p.built, p.phrases, [k.images[0] for k in p.concepts], workdir_p, writer, p.mesh,
                             joint=p.over == "batch")
    trained: dict = {"tokens": p.rows}         # per-concept results carried from stage to stage
    status, last, step, exports = "finished", {}, 0, []
    try:
        for st in stages(config):
            status, step, state, last = _run_stage(p, st, trained, workdir_p, log, writer, preview, stop_after)
            if status != "finished":
                break
            carry(trained, state, p.mesh)
        if status == "finished" and jax.process_index() == 0:
            exports = export_all(p, trained, workdir_p / "export")
            say(f"exported {len(exports)} concept(s) to {workdir_p / 'export'}")
    finally:
        if log:
            log.close()
        if writer:
            writer.close()
    return {"status": status, "step": step, "concepts": [k.name for k in p.concepts], "exports": exports, **last}


def carry(trained: dict, state, mesh) -> dict:
    """Keeps a finished stage's words and UNet parameters (host, per concept) for the next stage and
    export; returns ``trained``. Every process calls it (the concept axis may span processes)."""
    params = parallel.to_host(state.params, mesh)
    if "tokens" in params:
        trained["tokens"] = np.asarray(params["tokens"]["rows"])
    if "text" in params:
        trained["text"] = params["text"]
    if params.get("unet"):
        trained["unet"] = params["unet"]
    return trained


def export_all(p: Prepared, trained: dict, folder: Path) -> list[str]:
    """Every concept's files in ``folder/<concept>`` (:func:`customjax.concepts.export.export_concept`);
    concepts learnt together: one folder ``folder/<method>`` (:func:`~customjax.concepts.export.export_joint`)."""
    from customjax.concepts.export import export_concept, export_joint
    if p.over == "batch":
        first = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a)[0], tree)   # noqa: E731
        m = p.built.method
        tokens = [t for k in p.concepts for t in m.concept_tokens(p.config, k.name)]
        text = first(trained["text"]) if "text" in trained else p.built.params["image"]["text"]
        unet = first(trained["unet"]) if "unet" in trained else None
        return [str(export_joint(p.config, p.built, p.concepts, {k.name: ph for k, ph in zip(p.concepts, p.phrases)},
                                 tokens, trained["tokens"][0], text, unet, Path(folder) / p.config.method))]
    out = []
    for i, k in enumerate(p.concepts):
        unet = jax.tree_util.tree_map(lambda a: a[i], trained["unet"]) if "unet" in trained else None
        out.append(str(export_concept(p.config, p.built, k, trained["tokens"][i], unet, Path(folder) / k.name)))
    return out


def clip_embeddings(built, concepts) -> np.ndarray:
    """(C, N, P): the frozen CLIP image embeddings of each concept's N images (Eq. 2's tau_I(x_j))."""
    return np.stack([image_embeddings(built, k.images) for k in concepts])


def image_embeddings(built, images: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(N, P) unit vectors: the method's frozen CLIP image tower (``image_side.clip``, parameters
    ``params["image"]["clip"]``) on ``images`` (N, S, S, 3) in [0, 1], resized to its input size."""
    from customjax.models.pixels import resize_images
    clip, p = built.image_side.clip, built.params["image"]["clip"]
    s = clip.vision.config.image_size
    fn = jax.jit(lambda p, im: clip.embed_image(p, resize_images(im, s)))
    return np.concatenate([np.asarray(fn(p, jnp.asarray(images[i:i + chunk]))) for i in range(0, len(images), chunk)])


def stage_setup(built, st: Stage, config, rows, names, carried: dict | None = None):
    """(stage's built, frozen, initial stacked state, tx, step) for the concepts ``names`` with stacked
    words ``rows`` (C, K, D) (shapes only when the build is abstract); each concept's key is its own
    (:func:`~customjax.concepts.data.concept_seed`). ``carried["text"]``: a text encoder an earlier stage
    fine-tuned (stacked), frozen here when this stage does not train it (else the base's copy)."""
    b = dataclasses.replace(built, method=built.method.stage(st.parts, st.loss))
    frozen, trainable = trainer.split(b)
    optim = config.optim.copy_and_resolve_references()
    with optim.unlocked():
        optim.lr, optim.total_steps = st.lr, st.steps
    tx = trainer.make_optimizer(optim)
    keys = [jax.random.fold_in(jax.random.key(config.seed), concept_seed(n)) for n in names]

    def make(trainable, rows):
        per = []
        for i in range(rows.shape[0]):
            t = dict(trainable)
            if "tokens" in t:
                t["tokens"] = {"rows": rows[i]}
            per.append(trainer.init_state(t, tx, keys[i], ema=False))
        return S.stack(per)

    state = jax.eval_shape(make, trainable, rows) if abstract(config) else make(trainable, jnp.asarray(rows))
    if "tokens" not in trainable:
        frozen["tokens"] = {"rows": rows if abstract(config) else jnp.asarray(rows)}
    if "text" in frozen:
        C = rows.shape[0]
        text = (carried or {}).get("text")
        frozen["text"] = text if text is not None else jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((C,) + a.shape, a.dtype) if abstract(config) else jnp.broadcast_to(a, (C,) + a.shape),
            frozen["text"])
    return b, frozen, state, tx, trainer.make_train_step(b, tx, ObjectiveConfig(**config.objective))


def _run_stage(p: Prepared, st: Stage, trained, workdir, log, writer, preview, stop_after):
    config, mesh, batches = p.config, p.mesh, p.batches
    names, logged = [k.name for k in p.concepts], p.logged
    curve = {int(x) for x in config.finetune.get("curve", ())}
    on_curve = st.name == stages(config)[-1].name
    b, frozen, state0, tx, step_fn = stage_setup(p.built, st, config, trained["tokens"], p.slots, trained)
    batches = batches.for_stage(st, b.method.needs)
    first = {k: v for k, v in batches(0).items() if k != "caption"}
    jstep, state_sh, frozen_sh = S.compile_stacked(step_fn, mesh, state0, frozen,
                                                   parallel.batch_shapes(first, whole=True), p.over)
    ckpt = Checkpointer(workdir / st.name, config.train.max_to_keep, config.train.async_save)
    start = 0
    saved = json.loads(config.to_json_best_effort())
    if ckpt.all_steps():
        abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                          state0, state_sh)
        start, state, _, _, unreadable = ckpt.restore_readable(abstract)
        for s, err in unreadable:
            logging.error("%s: checkpoint step %d cannot be read (%s); resuming from step %d", st.name, s, err, start)
            if jax.process_index() == 0:
                ckpt.set_aside(s)
        say(f"{st.name}: resumed from step {start} of {st.steps}")
    else:
        state = trainer.place(state0, state_sh)
    frozen = trainer.place(frozen, frozen_sh)
    preemption = Preemption(ckpt)
    bar = tqdm(total=st.steps, initial=start, desc=st.name, unit="step", disable=jax.process_index() != 0)
    step, status, last, t_log = start, "finished", {}, time.time()
    max_bad = int(config.train.get("max_bad_steps", 5))
    try:
        while step < st.steps:
            batch = S.place_batch({k: v for k, v in batches(step).items() if k != "caption"}, mesh, p.over)
            state, metrics = jstep(state, frozen, batch)
            step += 1
            bar.update(1)
            preempted = preemption.reached(step)
            if every(step, config.train.log_every) or step == st.steps:
                m = jax.device_get(metrics)
                per = {k: np.asarray(v)[:len(logged)] for k, v in m.items()}
                last = {"stage": st.name, "loss": [float(x) for x in per["loss"]]}
                rec = {"step": step, "stage": st.name, "seconds": time.time() - t_log,    # since the last record
                       **{k: float(v.mean()) for k, v in per.items()},
                       "concepts": {n: float(per["loss"][i]) for i, n in enumerate(logged)}}
                t_log = time.time()
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if log:
                    log.write(rec)
                if writer:
                    for k, v in rec.items():
                        if isinstance(v, float):
                            writer.add_scalar(f"{st.name}/{k}", v, step)
                    for n_, v in rec["concepts"].items():
                        writer.add_scalar(f"concept/{n_}/loss", v, step)
                if per["bad_steps"].max() > max_bad:
                    ckpt.wait()
                    raise Diverged(f"{st.name}: {int(per['bad_steps'].max())} consecutive non-finite steps up to step "
                                   f"{step} (lr {st.lr}); the last good checkpoint is kept, nothing was exported")
            if not preempted and (every(step, config.train.preview_every) or step == st.steps):
                preview(st.name, step, b, frozen, state)
            if on_curve and step in curve and step < st.steps:
                now = carry(dict(trained), state, mesh)
                if jax.process_index() == 0:
                    export_all(p, now, workdir / "curve" / str(step))
            done = step == st.steps or preempted or (stop_after is not None and step - start >= stop_after)
            if every(step, config.train.save_every) or done:
                ckpt.save(step, state, {"step": step}, {"step": step, "stage": st.name, "concepts": names,
                                                        "config": saved}, force=True)
            if done:
                status = "finished" if step == st.steps else ("preempted" if preempted else "stopped")
                break
    finally:
        preemption.close()
        bar.close()
        ckpt.close()
    return status, step, state, last


def main(argv) -> None:
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.config is None:
        fail(PROG, "--config is required, e.g. --config configs/textual_inversion.py:shapeworld")
    config = FLAGS.config
    try:
        with config.unlocked():
            if FLAGS.token:
                config.concept.token = FLAGS.token
            if FLAGS.class_word:
                config.concept.class_word = FLAGS.class_word
        dirs = concept_dirs(FLAGS.concept, FLAGS.concepts)
        out = finetune(config, dirs, FLAGS.workdir, FLAGS.stop_after)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        sys.exit(EXIT_USAGE)
    except Diverged as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        sys.exit(EXIT_DIVERGED)
    print(json.dumps(json_safe({k: v for k, v in out.items() if k != "loss"})))
    sys.stdout.flush()
    if out["status"] == "preempted":
        logging.warning("preemption: saved and stopped (exit code %d: run the same command to resume)", EXIT_PREEMPTED)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags(PROG))
