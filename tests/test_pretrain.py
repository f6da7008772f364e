"""The ShapeWorld base model's pretraining: its tokenizer, the training loop (fingerprint steps,
resumable snapshots), and the whole command on micro models: the folder it writes loads with the
Stable Diffusion loader (the fingerprint rerun of a record: test_shipped_base.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax.shapeworld import world as sw
from customjax.shapeworld.pretrain.loop import FINGERPRINT_STEPS, StageConfig, fit
from customjax.shapeworld.pretrain.tokenizer import train_tokenizer
from customjax.tokenizer import load_tokenizer, tokenize

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tokenizer_has_the_world_words_as_single_tokens(tmp_path):
    rng = np.random.default_rng(0)
    captions = [sw.caption(sw.sample_scene(rng), rng) for _ in range(800)]
    tok = load_tokenizer(train_tokenizer(captions, tmp_path / "tok", model_max_length=32))
    words = list(sw.CATEGORIES) + list(sw.COLORS) + ["background", "left", "right"]
    for w in words:
        ids = tokenize(tok, w)[0]
        assert ids[0] == tok.bos_token_id and ids[2] == tok.eos_token_id, (w, tok.convert_ids_to_tokens(ids[:4]))
    # any text still tokenizes (byte alphabet); EOS pads to model_max_length
    ids = tokenize(tok, "a zebra!")[0]
    assert len(ids) == 32 and tok.unk_token_id not in ids[1:np.argmax(ids == tok.eos_token_id)]


def test_fit_lowers_the_loss_and_logs_the_fingerprint_steps(tmp_path):
    w_true = np.arange(8, dtype=np.float32)

    def loss(p, frozen, batch, key):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2), {}

    def batches(step):
        x = np.random.default_rng(step).normal(size=(16, 8)).astype(np.float32)
        return {"x": x, "y": x @ w_true}

    c = StageConfig(steps=60, batch=16, lr=0.5, warmup=5, log_every=20)
    params, hist = fit("toy", loss, {"w": jnp.zeros(8)}, None, batches, c, tmp_path)
    assert [h["step"] for h in hist] == [1, 2, 3, 20, 40, 60]
    assert hist[-1]["loss"] < 0.05 * hist[0]["loss"]
    assert len((tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()) == len(hist)
    _, again = fit("toy2", loss, {"w": jnp.zeros(8)}, None, batches, c, tmp_path, max_steps=FINGERPRINT_STEPS)
    assert [h["loss"] for h in again] == [h["loss"] for h in hist[:FINGERPRINT_STEPS]]
    # an interrupted stage resumes from its snapshot and ends where the uninterrupted one did
    import dataclasses
    snap = dataclasses.replace(c, save_every=20)

    def crash_at_30(step):
        if step == 30:
            raise KeyboardInterrupt
        return batches(step)
    with pytest.raises(KeyboardInterrupt):
        fit("toy3", loss, {"w": jnp.zeros(8)}, None, crash_at_30, snap, tmp_path, resume_key="a")
    assert (tmp_path / "toy3" / "snapshot.msgpack").is_file()
    # a snapshot of other settings is not resumed: the "b" run starts from step 1 and replaces it
    with pytest.raises(KeyboardInterrupt):
        fit("toy3", loss, {"w": jnp.zeros(8)}, None, crash_at_30, snap, tmp_path, resume_key="b")
    first = json.loads((tmp_path / "toy3" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    from flax import serialization
    assert serialization.msgpack_restore((tmp_path / "toy3" / "snapshot.msgpack").read_bytes())["resume_key"] == "b"
    resumed, hist3 = fit("toy3", loss, {"w": jnp.zeros(8)}, None, batches, snap, tmp_path, resume_key="b")
    np.testing.assert_allclose(resumed["w"], params["w"], rtol=1e-6)
    assert [h["step"] for h in hist3] == [1, 2, 3, 20, 40, 60] and not (tmp_path / "toy3" / "snapshot.msgpack").exists()


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The whole pretraining command on the ``test`` variant (micro models, 4 steps per stage)."""
    import sys

    sys.path.insert(0, str(REPO / "configs"))
    import shapeworld_base

    from customjax.shapeworld.pretrain.run import pretrain

    work = tmp_path_factory.mktemp("pretrain")
    return pretrain(shapeworld_base.get_config("test"), work), work


