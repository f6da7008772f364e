"""Every config a user can pick, traced at its real model sizes and resolutions with abstract
parameters (``config.model.abstract``: the published ``config.json`` files of
customjax/weights/published_configs, ``jax.eval_shape``, nothing allocated): reference encoding,
one training step at the paper's resolution, and the dual-branch sampler (one and two subjects, early stop).

The configs are discovered: every ``configs/<method>.py`` with ``REAL_VARIANTS`` (and
``REAL_ENCODERS``, its encoders' real configs) is traced, so a new method's config adds its own line.
``PAPER`` holds the shapes the papers state, asserted where given.
"""

import functools
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from customjax import trainer
from customjax.methods.build import build, guidance_config, sampler_params, sampling_side
from customjax.methods.registry import get as get_method
from customjax.sampling.common import make_sampler
from customjax.sampling.dual_branch import dual_branch_sample, guided_steps
from real_sizes import config_folder

SIZE = {"sd15": 512, "sdxl": 1024}          # the papers' resolutions (RealCustom++ Sec. IV-A)
ALL_CASES = [(m.name, v) for m in pkgutil.iter_modules(configs.__path__)
             for v in getattr(importlib.import_module(f"configs.{m.name}"), "REAL_VARIANTS", ())]
# adapter methods (reference encoders, the dual-branch sampler) and per-concept fine-tuning (customjax.finetune)
CASES = [(n, v) for n, v in ALL_CASES if not get_method(importlib.import_module(f"configs.{n}").get_config(v).method).per_concept]
CONCEPT_CASES = [c for c in ALL_CASES if c not in CASES
                 and not get_method(importlib.import_module(f"configs.{c[0]}").get_config(c[1]).method).joint]
JOINT_CASES = [c for c in ALL_CASES if c not in CASES and c not in CONCEPT_CASES]    # concepts learnt together
# (method config, variant) -> (reference tokens N, token width D): RealCustom++ Sec. III-C1 (729 deep
# tokens, + 729 cross-layer tokens, the high-resolution path added element-wise; the released
# projector: 729), RealCustom (CLIP ViT-L/14 at 224 px: 16 x 16 patches + CLS, width 1024), IP-Adapter
# (4 tokens of the cross-attention width).
PAPER = {("realcustompp", "sd15"): (1458, 768), ("realcustompp", "sdxl"): (1458, 2048),
         ("realcustompp", "sdxl,public"): (729, 2048), ("realcustom", "sd15"): (257, 1024),
         ("realcustom", "sdxl"): (257, 1024), ("ip_adapter", "sd15"): (4, 768)}


@functools.lru_cache(maxsize=None)
def real_built(name: str, arg: str):
    """(config, built) of a method config at its real sizes, built once per test process."""
    c = real_config(name, arg)
    return c, build(c)


def real_config(name: str, arg: str):
    mod = importlib.import_module(f"configs.{name}")
    c = mod.get_config(arg)
    c.model.update(dict(path=str(config_folder(arg.split(",")[0])), abstract=True))
    for key, real in getattr(mod, "REAL_ENCODERS", {}).items():
        c.encoders[key] = str(config_folder(real))
    return c


def shapes(tree):
    return jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def test_every_method_config_is_traced():
    """Every registered method has a config file with real variants, so it is traced below."""
    from customjax.methods.registry import METHODS

    assert set(METHODS) <= {importlib.import_module(f"configs.{n}").get_config(v).method for n, v in ALL_CASES}
    assert set(PAPER) <= set(CASES)
    assert {n for n, _ in CONCEPT_CASES} == {"textual_inversion", "custom_diffusion", "dreambooth",
                                             "contrastive_inversion"}
    assert JOINT_CASES == [("clif", "sd15")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}:{v}" for n, v in CASES])
def real(request):
    name, arg = request.param
    c, built = real_built(name, arg)
    leaves = jax.tree_util.tree_leaves(built.params)
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)     # nothing allocated
    return name, arg, c, built


