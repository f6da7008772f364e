"""Preview samples during training: a few fixed cases sampled with the current adapter, written
with their guidance masks (``workdir/previews`` and TensorBoard ``preview/samples``,
``preview/masks``).

The cases are the first ``config.train.preview_count`` cases of ``config.sample.prompts`` (the
sample CLI's JSONL: prompt, words, references, seeds), or else examples of the first training
batch: its caption, a subject word guessed from it (:func:`subject_word`: the head of the first
noun phrase, "circle" in "a red circle on a blue background"; set ``sample.prompts`` for real
subjects) and its reference image. Each case uses its first seed (batch examples: ``sample.seeds[0]
+ i``), so successive previews start from the same noise.

The dual-branch sampler (``config.sample`` steps / sampler / size, ``config.guidance``) runs with
the trainable tree (EMA when enabled) merged into the frozen parameters inside one jitted function,
compiled once ahead of time with the training shardings (a failing setup surfaces at start-up, not
at the first preview). Every process runs it on the same inputs (parameters may be split across
processes); its outputs are replicated and only process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from customjax import parallel, trainer
from customjax.checkpoint import run_path
from customjax.control.params import merge
from customjax.images import case_rows, grid, overlay, resize_reference, save_png, sheet, to_uint8
from customjax.methods.build import Built, guidance_config, reference_size, sampler_params, sampling_side
from customjax.sampling.batch import batch_inputs, negative_ids, pad_to
from customjax.sampling.cases import CaseError, check_case, load_image, read_cases
from customjax.sampling.common import cached_sampler
from customjax.sampling.dual_branch import dual_branch_sample
from customjax.tokenizer import word_token_positions

_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some", "my", "his", "her", "its", "their",
                "one", "two", "three", "four", "several", "many"}
_BOUNDARIES = {"on", "in", "with", "at", "of", "and", "or", "near", "by", "under", "over", "behind", "beside",
               "next", "against", "from", "for", "to", "into", "onto", "above", "below", "inside", "is", "are",
               "wearing", "holding", "sitting", "standing", "lying", "that", "which", "who", "while", "as"}
_FRAMES = {"photo", "photograph", "picture", "image", "painting", "drawing", "illustration", "portrait", "render",
           "rendering", "close-up", "closeup", "shot", "view", "sketch"}


def subject_word(caption: str) -> str | None:
    """A guess at the subject of a caption: the last word of its first noun phrase (the words before
    the first preposition / conjunction / verb of a short list), skipping a leading "a photo of";
    ``None`` for a caption without words. For previews only."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", caption)
    lower = [w.lower() for w in words]
    start = 0
    while start < len(words):
        end = start
        while end < len(words) and (lower[end] not in _BOUNDARIES or end == start):
            end += 1
        phrase = [i for i in range(start, end) if lower[i] not in _DETERMINERS]
        if phrase and lower[phrase[-1]] in _FRAMES and end < len(words) and lower[end] == "of":
            start = end + 1       # "a photo of <subject>"
            continue
        if phrase:
            return words[phrase[-1]]
        start = end + 1
    return words[-1] if words else None


@dataclasses.dataclass
class Cases:
    """Preview cases: ``prompts``, ``words`` (per case, J each), ``references`` (n, R, S, S, 3)
    float in [0, 1], ``seeds``."""

    prompts: list[str]
    words: list[list[str]]
    references: np.ndarray
    seeds: list[int]


def cases_from_file(path: str, tokenizer, references_mode: str, count: int, ref_size: int, seed: int = 0,
                    words_required: bool = True) -> Cases:
    """The first ``count`` cases of a sample-CLI JSONL file with as many words as the first one
    (one compiled shape); every case is read and checked as the sample CLI does
    (:mod:`customjax.sampling.cases`)."""
    prompts, words, refs, seeds = [], [], [], []
    for c in read_cases(path):
        if len(prompts) == count:
            break
        where = c["_where"]
        ws, rs = check_case(c, tokenizer, references_mode, where, words_required)
        if words and len(ws) != len(words[0]):
            logging.warning("preview: %s has %d words, the first case %d; skipped", where, len(ws), len(words[0]))
            continue
        prompts.append(c["prompt"])
        words.append(ws)
        refs.append(np.stack([resize_reference(load_image(r, where), ref_size) for r in rs]))
        seeds.append(int((c.get("seeds") or [seed])[0]))
    if not prompts:
        raise CaseError(f"{path}: no cases")
    return Cases(prompts, words, np.stack(refs).astype(np.float32), seeds)