def test_pretrain_writes_a_stable_diffusion_folder(micro_run):
    from customjax.metrics.clip_score import load_clip_scorer
    from customjax.pipeline import load_stable_diffusion

    folder, work = micro_run
    pipe, params = load_stable_diffusion(folder)
    assert pipe.vae_scale == 4 and not pipe.is_sdxl and pipe.unet.config.sample_size == 8
    scorer = load_clip_scorer(folder / "clip", folder / "tokenizer")
    assert scorer.clip_t(np.zeros((2, 32, 32, 3), np.uint8), ["a red star", "a blue ring"]).shape == (2,)
    info = json.loads((folder / "shapeworld.json").read_text())
    assert {"command", "config", "seed", "loss_curves", "eval", "train_seconds", "stage_seconds"} <= set(info)
    assert info["eval"]["summary"]["background_correct"]["n"] == 4
    by_category = info["eval"]["summary"]["category_correct_by_category"]
    assert set(by_category) <= set(sw.CATEGORIES) and sum(v["n"] for v in by_category.values()) == 4
    # the sample grid: the held-out prompts rendered exactly (first row) above the samples (second)
    from PIL import Image
    tiles = np.asarray(Image.open(work / "samples.png").convert("RGB"))
    assert tiles.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    truth = sw.render(sw.eval_scenes(4, 0, 32)[0], 32)[0]
    assert np.abs(tiles[2:34, 2:34].astype(int) - truth).max() <= 1
    for stage in ("vae", "clip", "unet"):
        assert [s for s, _ in info["loss_curves"][stage]] == [1, 2, 3, 4]
    # the test variant weights object latents in the UNet loss (unet.object_weight): the weighted
    # path ran, logging the unweighted error beside the loss, and the two differ
    unet_log = [json.loads(x) for x in (work / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert all("mse" in m and m["mse"] != m["loss"] for m in unet_log)
    # the test variant trains its CLIP with hard negatives (clip.hard_negatives) and the token objective
    # (clip.token_weight), and the text tower with the UNet (unet.train_text): the pipeline's text
    # encoder is then no longer the CLIP's
    clip_log = [json.loads(x) for x in (work / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert all("hard_negative_top1" in m and "token_loss" in m for m in clip_log)
    from customjax.models.clip import load_clip
    clip_text = load_clip(folder / "clip")[1]["text"]["text_model"]
    pipe_text = params["text_encoders"][0]["text_model"]
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(pipe_text), jax.tree.leaves(clip_text))]
    assert jax.tree.structure(pipe_text) == jax.tree.structure(clip_text) and sum(m > 0 for m in moved) > len(moved) // 2


def test_fit_returns_the_moving_average_with_ema(tmp_path):
    """``StageConfig.ema``: the stage returns the exponential moving average of the parameters, with
    the decay warmed up as min(ema, (1 + i) / (10 + i)), and the raw trajectory is unchanged by it."""
    def loss(p, frozen, batch, key):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2), {}

    def batches(step):
        x = np.random.default_rng(step).normal(size=(16, 4)).astype(np.float32)
        return {"x": x, "y": x @ np.arange(4, dtype=np.float32)}

    import dataclasses
    c = StageConfig(steps=6, batch=16, lr=0.3, warmup=1, log_every=1)
    raw = [np.zeros(4, np.float32)] + [
        np.asarray(fit(f"raw{k}", loss, {"w": jnp.zeros(4)}, None, batches, c, tmp_path, max_steps=k)[0]["w"])
        for k in range(1, c.steps + 1)]
    avg = raw[0]
    for i in range(c.steps):
        d = min(0.8, (1 + i) / (10 + i))
        avg = d * avg + (1 - d) * raw[i + 1]
    ema, hist = fit("ema", loss, {"w": jnp.zeros(4)}, None, batches, dataclasses.replace(c, ema=0.8), tmp_path)
    np.testing.assert_allclose(ema["w"], avg, rtol=1e-5, atol=1e-6)
    assert np.abs(avg - raw[-1]).max() > 1e-3          # the average is not the last iterate
    _, plain = fit("plain", loss, {"w": jnp.zeros(4)}, None, batches, c, tmp_path)
    assert [h["loss"] for h in hist] == [h["loss"] for h in plain]


def test_unet_object_weight_counts_object_latents_more():
    """``unet.object_weight``: pixel masks pool to latent coverage, and the weighted error puts
    (1 + w) times the weight on covered latent pixels, leaving a uniform error unchanged."""
    from customjax.losses import coverage, weighted_mean as object_weighted_mean

    fg = np.zeros((1, 64, 64), bool)
    fg[0, :4, :4] = True          # one whole latent pixel (factor 4)
    fg[0, 8:10, 0:4] = True       # half of the latent pixel (2, 0)
    cover = coverage(fg, (16, 16))
    assert cover.shape == (1, 16, 16) and cover[0, 0, 0] == 1.0 and cover[0, 2, 0] == 0.5 and cover.sum() == 1.5
    err = np.zeros((1, 16, 16, 4), np.float32)
    err[0, 0, 0] = 1.0            # all of the error on the object
    plain = float(object_weighted_mean(err, cover, 0.0))
    assert plain == pytest.approx(float(err.mean()))
    weighted = float(object_weighted_mean(err, cover, 4.0))
    assert weighted == pytest.approx(5.0 * 4 / (4 * (256 + 4.0 * 1.5)), rel=1e-6) and weighted > 4 * plain
    assert float(object_weighted_mean(np.ones_like(err), cover, 4.0)) == pytest.approx(1.0)


def test_negative_captions_change_one_category_or_position():
    """Each hard negative is its scene's training caption (same template and omissions) with one
    object's category or named position replaced by another of the world's words."""
    from customjax.shapeworld.pretrain.run import negative_captions, training_pool

    _, _, captions = training_pool(0, 60, 32)
    negatives = negative_captions(0, 60, 32)
    assert negatives == negative_captions(0, 60, 32, indices=range(60))      # any part regenerates alone
    import re

    cats = "|".join(sw.CATEGORIES)
    places = "|".join(sw.POSITION_PHRASES.values())
    blank = lambda text: re.sub(places, "<P>", re.sub(rf"\b({cats})\b", "<C>", text))
    kinds = set()
    for pos, neg in zip(captions, negatives):
        assert pos != neg and blank(pos) == blank(neg), (pos, neg)     # only those words differ
        same_categories = re.findall(rf"\b({cats})\b", pos) == re.findall(rf"\b({cats})\b", neg)
        kinds.add("position" if same_categories else "category")
        if same_categories:
            assert re.findall(places, pos) != re.findall(places, neg)
    assert kinds == {"category", "position"}


def _tiny_clip():
    """A two-tower CLIP of one layer each (vocabulary 50, EOS 49) and its random parameters."""
    import jax

    from customjax.models.clip import CLIP
    from customjax.models.clip_text import CLIPTextConfig, CLIPTextModel, clip_text_spec
    from customjax.models.vit import CLIPVisionConfig, CLIPVisionModel, clip_vision_spec
    from customjax.weights.loaders import init_params

    tc = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=8, eos_token_id=49, projection_dim=8,
                        with_projection=True)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=8, with_projection=True)
    model = CLIP(CLIPTextModel(tc), CLIPVisionModel(vc))
    params = {"text": init_params(clip_text_spec(True), tc, jax.random.key(0)),
              "vision": init_params(clip_vision_spec(True), vc, jax.random.key(1)), "logit_scale": jnp.asarray(2.0)}
    return model, params


