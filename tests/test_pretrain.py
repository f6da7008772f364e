"""The ShapeWorld base model: its tokenizer, the pretraining loop, the shipped folder (loads with
the Stable Diffusion loader, regenerates the recorded start of its training run, and reaches its
recorded quality on held-out prompts)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from customjax.assets import SHAPEWORLD_BASE
from customjax.data import shapeworld as sw
from customjax.pretrain.loop import FINGERPRINT_STEPS, StageConfig, fit
from customjax.pretrain.tokenizer import train_tokenizer
from customjax.tokenizer import load_tokenizer, tokenize

shipped = pytest.mark.skipif(not (SHAPEWORLD_BASE / "model_index.json").is_file(),
                             reason="the ShapeWorld base model is not installed (python -m customjax.pretrain --install)")


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


@shipped
def test_shipped_base_loads_like_stable_diffusion():
    from customjax.metrics.clip_score import load_clip_scorer
    from customjax.pipeline import load_stable_diffusion

    pipe, params = load_stable_diffusion(SHAPEWORLD_BASE)
    assert pipe.vae_scale == 4 and not pipe.is_sdxl
    scorer = load_clip_scorer(SHAPEWORLD_BASE / "clip", SHAPEWORLD_BASE / "tokenizer")
    scene = sw.eval_scenes(4, seed=0)
    gt = np.stack([sw.render(s)[0] for s in scene])
    prompts = [sw.prompt(s) for s in scene]
    sims = scorer.embed_images(gt) @ scorer.embed_text(prompts).T
    # the world's CLIP matches each ground-truth scene to its own prompt better than to the others
    assert (np.argmax(sims, 1) == np.arange(4)).mean() >= 0.75, sims
    info = json.loads((SHAPEWORLD_BASE / "shapeworld.json").read_text())
    assert {"command", "config", "seed", "loss_curves", "eval"} <= set(info)


@shipped
def test_shipped_base_regenerates_the_start_of_its_recorded_run(tmp_path):
    """Bitwise regeneration of the whole run is not expected (hours of CPU in float32 whose
    reduction order depends on the machine, and weights stored in float16), so this reruns the
    recorded command's first steps of every stage and compares their losses."""
    from customjax.pretrain.run import fingerprint

    info = json.loads((SHAPEWORLD_BASE / "shapeworld.json").read_text())
    c = ml_collections.ConfigDict(info["config"])
    got = fingerprint(c, SHAPEWORLD_BASE, tmp_path, steps=FINGERPRINT_STEPS)
    for stage, tol in (("vae", 1e-3), ("clip", 1e-3), ("unet", 2e-2)):
        want = dict((s, l) for s, l in info["loss_curves"][stage])
        for step, loss in got[stage]:
            assert loss == pytest.approx(want[step], rel=tol), (stage, step, loss, want[step])


@shipped
def test_shipped_base_quality_on_held_out_prompts():
    """A smaller rerun of the recorded evaluation (16 held-out prompts, 10 DDIM steps)."""
    from customjax.metrics.shapeworld import measure
    from customjax.pretrain.evaluate import generate

    scenes = sw.eval_scenes(16, seed=1)
    images = generate(SHAPEWORLD_BASE, [sw.prompt(s) for s in scenes], steps=10, guidance=5.0, batch=16, seed=1)
    r = [measure(im, s) for im, s in zip(images, scenes)]
    background = np.mean([x["background_correct"] for x in r])
    category = np.mean([x["category_correct"] for x in r])
    print(f"\n[shapeworld base] 16 held-out prompts: background {background:.2f}, category {category:.2f}")
    assert background >= 0.75 and category >= 0.5