def cases_from_batch(batch: dict, tokenizer, count: int, ref_size: int, seed: int) -> Cases | None:
    """Up to ``count`` examples of a (local) training batch whose caption has a subject word;
    process 0's choice on every process."""
    captions = [str(c) for c in batch["caption"]][:count]
    refs = np.asarray(batch["reference"], np.float32)[:count]
    if jax.process_count() > 1:  # every process must sample the same inputs
        from jax.experimental import multihost_utils

        raw = np.zeros((len(captions), 512), np.uint8)
        for i, c in enumerate(captions):
            b = c.encode("utf-8")[:512]
            raw[i, :len(b)] = np.frombuffer(b, np.uint8)
        raw, refs = jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all((raw, refs)))
        captions = [bytes(r).rstrip(b"\0").decode("utf-8", "ignore") for r in raw]
    prompts, words, keep = [], [], []
    for i, c in enumerate(captions):
        w = subject_word(c)
        try:
            word_token_positions(tokenizer, c, w or "")
        except ValueError:
            continue
        prompts.append(c)
        words.append([w])
        keep.append(i)
    if not keep:
        return None
    if refs.shape[1] != ref_size:
        refs = np.stack([resize_reference(r, ref_size) for r in refs])
    return Cases(prompts, words, refs[keep][:, None], [seed + i for i in range(len(keep))])