def test_reference_tokens(real):
    name, arg, c, built = real
    ss = sampling_side(built, c)
    images = jax.ShapeDtypeStruct((2, ss.ref_size, ss.ref_size, 3), jnp.float32)
    tokens = jax.eval_shape(ss.tokens, images)
    assert tokens.shape[0] == 2
    feats = jax.ShapeDtypeStruct((2, 1, *tokens.shape[1:]), tokens.dtype)      # the sampler's per-step tokens
    u = built.pipe.unet.config
    lat = c.sample.height // built.pipe.vae_scale
    sds = jax.ShapeDtypeStruct
    per_step, _ = jax.eval_shape(ss.visual, sampler_params(built)["adapter"], feats,
                                 sds((2, 77, u.cross_attention_dim[0]), jnp.float32),
                                 sds((2, lat, lat, u.in_channels), jnp.float32), sds((2,), jnp.float32),
                                 sds((), jnp.int32))
    assert per_step.shape[:2] == (2, 1) and per_step.shape[-1] == built.unet.control.extra_kv[0].dim
    assert jax.eval_shape(ss.null_tokens, images).shape == tokens.shape
    if (name, arg) in PAPER:
        assert tokens.shape[1:] == PAPER[name, arg]


def test_one_training_step(real):
    name, arg, c, built = real
    s = trainer.setup(c, built)
    size = c.train.image_size
    assert size == SIZE[arg.split(",")[0]]
    ref = built.method.reference_size(c)
    batch = {"image": jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
             "reference": jax.ShapeDtypeStruct((1, ref, ref, 3), jnp.float32),
             "ids": tuple(jax.ShapeDtypeStruct((1, 77), jnp.int32) for _ in s.built.pipe.tokenizers)}
    if "mask" in built.method.needs:
        batch["mask"] = jax.ShapeDtypeStruct((1, size, size), jnp.float32)
    host = built.method.host_inputs({"caption": ["a photo of a dog"], "image": np.zeros((1, size, size, 3), np.float32),
                                     "mask": np.zeros((1, size, size), np.float32),
                                     "reference": np.zeros((1, ref, ref, 3), np.float32)}, built.pipe.tokenizers)
    batch.update({k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in host.items()})
    state, metrics = jax.eval_shape(s.step, s.state, s.frozen, batch)
    assert shapes(state.params) == shapes(s.state.params)
    assert metrics["loss"].shape == () and "loss/diffusion" in metrics
    assert set(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a.dtype == jnp.float32, state.params)))


def _sample_shapes(built, c, gcfg, subjects: int):
    pipe = built.pipe
    size = c.sample.height
    ss = sampling_side(built, c)
    tokens = jax.eval_shape(ss.tokens, jax.ShapeDtypeStruct((1, ss.ref_size, ss.ref_size, 3), jnp.float32))
    R = subjects if gcfg.masked and gcfg.references == "many2many" else 1
    f = pipe.vae_scale
    lat = size // f
    h = lat // gcfg.mask.mask_factor
    sds = jax.ShapeDtypeStruct
    feats = sds((1, R, *tokens.shape[1:]), jnp.float32)
    ids = tuple(sds((1, 77), jnp.int32) for _ in pipe.tokenizers)
    smp = make_sampler(pipe.schedule, c.sample.sampler, c.sample.steps)
    out = jax.eval_shape(
        lambda p, i, n, w, x, z, m0, nf: dual_branch_sample(pipe, built.unet, smp, gcfg, ss.visual, p, i, n, w, x, z, m0,
                                                            zero_uncond=pipe.is_sdxl, null_feats=nf,
                                                            text_tokens=ss.text_tokens),
        sampler_params(built), ids, ids, sds((1, subjects, 77), jnp.bool_), feats,
        sds((1, lat, lat, pipe.unet.config.in_channels), jnp.float32), sds((1, subjects, h, h), jnp.float32),
        feats if gcfg.uncond_image == "zero" else None)
    return out, h


def test_dual_branch_sampler(real):
    """One subject with the config's early stop (RealCustom++ T_stop: 25 of 50 steps for SD-1.5, 12
    of 25 for SDXL); the masks at the largest cross-attention map (64 x 64 for both)."""
    name, arg, c, built = real
    gcfg = guidance_config(c)
    steps = c.sample.steps
    if gcfg.masked and name == "realcustompp" and arg in ("sd15", "sdxl"):
        assert (steps, guided_steps(gcfg, steps)) == {"sd15": (50, 25), "sdxl": (25, 12)}[arg]
    out, h = _sample_shapes(built, c, gcfg, 1)
    size = c.sample.height
    assert size == SIZE[arg.split(",")[0]] and out["images"].shape == (1, size, size, 3)
    assert out["masks"].shape == (1, 1, h, h) and (h == 64 or not gcfg.masked)
    assert out["mask_steps"].shape == (steps, 1, 1, h, h)


@pytest.mark.parametrize("arg", ["sd15", "sdxl"])
def test_two_subjects_algorithm1(arg):
    """RealCustom++ multi-subject (Algorithm 1, Many2Many references) at the real sizes."""
    c, built = real_built("realcustompp", arg)
    gcfg = guidance_config(c)
    assert gcfg.mask.multi == "algorithm1" and gcfg.references == "many2many"
    out, h = _sample_shapes(built, c, gcfg, 2)
    assert out["masks"].shape == (1, 2, h, h) and out["images"].shape == (1, c.sample.height, c.sample.height, 3)


