"""Shared pieces of the method configs: the base model, the dual-branch guidance and sampling
settings, and the ablation presets of the papers' tables, applied by name after the base variant
(``--config configs/realcustompp.py:sdxl,table5_no2``)."""

from __future__ import annotations

import ml_collections

# RealCustom++ Sec. IV-A: SD-1.5 DDIM 50 steps, CFG 12.5, T_stop 25; SDXL DDIM 25 steps, CFG 7.5,
# T_stop 12; gamma_scope 0.2. Attention-map factors are relative to the latent: SD-1.5 latents
# 64x64 have attention at 64/32/16/8 (factors 1/2/4/8), SDXL latents 128x128 at 64/32 (2/4).
MODELS = {
    "tiny": dict(random="sd15", steps=10, t_stop=5, w=7.5, cross=(2,), self_=(1,), mask_factor=1, size=32),
    "tiny_sdxl": dict(random="sdxl", steps=10, t_stop=5, w=7.5, cross=(2,), self_=(2,), mask_factor=2, size=32),
    "sd15": dict(random="", steps=50, t_stop=25, w=12.5, cross=(4, 8), self_=(1,), mask_factor=1, size=512),
    "sdxl": dict(random="", steps=25, t_stop=12, w=7.5, cross=(4,), self_=(2,), mask_factor=2, size=1024),
    # The shipped ShapeWorld base (customjax/shapeworld/assets/shapeworld_base): 64 px images, 16 x 16 latents,
    # cross-attention at 8 x 8 and 4 x 4 (factors 2 and 4).
    "shapeworld": dict(random="", steps=25, t_stop=12, w=5.0, cross=(2,), self_=(2,), mask_factor=2, size=64),
}


def shapeworld_base() -> str:
    from customjax.shapeworld.assets import SHAPEWORLD_BASE
    return str(SHAPEWORLD_BASE)


def base(method: str, variant: str) -> ml_collections.ConfigDict:
    if variant not in MODELS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(MODELS)} (then ablations)")
    m = MODELS[variant]
    c = ml_collections.ConfigDict()
    c.method = method
    c.variant = variant
    c.seed = 0
    c.init_std = 0.02
    # path: a diffusers folder; empty = random weights of kind `random` at `random_scale`
    # ("tiny", or "full" = the real SD-1.5 / SDXL shapes, for benchmarks).
    # path may be one .safetensors (LDM names): single_file_* = its configs folder or sd15|sd21|sdxl, tokenizer folder
    c.model = ml_collections.ConfigDict(dict(path="", random=m["random"] or "sd15", random_scale="tiny",
                                             dtype="float32", single_file_config="", single_file_tokenizer=""))
    # kind: "siglip_dino" (RealCustom++: SigLIP + DINOv2 folders) or "clip" (one CLIP image encoder,
    # `clip`, for both methods; ShapeWorld uses the base model's own image_encoder/).
    c.encoders = ml_collections.ConfigDict(dict(
        kind="siglip_dino", siglip="", dino="", clip="", public=False,
        image_size=28 if variant.startswith("tiny") else 384, scale=2,
        siglip_shallow=(0,) if variant.startswith("tiny") else (7, 13, 19),
        dino_shallow=(0,) if variant.startswith("tiny") else (4, 10, 16)))
    if variant == "shapeworld":
        c.model.path = shapeworld_base()
        c.model.missing_hint = ("the ShapeWorld base model is not installed; make it with `python -m customjax.shapeworld.pretrain "
                                "--config configs/shapeworld_base.py:cpu --workdir runs/base --install`")
        c.encoders.update(dict(kind="clip", clip=c.model.path + "/image_encoder", image_size=64, scale=2,
                               siglip_shallow=(0, 1), dino_shallow=(0, 1)))
    c.guidance = ml_collections.ConfigDict(dict(
        gamma_scope=0.2, norm="max", cross_factors=m["cross"], self_factors=m["self_"],
        mask_factor=m["mask_factor"], multi="algorithm1", t_stop=ml_collections.config_dict.placeholder(int),
        # cfg: the guidance formula, "one_scale" (RealCustom++ Eq. 15) or "two_scale" (RealCustom Eq. 13);
        # uncond_image: the unconditional branch's image, "none" (visual scale 0) or "zero" (the method's
        # null tokens, masked as the generation branch: the released RealCustom++ code, IP-Adapter);
        # init_mask: the constant mask before the first guidance mask (1.0 with t_stop=0: no mask).
        cfg="one_scale", w=m["w"], w_t=7.5, w_i=12.5, visual_scale=1.0, references="many2many",
        uncond_image="none", init_mask=0.0))
    c.guidance.t_stop = m["t_stop"]      # None (no early stop) allowed
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", steps=m["steps"], height=m["size"], width=m["size"], batch=4, seeds=(0,), negative_prompt="",
        record_masks=True, prompts="examples/shapeworld/cases.jsonl" if variant == "shapeworld" else "",
        out="out/sample"))
    return c