def test_clip_hard_negatives_enter_the_image_to_text_softmax():
    """clip_loss with ``neg_ids``: the image-to-text cross-entropy runs over B + B text columns, the
    text-to-image one is unchanged; computed here by hand from the towers' embeddings."""
    from customjax.shapeworld.pretrain.clip import clip_loss

    model, params = _tiny_clip()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 48, (4, 8)).astype(np.int32)
    ids[:, -1] = 49
    neg = ids.copy()
    neg[:, 2] = (ids[:, 2] + 1) % 48 + 1
    neg[3] = ids[0]                      # image 3's negative is image 0's caption: a positive of image 0
    images = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
    plain, _ = clip_loss(params, None, {"images": images, "ids": ids}, None, model=model)
    hard, m = clip_loss(params, None, {"images": images, "ids": ids, "neg_ids": neg}, None, model=model)
    t, tn, i = (np.asarray(model.embed_text(params, ids)), np.asarray(model.embed_text(params, neg)),
                np.asarray(model.embed_image(params, images)))
    s = np.exp(2.0)
    logits = s * i @ np.concatenate([t, tn]).T                # (4, 8)
    lse = lambda x: np.log(np.exp(x).sum(-1))
    targets = np.zeros((4, 8))
    targets[np.arange(4), np.arange(4)] = 1
    targets[0, 4 + 3] = 1                                      # the duplicate caption
    targets /= targets.sum(-1, keepdims=True)
    i2t = np.mean(lse(logits) - (targets * logits).sum(-1))
    t2i = np.mean(lse(logits[:, :4].T) - np.diag(logits[:, :4]))
    assert float(hard) == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
    assert float(hard) > float(plain)
    assert float(m["hard_negative_top1"]) == pytest.approx(np.mean(np.diag(logits[:, :4]) > np.diag(logits[:, 4:])))