def test_realcustompp_features_as_the_paper_states():
    """RealCustom++ Sec. III-C1: SigLIP-so400m + DINOv2-L at 384 px give 729 tokens of 1152 + 1024 = 2176
    channels; the shallow layers {7, 13, 19} / {4, 10, 16}; the 768 px view as four 384 px crops."""
    from customjax.methods.realcustompp import projector_inputs

    c, built = real_built("realcustompp", "sdxl")
    side = built.image_side
    assert [(e.name, e.shallow, e.module.config.num_hidden_layers) for e in side.encoders] == [
        ("siglip", (7, 13, 19), 27), ("dino", (4, 10, 16), 24)]
    assert side.encoders[1].module.config.num_register_tokens == 4
    images = jax.ShapeDtypeStruct((2, 768, 768, 3), jnp.float32)
    f = jax.eval_shape(lambda p, x: projector_inputs(side, p, x), built.params["image"], images)
    assert f.deep.shape == (2, 729, 2176)
    assert f.shallow.shape == (2, 3 * 729, 2176)
    assert f.high.shape == (2, 4 * 729, 2176)
    assert side.features.split == "crops" and side.features.image_size * side.features.scale == 768


def test_public_preset_reads_the_released_layers():
    from customjax.methods.realcustompp import projector_inputs

    c, built = real_built("realcustompp", "sdxl,public")
    side = built.image_side
    assert [(e.name, e.deep) for e in side.encoders] == [("siglip", 25), ("dino", 22)]
    assert not side.ccp.config.cross_layer and side.features.split == "polyphase"
    f = jax.eval_shape(lambda p, x: projector_inputs(side, p, x), built.params["image"],
                       jax.ShapeDtypeStruct((1, 768, 768, 3), jnp.float32))
    assert f.shallow is None and f.high.shape == (1, 4 * 729, 2176)
    g = guidance_config(c)
    assert (g.uncond_image, g.mask.gamma_scope, g.w, g.t_stop, c.sample.sampler, c.sample.steps) == (
        "zero", 0.25, 3.5, 12, "dpm++2s_shifted", 25)
    assert np.array_equal(np.asarray(g.mask.cross_factors), [2, 4]) and g.mask.self_factors == ()


@pytest.mark.parametrize("name,arg", CONCEPT_CASES, ids=[f"{n}:{v}" for n, v in CONCEPT_CASES])
def test_concept_stages_at_real_size(name, arg):
    """Per-concept fine-tuning (customjax.finetune) at SD-1.5's sizes: every stage's stacked step for 2
    concepts of 4 images at 512 px (Contrastive Inversion Appendix A), with the words' rows, the
    auxiliary words and Eq. 2's CLIP ViT-L/14 where the method has them; then the text encoder with the
    learnt words appended, as text-to-image reads it."""
    from customjax.concepts import stack as S
    from customjax.concepts.tokens import wider_pipe, with_table
    from customjax.finetune import stage_setup, stages

    c = real_config(name, arg)
    with c.unlocked():
        c.concept.images = 4
    built = build(c)
    sds = jax.ShapeDtypeStruct
    rows = built.params["image"]["tokens"]["rows"]
    K, D = rows.shape
    assert D == 768 and K == (1 + 4 * c.concept.aux_vectors if name == "contrastive_inversion" else 1)
    C, B, size = 2, c.train.batch, c.train.image_size
    assert (size, B) == (512, 4)
    batch = {"image": sds((C, B, size, size, 3), jnp.float32), "ids": (sds((C, B, 77), jnp.int32),)}
    if built.method.auxiliary:
        P = built.image_side.clip.vision.config.projection_dim
        batch.update(index=sds((C, B), jnp.int32), target_ids=(sds((C, B, 77), jnp.int32),),
                     aux_ids=(sds((C, B, 4, 77), jnp.int32),), image_embeds=sds((C, B, 4, P), jnp.float32))
    for st in stages(c):
        b, frozen, state, tx, step = stage_setup(built, st, c, sds((C, K, D), jnp.float32), ["a", "b"])
        new, metrics = jax.eval_shape(S.stacked_step(step), state, frozen, batch)
        assert shapes(new.params) == shapes(state.params) and metrics["loss"].shape == (C,)
        # what trains, counted at SD-1.5's sizes: 16 cross-attention layers, one K and one V kernel each
        from flax import traverse_util
        flat = traverse_util.flatten_dict(state.params)
        unet = [k for k in flat if k[0] == "unet"]
        parts = set(st.parts)
        assert (("tokens", "rows") in flat) == ("tokens" in parts), st.name
        if "tokens" in parts:
            assert flat["tokens", "rows"].shape == (C, K, D)
        want = 0 if "unet" in parts else 32 * (("kv" in parts) + ("aux_kv" in parts))
        if "unet" in parts:
            assert len(unet) == len(jax.tree_util.tree_leaves(built.params["unet"]))   # every UNet tensor
        else:
            assert len(unet) == want and all(k[-3] == "attn2" for k in unet), (st.name, len(unet))
        if built.method.auxiliary and st.name == "inversion":
            assert "loss/contrastive" in metrics
    pipe = wider_pipe(built.pipe, K)
    vocab = built.pipe.text_encoders[0].config.vocab_size
    out = jax.eval_shape(lambda p, r, i: pipe.text_encoders[0].apply(
        {"params": with_table(p, r, vocab)["text_encoders"][0]}, i).last_hidden_state,
        {"text_encoders": built.params["text_encoders"]}, sds((K, D), jnp.float32), sds((1, 77), jnp.int32))
    assert out.shape == (1, 77, 768)


