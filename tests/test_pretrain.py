"""The ShapeWorld base model's pretraining: its tokenizer, the training loop (fingerprint steps,
resumable snapshots), and the whole command on micro models: the folder it writes loads with the
Stable Diffusion loader (the fingerprint rerun of a record: test_shipped_base.py)."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from customjax.data import shapeworld as sw
from customjax.pretrain.loop import FINGERPRINT_STEPS, StageConfig, fit
from customjax.pretrain.tokenizer import train_tokenizer
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

    from customjax.pretrain.run import pretrain

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
    assert (work / "samples.png").is_file()
    for stage in ("vae", "clip", "unet"):
        assert [s for s, _ in info["loss_curves"][stage]] == [1, 2, 3, 4]
    # the test variant weights object latents in the UNet loss (unet.object_weight): the weighted
    # path ran, logging the unweighted error beside the loss, and the two differ
    unet_log = [json.loads(x) for x in (work / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert all("mse" in m and m["mse"] != m["loss"] for m in unet_log)


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
    from customjax.pretrain.loop import object_weighted_mean
    from customjax.pretrain.unet import latent_masks

    fg = np.zeros((1, 64, 64), bool)
    fg[0, :4, :4] = True          # one whole latent pixel (factor 4)
    fg[0, 8:10, 0:4] = True       # half of the latent pixel (2, 0)
    cover = latent_masks(fg, 16)
    assert cover.shape == (1, 16, 16) and cover[0, 0, 0] == 1.0 and cover[0, 2, 0] == 0.5 and cover.sum() == 1.5
    err = np.zeros((1, 16, 16, 4), np.float32)
    err[0, 0, 0] = 1.0            # all of the error on the object
    plain = float(object_weighted_mean(err, cover, 0.0))
    assert plain == pytest.approx(float(err.mean()))
    weighted = float(object_weighted_mean(err, cover, 4.0))
    assert weighted == pytest.approx(5.0 * 4 / (4 * (256 + 4.0 * 1.5)), rel=1e-6) and weighted > 4 * plain
    assert float(object_weighted_mean(np.ones_like(err), cover, 4.0)) == pytest.approx(1.0)