def test_pretrain_rejects_an_unknown_eval_sampler_before_training(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "configs"))
    import shapeworld_base

    from customjax.shapeworld.pretrain.run import pretrain

    c = shapeworld_base.get_config("test")
    c.eval.sampler = "ancestrl"
    with pytest.raises(ValueError, match="eval.sampler='ancestrl'"):
        pretrain(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()      # nothing rendered or trained


def test_cpu_and_gpu_presets_build_the_same_stack():
    """The `cpu` and `gpu` presets (no test trains them) build their model and scheduler configs, the
    UNet initialises on them, and they share one architecture (the config's docstring: "the same
    architecture, longer"), so the gpu preset's run is a drop-in for the shipped base."""
    import sys

    sys.path.insert(0, str(REPO / "configs"))
    import shapeworld_base

    from customjax.shapeworld.assets import SHAPEWORLD_BASE
    from customjax.models.unet import UNET
    from customjax.shapeworld.pretrain.run import configs, scheduler_config
    from customjax.schedulers import ScheduleConfig
    from customjax.weights.loaders import init_params

    cpu, gpu = (shapeworld_base.get_config(v) for v in ("cpu", "gpu"))
    built = {v: configs(c, SHAPEWORLD_BASE / "tokenizer") for v, c in (("cpu", cpu), ("gpu", gpu))}
    assert built["cpu"] == built["gpu"]
    assert scheduler_config(cpu) == scheduler_config(gpu)
    ScheduleConfig.from_dict(scheduler_config(gpu))
    unet_cfg = built["gpu"][3]
    shapes = jax.eval_shape(lambda k: init_params(UNET, unet_cfg, k), jax.random.key(0))
    assert shapes["conv_in"]["kernel"].shape[-2:] == (gpu.vae.latent_channels, gpu.unet.block_out_channels[0])
    shipped = json.loads((SHAPEWORLD_BASE / "unet" / "config.json").read_text())
    assert tuple(shipped["block_out_channels"]) == unet_cfg.block_out_channels
    assert shipped["sample_size"] == unet_cfg.sample_size
    # the gpu preset trains longer on more samples in every stage (the point of the preset)
    for stage in ("vae", "clip", "unet"):
        assert gpu[stage].steps * gpu[stage].batch > cpu[stage].steps * cpu[stage].batch, stage


def test_clip_token_objective_predicts_each_word_from_its_final_state():
    """token_loss: the cross-entropy of each word's final state against the tied token embedding,
    over the words between BOS and the first EOS only (computed here by hand); clip_loss adds it
    with ``token_weight``; and a few steps on it alone teach the tower to name its words."""
    import jax
    import optax

    from customjax.shapeworld.pretrain.clip import clip_loss, token_loss

    model, params = _tiny_clip()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 48, (4, 8)).astype(np.int32)
    ids[:, 0] = 48                                            # BOS
    ends = [3, 5, 7, 4]
    for r, e in enumerate(ends):
        ids[r, e:] = 49                                       # EOS, then padding with EOS
    out = model.text.apply({"params": params["text"]}, ids)
    table = np.asarray(params["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    logits = np.asarray(out.last_hidden_state) @ table.T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-logp[r, k, ids[r, k]] for r, e in enumerate(ends) for k in range(1, e)]
    ce, top1 = token_loss(params["text"], out, ids, 49)
    assert float(ce) == pytest.approx(np.mean(want), rel=1e-5)
    hits = [logits[r, k].argmax() == ids[r, k] for r, e in enumerate(ends) for k in range(1, e)]
    assert float(top1) == pytest.approx(np.mean(hits))
    images = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
    plain, _ = clip_loss(params, None, {"images": images, "ids": ids}, None, model=model)
    both, m = clip_loss(params, None, {"images": images, "ids": ids}, None, model=model, token_weight=0.5)
    assert float(both) == pytest.approx(float(plain) + 0.5 * float(ce), rel=1e-5)
    assert float(m["token_loss"]) == pytest.approx(float(ce), rel=1e-5)

    tx = optax.adam(1e-2)
    opt = tx.init(params["text"])
    f = jax.jit(jax.value_and_grad(lambda p: token_loss(p, model.text.apply({"params": p}, ids), ids, 49)[0]))
    p = params["text"]
    for _ in range(60):
        _, g = f(p)
        up, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, up)
    after, acc = token_loss(p, model.text.apply({"params": p}, ids), ids, 49)
    assert float(after) < 0.25 * float(ce) and float(acc) == 1.0


def test_object_word_masks_mark_each_objects_category_word():
    """object_word_masks: in training captions (one to three objects, random templates and omissions),
    row j marks exactly the tokens of object j's category word; rows past the scene's objects are empty."""
    from customjax.shapeworld.assets import SHAPEWORLD_BASE
    from customjax.shapeworld.pretrain.unet import object_word_masks

    tok = load_tokenizer(SHAPEWORLD_BASE / "tokenizer")
    scenes, captions = [], []
    for i in range(80):
        rng = np.random.default_rng([0, 2, i])
        scenes.append(sw.sample_scene(rng, 64))
        captions.append(sw.caption(scenes[-1], rng))
    words = object_word_masks(tok, captions)
    ids = tokenize(tok, captions)
    assert words.shape == (80, 3, tok.model_max_length)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s, w, row in zip(scenes, words, ids):
        for j in range(3):
            named = tok.decode(row[w[j]]).replace(" ", "")
            assert named == (s.objects[j].category if j < len(s.objects) else ""), (j, named)
    with pytest.raises(ValueError, match="names 4 objects"):
        object_word_masks(tok, ["a star, a ring, a cross and a heart on a red background"])


def test_attention_grounding_is_tokencompose_token_loss():
    """attention_grounding: (1 - share of the word's attention on its object)^2, averaged over the
    objects present (empty word rows skipped) and the layers; maps of coarser grids see the region
    mean-pooled."""
    from customjax.losses import attention_grounding

    H = 4
    regions = np.zeros((1, 2, H, H), np.float32)
    regions[0, 0, :2, :2] = 1.0                    # object 0: top-left quarter
    regions[0, 1, 2:, 2:] = 1.0                    # object 1: bottom-right quarter
    words = np.zeros((1, 2, 5), bool)
    words[0, 0, 1] = words[0, 1, 3] = True
    probs = np.full((1, H * H, 5), 0.2, np.float32)          # every position attends uniformly
    on0 = regions[0, 0].reshape(-1) > 0
    probs[0, on0, 1], probs[0, ~on0, 1] = 0.8, 0.0           # word 0 attends only inside object 0
    # word 1 (token 3) stays uniform: share 1/4 on its object
    got = float(attention_grounding([probs], words, regions))
    assert got == pytest.approx(((1 - 1.0) ** 2 + (1 - 0.25) ** 2) / 2, rel=1e-6)
    words[0, 1] = False                                      # object 1 not named: only object 0 counts
    assert float(attention_grounding([probs], words, regions)) == pytest.approx(0.0, abs=1e-7)
    coarse = np.full((1, 4, 5), 0.2, np.float32)             # a 2 x 2 layer: object 0 is its cell 0
    coarse[0, 0, 1], coarse[0, 1:, 1] = 0.8, 0.0
    assert float(attention_grounding([probs, coarse], words, regions)) == pytest.approx(0.0, abs=1e-7)
    coarse[0, :, 1] = 0.0
    coarse[0, 3, 1] = 0.8                                    # all on the wrong cell: share 0
    assert float(attention_grounding([probs, coarse], words, regions)) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        attention_grounding([np.zeros((1, 6, 5), np.float32)], words, regions)


@pytest.mark.slow
def test_unet_grounding_loss_is_logged_and_trains_the_word_attention(micro_run):
    """The test preset trains its UNet with ground_weight (the term is in the logged metrics); and
    steps on unet_loss with a large ground_weight move each object word's attention onto its object."""
    import functools

    import optax

    from customjax.pipeline import load_stable_diffusion
    from customjax.shapeworld.pretrain.run import training_pool
    from customjax.shapeworld.pretrain.unet import object_word_masks, unet_loss
    from customjax.shapeworld.pretrain.vae import encode
    from customjax.losses import coverage
    from customjax.schedulers import noise_schedule

    folder, work = micro_run
    rows = [json.loads(line) for line in (work / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0.0 <= r["ground"] <= 1.0 for r in rows)

    pipe, params = load_stable_diffusion(folder)
    tok = pipe.tokenizers[0]
    images, labels, captions = training_pool(0, 8, 32)
    grid = (pipe.unet.config.sample_size,) * 2
    objs = labels[:, None] == np.arange(1, 4)[None, :, None, None]
    batch = {"moments": encode(pipe.vae, params["vae"], images), "ids": tokenize(tok, captions),
             "words": object_word_masks(tok, captions),
             "regions": coverage(objs.reshape(-1, 32, 32), grid).reshape(8, 3, *grid)}
    loss = jax.jit(jax.value_and_grad(functools.partial(
        unet_loss, unet=pipe.unet, text=pipe.text_encoders[0], sched=noise_schedule(pipe.schedule),
        scaling_factor=pipe.vae.config.scaling_factor, p_uncond=0.0, prediction_type=pipe.schedule.prediction_type,
        empty_ids=tokenize(tok, [""]), ground_weight=10.0), has_aux=True))
    tx = optax.adam(3e-3)
    p, frozen = params["unet"], params["text_encoders"][0]
    opt = tx.init(p)
    key = jax.random.key(0)
    grounds = []
    for _ in range(25):
        (_, aux), g = loss(p, frozen, batch, key)             # the same batch, noise and timesteps
        grounds.append(float(aux["ground"]))
        up, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, up)
    assert grounds[-1] < 0.65 * grounds[0], grounds       # 0.90 -> 0.49 when written


@pytest.mark.slow
def test_fingerprint_reruns_the_micro_run_with_every_option(micro_run, tmp_path):
    """The fingerprint rerun (what test_shipped_base checks on the shipped record) on the test preset,
    whose UNet stage has object_weight, train_text and ground_weight on."""
    from conftest import assert_reruns_record

    assert_reruns_record(micro_run[0], tmp_path, steps=FINGERPRINT_STEPS)


@pytest.mark.slow
def test_pretrain_continues_a_base_keeping_its_stages_and_recording_its_lineage(tmp_path):
    """config.init: the parent's tokenizer, VAE and CLIP are kept byte for byte, its UNet trains on from
    its weights, and the record names the parent (its whole record and its UNet's SHA-256)."""
    import filecmp
    import hashlib
    import sys

    import ml_collections
    from conftest import assert_reruns_record

    sys.path.insert(0, str(REPO / "configs"))
    import shapeworld_base

    from customjax.pipeline import load_stable_diffusion
    from customjax.shapeworld.pretrain.lineage import UNET_WEIGHTS, root_record
    from customjax.shapeworld.pretrain.run import pretrain

    def config(**unet):
        c = shapeworld_base.get_config("test")
        c.unet.update(dict(train_text=False, ground_weight=0.0, **unet))
        return c

    parent = pretrain(config(), tmp_path / "parent")
    c = config(steps=3, decay=1.0)
    c.init = str(parent)
    child = pretrain(c, tmp_path / "child")
    for part in ("tokenizer", "vae", "clip", "text_encoder", "image_encoder"):
        names = sorted(p.name for p in (parent / part).iterdir())
        assert names == sorted(p.name for p in (child / part).iterdir())
        assert all(filecmp.cmp(parent / part / n, child / part / n, shallow=False) for n in names), part
    before, after = (load_stable_diffusion(f)[1]["unet"] for f in (parent, child))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert 0 < moved < 0.02, moved     # three small steps from the parent's weights, not a fresh start
    rec, prec = (json.loads((f / "shapeworld.json").read_text()) for f in (child, parent))
    assert rec["parent"] == prec and root_record(rec) == prec
    assert rec["unet_init_sha256"] == hashlib.sha256((parent / UNET_WEIGHTS).read_bytes()).hexdigest()
    assert [s for s, _ in rec["loss_curves"]["unet"]] == [1, 2, 3]
    assert rec["loss_curves"]["vae"] == prec["loss_curves"]["vae"] and rec["eval"]["summary"]
    assert_reruns_record(child, tmp_path / "rerun", steps=FINGERPRINT_STEPS)   # the chain's first link

    for key, value, match in (("vae", dict(latent_channels=2), "config.vae.latent_channels"),
                              ("unet", dict(train_text=True), "train_text"),
                              ("unet", dict(heads=(1, 2)), "config.unet.heads")):
        bad = ml_collections.ConfigDict(c.to_dict())
        bad[key].update(value)
        with pytest.raises(ValueError, match=match):
            pretrain(bad, tmp_path / "bad")
    bad = ml_collections.ConfigDict(c.to_dict())
    bad.init = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="shapeworld.json"):
        pretrain(bad, tmp_path / "bad")