# Ablation presets: name -> (paper table row, overrides of config.guidance).
def _all_factors(c):
    return (1, 2, 4, 8) if c.variant in ("sd15", "tiny") else (2, 4)   # SDXL, ShapeWorld: 2, 4


ABLATIONS = {
    # RealCustom++ Table V: which attention builds the mask.
    "table5_no1": ("all-resolution cross-attn", lambda c: dict(cross_factors=_all_factors(c), self_factors=())),
    "table5_no2": ("low-resolution cross-attn (conference version)", lambda c: dict(self_factors=())),
    "table5_no3": ("(2) + all-resolution self-attn", lambda c: dict(self_factors=_all_factors(c))),
    "table5_no4": ("(2) + high-resolution self-attn (AMG)", lambda c: {}),
    # Table VI: Top-K ratio and mask normalisation.
    **{f"gamma{int(g * 100):03d}": (f"gamma_scope={g}", (lambda g: lambda c: dict(gamma_scope=g))(g))
       for g in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)},
    "binary": ("w/o mask norm (binary mask)", lambda c: dict(norm="binary")),
    # Table VII: early-stop step; "no_early_stop" = None.
    **{f"tstop{t}": (f"T_stop={t}", (lambda t: lambda c: dict(t_stop=t))(t)) for t in (5, 10, 12, 15, 20, 25)},
    "no_early_stop": ("w/o early stop regularisation", lambda c: dict(t_stop=None)),
    # Table XII: AMG-S (self-attention augmentation) and AMG-T (early stop) on/off.
    "no_amg_s": ("w/o AMG-S", lambda c: dict(self_factors=())),
    "no_amg_t": ("w/o AMG-T", lambda c: dict(t_stop=None)),
    # Multi-subject: overlapping per-subject Top-K instead of Algorithm 1; One2Many references.
    "overlap": ("masks may overlap", lambda c: dict(multi="overlap")),
    "one2many": ("several words, one reference", lambda c: dict(references="one2many")),
}


def apply_variant(c: ml_collections.ConfigDict, extras: list[str], presets: dict | None = None
                  ) -> ml_collections.ConfigDict:
    """Applies the named presets after the variant: the shared guidance ABLATIONS, or a config
    file's own ``presets`` (name -> function editing the whole config)."""
    presets = presets or {}
    for name in extras:
        if name in presets:
            presets[name](c)
        elif name in ABLATIONS:
            c.guidance.update(ABLATIONS[name][1](c))
        else:
            raise ValueError(f"unknown preset {name!r}; known: {sorted({**ABLATIONS, **presets})}")
    c.ablations = ",".join(extras)
    return c


def split_arg(arg: str, default: str = "shapeworld") -> tuple[str, list[str]]:
    """``"variant,preset,..."`` -> (variant, [presets])."""
    variant, *extras = (arg or default).split(",")
    return variant, extras