@pytest.mark.parametrize("name,arg", JOINT_CASES, ids=[f"{n}:{v}" for n, v in JOINT_CASES])
def test_joint_stages_at_real_size(name, arg):
    """Concepts learnt together (CLIF) at SD-1.5's sizes, 2 concepts of 2 tokens: stage ``text`` (Eq. 5 at the
    released batch of 128 captions: the whole CLIP-L text tower and the words train, CLIP ViT-L/14's 768-d
    projection, no UNet) and stage ``unet`` at 512 px, batch 4: the shared rank-4 LoRA on all 4 projections
    of the 32 attention layers. Table 1's presets change only what stage 2 trains (the words; the words and
    the 32 cross-attention K, V): their trainable trees are checked on the same build."""
    from flax import traverse_util

    from customjax.concepts import stack as S
    from customjax.finetune import stage_setup, stages

    c = real_config(name, arg)
    with c.unlocked():
        c.concept.joint_names, c.concept.joint_classes = ("teddy", "mug"), ("bear", "cup")
    built = build(c)
    sds = jax.ShapeDtypeStruct
    K, D = built.params["image"]["tokens"]["rows"].shape
    assert (K, D) == (4, 768) and built.image_side.clip.vision.config.projection_dim == 768
    text_leaves = len(jax.tree_util.tree_leaves(built.params["text_encoders"][0]))
    for preset in ("", "ti", "custom"):
        cp = real_config(name, ",".join(x for x in (arg, preset) if x)) if preset else c
        for st in stages(cp):
            b, frozen, state, tx, step = stage_setup(built, st, c, sds((1, K, D), jnp.float32), ["joint"])
            B = st.batch or c.train.batch
            if preset == "":
                if "text" in st.parts:
                    assert B == 128
                    batch = {"ids": (sds((1, B, 77), jnp.int32),), "image_embeds": sds((1, B, 768), jnp.float32),
                             "same": sds((1, B, B), jnp.bool_)}
                else:
                    assert B == 4 and c.train.image_size == 512
                    batch = {"image": sds((1, B, 512, 512, 3), jnp.float32), "ids": (sds((1, B, 77), jnp.int32),)}
                new, metrics = jax.eval_shape(S.stacked_step(step), state, frozen, batch)
                assert shapes(new.params) == shapes(state.params) and metrics["loss"].shape == (1,)
                assert ("loss/contrastive" in metrics) == (st.loss == "contrastive") != ("loss/diffusion" in metrics)
            flat = traverse_util.flatten_dict(state.params)
            unet = [k for k in flat if k[0] == "unet"]
            if "text" in st.parts:
                assert len([k for k in flat if k[0] == "text"]) == text_leaves and not unet
                assert flat["tokens", "rows"].shape == (1, K, D)
            elif preset == "":
                assert len(unet) == 256 and all(k[-2] in ("lora_down", "lora_up") for k in unet)
                assert flat["unet", "up_blocks_1", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "lora_down",
                            "kernel"].shape == (1, 768, 4)
                assert ("tokens", "rows") not in flat and frozen["text"]["text_model"]["final_layer_norm"]["scale"].shape == (1, 768)
            else:
                assert ("tokens", "rows") in flat and len(unet) == (32 if preset == "custom" else 0), preset
