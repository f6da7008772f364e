"""The training run: `tiny` on synthetic data writes checkpoints, metrics, TensorBoard events,
preview samples with their masks and an export; a run stopped by SIGTERM and resumed equals an
uninterrupted one."""

import io
import json
import os
import signal
import struct

import numpy as np
import pytest
from PIL import Image

import train_probe
from customjax.weights.safetensors_io import load_file


def _config(steps, preview_every=0):
    return train_probe.run_config(steps, preview_every=preview_every)


def _tb_images(tb_dir) -> dict:
    """{(tag, step): PIL image} of the image summaries in the TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    out = {}
    for f in tb_dir.iterdir():
        data, i = f.read_bytes(), 0
        while i < len(data):  # TFRecord: length (u64), crc (u32), payload, crc (u32)
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += n + 16
            for v in event.summary.value:
                if v.HasField("image"):
                    out[v.tag, event.step] = Image.open(io.BytesIO(v.image.encoded_image_string))
    return out


def _check_previews(workdir, steps, cases=4, size=32):
    """Preview PNGs per step: the sheet (a row per case: reference, sample, masks, upscaled to 256 px)
    and the mask overlays (a grid of ``cases`` tiles, not constant, unlike the samples); TensorBoard
    holds the sample and overlay grids, and the sheet's sample tiles are the grid's, upscaled."""
    side = 2 * (size + 2) + 2               # 2 x 2 grid, 2 px padding
    tb = _tb_images(workdir / "tb")
    pad, line = 8, 16 + 6                    # customjax.images.sheet's layout
    for step in steps:
        sheet = np.asarray(Image.open(workdir / "previews" / f"step_{step:06d}.png"))
        masks = np.asarray(Image.open(workdir / "previews" / f"step_{step:06d}_masks.png"))
        samples = np.asarray(tb["preview/samples", step])
        assert samples.shape == masks.shape == (side, side, 3)
        tile = samples[2:2 + size, 2:2 + size]
        assert tile.astype(np.float32).std() > 1.0 and np.abs(masks.astype(np.float32) - samples).max() > 10
        np.testing.assert_array_equal(np.asarray(tb["preview/masks", step]), masks)
        ref = json.loads((workdir / "config.json").read_text())["encoders"]
        ref = ref["image_size"] * ref["scale"]                 # the preview's reference side (tiny: 56 px)
        slot = max(ref, size) * -(-256 // max(ref, size))      # every tile's slot: >= 256 px
        assert sheet.shape[0] >= cases * slot and sheet.shape[1] >= 3 * slot
        x = pad + slot + pad                                   # after the reference tile
        f = slot // size
        np.testing.assert_array_equal(sheet[pad + line:pad + line + size * f, x:x + size * f],
                                      np.repeat(np.repeat(tile, f, axis=0), f, axis=1))
    assert sorted(s for t, s in tb if t == "preview/samples") == sorted(steps)
    cases_file = json.loads((workdir / "previews" / "cases.json").read_text())
    assert len(cases_file) == cases and all(c["words"][0] in c["prompt"] for c in cases_file)


def _losses(workdir):
    return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with previews every 4 steps (shared by the tests below); EMA on,
    so the export (the EMA) after a resume checks that the EMA was saved and restored too."""
    from customjax import train as train_mod

    full = tmp_path_factory.mktemp("full")
    train_mod.train(_config(6, preview_every=4), str(full))
    return full


def test_run_writes_checkpoints_logs_previews(full_run):
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["6"]
    assert any((full_run / "tb").iterdir()) and (full_run / "config.json").is_file()
    assert (full_run / "export" / "adapter.safetensors").is_file()
    _check_previews(full_run, steps=(4, 6))     # every 4 steps and at the end


def test_sigterm_then_resume_equals_uninterrupted(full_run, tmp_path):
    from customjax import train as train_mod

    full = full_run
    want = load_file(full / "export" / "adapter.safetensors")

    def term_at(k):
        def hook(step):
            if step == k:
                os.kill(os.getpid(), signal.SIGTERM)
        return hook

    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    out = train_mod.train(_config(6), str(run), on_step=term_at(3))
    assert signal.getsignal(signal.SIGTERM) == before          # train restores the handler
    assert out["step"] == 3 and not (run / "export").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]
    out = train_mod.train(_config(6), str(run))
    assert out["step"] == 6
    got = load_file(run / "export" / "adapter.safetensors")
    assert want.keys() == got.keys()
    err = max(float(np.max(np.abs(np.asarray(want[k]) - np.asarray(got[k])))) for k in want)
    print(f"\n[resume] SIGTERM at step 3 + resume vs uninterrupted, 6 steps: max abs parameter difference {err:.1e}")
    assert err < 1e-6
    np.testing.assert_allclose(_losses(run), _losses(full), rtol=1e-6)


def test_precomputed_latents_roundtrip_and_train_like_images(full_run, tmp_path):
    """`customjax.data.precompute` writes the source records unchanged plus every frame's VAE
    posterior; training on them (`data.latents`) gives the losses of the image run (same data
    order, same references, no target augmentation: `_config` turns hflip off)."""
    from customjax import train as train_mod
    from customjax.data import precompute, records
    from customjax.data.loader import train_sources
    from customjax.data.sources import as_source

    c = _config(6)
    out = tmp_path / "latents"
    manifest = precompute.precompute(c, out, batch=8, dtype="float32")
    assert {k: v["records"] for k, v in manifest["kinds"].items()} == {"text_image": 16, "multiview": 4}
    assert manifest["image_size"] == [32, 32] and manifest["dtype"] == "float32"
    for kind, data in train_sources(c).items():             # the same synthetic data (deterministic)
        src = as_source(data)
        got = [e for shard in records.find_shards(out / kind) for e in records.read_shard(shard)]
        assert [(e.caption, e.frames) for e in got] == [(records.decode(src[i]).caption, records.decode(src[i]).frames)
                                                        for i in range(len(src))]
        raw = as_source(str(out / kind))
        for i in range(len(raw)):
            lat = records.read_latents(raw[i])
            assert lat["image_size"] == (32, 32) and len(lat["mean"]) == len(got[i].frames)
            assert all(m.shape == (16, 16, 4) and m.dtype == np.float32 for m in lat["mean"] + lat["logvar"])
    with pytest.raises(ValueError, match="image size"):
        precompute.latent_sources(out, image_size=(64, 64))

    c.data.latents = str(out)
    lat_run = tmp_path / "lat_run"
    train_mod.train(c, str(lat_run), stop_after=2)
    losses, want = _losses(lat_run), _losses(full_run)[:2]
    print(f"\n[latents] precomputed vs image losses, 2 steps: {losses} vs {want}")
    np.testing.assert_allclose(losses, want, rtol=1e-5)