def add_train(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Training settings (``python -m customjax.train``). RealCustom++ Sec. IV-A: lr 1e-4,
    160k iterations on 8 GPUs; tiny: a few hundred steps on the CPU."""
    tiny = c.variant.startswith("tiny")
    sw = c.variant == "shapeworld"   # the shipped ShapeWorld base: a few minutes on a CPU
    c.train = ml_collections.ConfigDict(dict(
        steps=200 if tiny else (600 if sw else 160_000), batch=4 if tiny else (8 if sw else 64),
        log_every=10 if tiny or sw else 50, save_every=100 if tiny else (200 if sw else 2000), max_to_keep=3,
        async_save=True, image_size=32 if tiny else (64 if sw else (1024 if c.variant == "sdxl" else 512)),
        fsdp=1, remat=False, dtype="float32", ema_decay=0.0,
        # the divergence guard: steps with a non-finite loss / gradient / update are skipped; more than
        # max_bad_steps in a row stop the run (exit code 65). log_every / save_every / preview_every 0: never.
        max_bad_steps=5,
        # preview samples with their masks every preview_every steps and at the end (0 = off):
        # preview_count cases from sample.prompts (a sample-CLI JSONL) or else the first batch,
        # sampled with sample.steps / sample.sampler at sample.height x sample.width.
        preview_every=100 if tiny else (300 if sw else 1000), preview_count=4))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3 if tiny else (5e-4 if sw else 1e-4), schedule="constant", warmup_steps=10 if tiny or sw else 1000,
        total_steps=ml_collections.FieldReference(None, field_type=int), final_lr_ratio=0.1,
        clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, accumulate=1))
    c.optim.total_steps = c.train.get_ref("steps")
    c.objective = ml_collections.ConfigDict(dict(p_drop_text=0.05, p_drop_image=0.05, p_drop_both=0.05,
                                                 gamma_low=0.3, gamma_high=1.0, subject_weight=0.0))
    # recipe: customjax.data.curriculum presets ("curriculum" = Table X No.6, "table10_no1".."no6",
    # "text_image" = text-image reconstruction only, the conference version); set by each method's config.
    # hflip / random_crop: augmentation of the target. latents: a folder of
    # `python -m customjax.data.precompute` (VAE posteriors of centre crops) read instead of
    # text_image / multiview; the target is then neither cropped at random nor flipped.
    c.data = ml_collections.ConfigDict(dict(
        # generator: with text_image / multiview empty, a generated set registered under this name
        # (customjax.data.generators: "synthetic", "shapeworld"): `examples` pairs at `size` px (0: train.image_size)
        text_image="", multiview="", generator="shapeworld" if sw else ("synthetic" if tiny else ""),
        examples=4000 if sw else 64, size=0 if sw else 64,
        workers=0,
        recipe="curriculum",
        hflip=not sw, random_crop=False,   # no flips in ShapeWorld: its captions name left and right
        # multiview references cut to the subject's mask (object-centric, neutral fill), as users' references are:
        subject_reference=sw,
        latents=""))
    return c


# Per-concept fine-tuning (python -m customjax.finetune): Contrastive Inversion's appendix A settings for
# every method on SD-1.5 (AdamW, weight decay 0.01, batch 4, 512 px; DDIM 50, guidance 5).
FINETUNE_VARIANTS = ("tiny", "shapeworld", "sd15")
TEMPLATES = {   # captions: "{}" = the concept's phrase (Textual Inversion's templates, abridged)
    "sd15": ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a photo of the {}",
             "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}"),
    "shapeworld": ("a {}",), "tiny": ("a photo of a {}", "a {}"),
}
PREVIEWS = {"sd15": ("a photo of {}", "{} on the beach", "a painting of {}", "{} in the snow"),
            "shapeworld": ("a large {} on the left, on a blue background", "a small {} at the top, on a white background"),
            "tiny": ("a photo of {}",)}


def finetune_base(method: str, variant: str, stages: dict, *, phrase: str = "{token}", init_word: str = "",
                  hflip: bool | None = None) -> ml_collections.ConfigDict:
    """A per-concept config: ``stages`` = {name: (trainable parts, lr, steps at sd15)} in order
    (parts: customjax.methods.finetune.PARTS); ShapeWorld and tiny scale the steps down."""
    if variant not in FINETUNE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for per-concept fine-tuning; choose from {FINETUNE_VARIANTS}")
    c = add_train(base(method, variant))
    tiny, sw = variant == "tiny", variant == "shapeworld"
    c.train.update(dict(batch=4, image_size=32 if tiny else (64 if sw else 512), log_every=1 if tiny else (25 if sw else 50),
                        save_every=50 if tiny else (500 if sw else 250), preview_every=0 if tiny else (500 if sw else 250),
                        preview_count=4))
    c.optim.update(dict(schedule="constant", warmup_steps=0, weight_decay=0.01))
    c.objective.update(dict(p_drop_text=0.0, p_drop_image=0.0, p_drop_both=0.0))
    scale = {"tiny": 0.002, "shapeworld": 1.0, "sd15": 1.0}[variant]
    c.stages = ml_collections.ConfigDict({name: dict(parts=parts, lr=lr, steps=max(int(steps * scale), 2))
                                          for name, (parts, lr, steps) in stages.items()})
    c.stage_order = ",".join(stages)
    # token: the learnt word; phrase: how prompts name the concept ({token}, {class}); init_word: S*'s
    # initializer ("" = the concept's class word, else "object"); class_word: when concept.json names none.
    c.concept = ml_collections.ConfigDict(dict(
        token="<s*>", phrase=phrase, init_word=init_word, class_word="", templates=TEMPLATES[variant],
        hflip=(not sw) if hflip is None else hflip,
        # Contrastive Inversion: images = N (set from the concept folder), aux_vectors = n, the auxiliary
        # words' initializer ("" = the mean token embedding), Eq. 2's temperature and weight, Eq. 3's lambda
        images=0, aux_vectors=4, aux_init_word="", temperature=0.07, contrastive_weight=1.0, aux_scale=1.0))
    c.sample.update(dict(steps=4 if tiny else (25 if sw else 50), guidance=5.0, batch=4))
    # curve: steps of the last stage at which every concept is also exported, to workdir/curve/<step>/
    c.finetune = ml_collections.ConfigDict(dict(preview_prompts=PREVIEWS[variant], curve=()))
    # DreamBooth's prior preservation (preset "prior"): images of the class word made by the base
    c.prior = ml_collections.ConfigDict(dict(images=0, prompt="a photo of a {}" if variant != "shapeworld" else "a {}"))
    return c