class Preview:
    """``preview(step, trainable, frozen)`` samples the cases and (process 0) writes them; built by
    :func:`make_preview`. ``compile(trainable, frozen)`` once, with the training arrays."""

    def __init__(self, config, built: Built, mesh, cases: Cases, workdir: Path, writer=None):
        pipe = built.pipe
        self.cases, self.writer, self.mesh = cases, writer, mesh
        self.out = run_path(workdir) / "previews"
        gcfg = dataclasses.replace(guidance_config(config), record_masks=False)
        smp = cached_sampler(pipe.schedule, config.sample.sampler, int(config.sample.steps))
        n = len(cases.prompts)
        pad = n + (-n % parallel.batch_size_divisor(mesh))     # pad with the last case (one compiled shape)
        inputs = batch_inputs(pipe, gcfg, pad_to(cases.prompts, pad), pad_to(cases.words, pad),
                              pad_to(cases.seeds, pad), (int(config.sample.height), int(config.sample.width)),
                              init_mask=float(config.guidance.get("init_mask", 0.0)),
                              neg=negative_ids(pipe, pad, config.sample.get("negative_prompt", "")))
        inputs["refs"] = np.stack(pad_to(list(cases.references), pad))
        sh = jax.tree_util.tree_map(lambda a: NamedSharding(mesh, parallel.batch_spec(np.ndim(a))), inputs)
        self.inputs = trainer.place(inputs, sh)
        image_names = tuple(built.params["image"])
        neg = config.sample.get("negative_prompt", "")

        def sample(trainable: dict, frozen: dict, x: dict) -> dict:
            image = {k: trainable[k] if k in trainable else frozen[k] for k in image_names}
            ss = sampling_side(built, config, image)
            refs = x["refs"]
            B, R = refs.shape[:2]
            flat = refs.reshape(B * R, *refs.shape[2:])
            per_ref = lambda t: t.reshape(B, R, *t.shape[1:])
            null = per_ref(ss.null_tokens(flat)) if gcfg.uncond_image == "zero" else None
            params = sampler_params(built, dict(frozen, unet=merge(frozen["unet"], trainable["unet"]), image=image))
            return dual_branch_sample(pipe, built.unet, smp, gcfg, ss.visual, params, x["ids"], x["neg"], x["wm"],
                                      per_ref(ss.tokens(flat)), x["lat"], x["m0"],
                                      zero_uncond=pipe.is_sdxl and not neg, null_feats=null,
                                      text_tokens=ss.text_tokens)

        self._jit = jax.jit(sample, out_shardings=NamedSharding(mesh, P()))
        self._compiled = None
        self._first = True

    def compile(self, trainable: Any, frozen: dict) -> None:
        t0 = time.time()
        self._compiled = self._jit.lower(trainable, frozen, self.inputs).compile()
        logging.info("preview sampler compiled in %.1f s (%d cases)", time.time() - t0, len(self.cases.prompts))

    def __call__(self, step: int, trainable: Any, frozen: dict) -> dict | None:
        """Samples; on process 0 writes ``previews/step_XXXXXX.png`` (the sample CLI's sheet: prompt, reference,
        sample, masks) and ``..._masks.png`` (the overlays alone) and the
        TensorBoard images, and returns {"images", "masks", "seconds"} (None on other processes)."""
        if self._compiled is None:
            self.compile(trainable, frozen)
        t0 = time.time()
        res = jax.block_until_ready(self._compiled(trainable, frozen, self.inputs))
        if jax.process_index() != 0:
            return None
        n = len(self.cases.prompts)
        images, masks = np.asarray(res["images"])[:n], np.asarray(res["masks"])[:n]
        seconds = time.time() - t0
        samples = grid(images)
        over = [overlay(i, m) for i, m in zip(images, masks)]
        overlays = grid(np.stack(over))
        self.out.mkdir(parents=True, exist_ok=True)
        c = self.cases           # the sample CLI's sheet: prompt, reference(s), sample, masks; >= 256 px
        rows = [dict(prompt=p, words=w, seed=s, reference_images=list(r))
                for p, w, s, r in zip(c.prompts, c.words, c.seeds, c.references)]
        save_png(sheet(case_rows(rows, list(images), over if any(c.words) else None)),
                 self.out / f"step_{step:06d}.png")
        save_png(overlays, self.out / f"step_{step:06d}_masks.png")
        if self._first:
            refs = grid(self.cases.references[:, 0])
            save_png(refs, self.out / "references.png")
            (self.out / "cases.json").write_text(json.dumps(
                [dict(prompt=p, words=w, seed=s) for p, w, s in zip(self.cases.prompts, self.cases.words,
                                                                     self.cases.seeds)], indent=2))
        if self.writer is not None:
            self.writer.add_image("preview/samples", to_uint8(samples), step, dataformats="HWC")
            self.writer.add_image("preview/masks", to_uint8(overlays), step, dataformats="HWC")
            if self._first:
                self.writer.add_image("preview/references", to_uint8(refs), step, dataformats="HWC")
                self.writer.add_text("preview/cases", "\n\n".join(
                    f"{p} [{', '.join(w)}]" for p, w in zip(self.cases.prompts, self.cases.words)), step)
            self.writer.add_scalar("preview/seconds", seconds, step)
            self.writer.flush()
        self._first = False
        logging.info("preview at step %d: %d samples in %.1f s -> %s", step, n, seconds, self.out)
        return {"images": images, "masks": masks, "seconds": seconds}


def make_preview(config, built: Built, mesh, batch: dict, workdir: Path, writer=None) -> Preview | None:
    """The run's :class:`Preview`, or None when ``config.train.preview_every`` is 0 or no case is
    usable. ``batch``: the first local training batch (numpy, with ``caption`` and ``reference``)."""
    if not config.train.get("preview_every", 0):
        return None
    count = int(config.train.get("preview_count", 4))
    ref_size = reference_size(config)
    tokenizer = built.pipe.tokenizers[0]
    if config.sample.get("prompts"):
        cases = cases_from_file(config.sample.prompts, tokenizer, config.guidance.references, count, ref_size,
                                int(config.sample.seeds[0]), words_required=guidance_config(config).masked)
    else:
        cases = cases_from_batch(batch, tokenizer, count, ref_size, int(config.sample.seeds[0]))
        if cases is None:
            logging.warning("preview: no caption of the first batch has a usable subject word; set "
                            "config.sample.prompts (a sample-CLI JSONL file). No previews.")
            return None
    return Preview(config, built, mesh, cases, workdir, writer)
