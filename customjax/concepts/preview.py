"""Previews during per-concept fine-tuning: ``config.finetune.preview_prompts`` (``{}`` = the concept's
phrase) sampled by text-to-image with each concept's current words and weights, the same noise every
time; one row per concept (its first image beside the samples) in ``workdir/previews/<stage>_<step>.png``
and TensorBoard ``preview/<stage>``, every ``train.preview_every`` steps and at each stage's end (0: none).
Concepts learnt together (``joint``): one model; the prompts' ``{}`` take consecutive concepts (row i:
concepts i, i + 1, ..., their images first), with the fine-tuned text encoder and the LoRA merged."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from customjax.concepts.export import sampling_unet
from customjax.concepts.tokens import with_rows, with_table
from customjax.images import grid, save_png
from customjax.sampling.common import seed_latents
from customjax.sampling.t2i import txt2img


class ConceptPreview:
    def __init__(self, config, built, phrases: list[str], references: list[np.ndarray], workdir: Path, writer=None,
                 mesh=None, joint: bool = False):
        self.prompts = tuple(config.finetune.preview_prompts)
        on = bool(self.prompts) and int(config.train.preview_every) > 0       # 0: no previews (as customjax.train)
        self.count = min(int(config.train.get("preview_count", 4)), len(phrases)) if on else 0
        self.phrases, self.workdir, self.writer = phrases, Path(workdir), writer
        self.config, self.built, self.mesh = config, built, mesh
        K = int(built.params["image"]["tokens"]["rows"].shape[0])
        self.vocab = built.image_side.vocab
        D = built.pipe.text_encoders[0].config.hidden_size
        self.pipe, _ = with_rows(built.pipe, built.params, np.zeros((K, D), np.float32))   # made once: one compile
        s = config.sample
        f = built.pipe.vae_scale
        self.latents = seed_latents([int(s.seeds[0])] * max(len(self.prompts), 1),
                                    (s.height // f, s.width // f, built.pipe.unet.config.in_channels))
        self.references = references
        self.joint = joint
        self.slots = max(p.count("{}") for p in self.prompts) if self.prompts else 1
        lora = built.unet.control.lora
        self.lora_scale = lora.scale if lora else 1.0

    def __call__(self, stage: str, step: int, built, frozen: dict, state) -> None:
        if not self.count:
            return
        from customjax import parallel
        trained = parallel.to_host(state.params, self.mesh)          # every process: a collective
        words = trained["tokens"] if "tokens" in trained else parallel.to_host(frozen["tokens"], self.mesh)
        text = trained.get("text") or (parallel.to_host(frozen["text"], self.mesh) if "text" in frozen else None)
        if jax.process_index() != 0:
            return
        from customjax.images import resize_reference
        s = self.config.sample
        rows_out = []
        n = len(self.phrases)
        for c in range(self.count):
            slot = 0 if self.joint else c
            rows = words["rows"][slot]
            unet = self.built.params["unet"]     # this process's copy; the concept's trained entries over it
            if trained.get("unet"):
                flat = traverse_util.flatten_dict(unet)
                flat.update({k: v[slot] for k, v in traverse_util.flatten_dict(trained["unet"]).items()})
                unet = traverse_util.unflatten_dict(flat)
            params = dict(self.built.params, unet=sampling_unet(unet, self.lora_scale))
            if text is not None:
                params["text_encoders"] = (jax.tree_util.tree_map(lambda a: a[slot], text),)
            params = with_table(params, rows, self.vocab)
            shown = [(c + j) % n for j in range(self.slots if self.joint else 1)]
            prompts = [p.format(*[self.phrases[i] for i in shown]) if self.joint else p.format(self.phrases[c])
                       for p in self.prompts]
            imgs = txt2img(self.pipe, params, prompts, None, steps=int(s.steps), guidance=float(s.guidance),
                           sampler=s.sampler, height=s.height, width=s.width, latents=self.latents)
            refs = [resize_reference(self.references[i], imgs.shape[1]) for i in shown]
            rows_out.append(np.concatenate([np.stack(refs), imgs]))
        sheet = grid(np.concatenate(rows_out), cols=len(self.prompts) + len(rows_out[0]) - len(self.prompts))
        out = self.workdir / "previews"
        out.mkdir(parents=True, exist_ok=True)
        save_png(sheet, out / f"{stage}_{step:06d}.png")
        if self.writer is not None:
            self.writer.add_image(f"preview/{stage}", np.asarray(sheet), step, dataformats="HWC")
