"""customjax.data: records, converters, sources (ArrayRecord, TFDS without TensorFlow), robust decoding,
the RealCustom++ curriculum (Eqs. 10-11, Table X) and the grain pipeline (determinism, per-process
sharding, checkpointing, workers, skip counting). Tiny synthetic images only."""

import dataclasses
import io
import json
import math
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from customjax.data import convert, curriculum, images, loader, mixture, records, sources, synthetic, training, transforms
from customjax.data.loader import SkipCounter, make_loader

GOOD_SYNTH = 16


# ----------------------------------------------------------------------------------------------------------
# Fixtures: synthetic shards written once per module.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write_text_image_shards(root / "ti", 24, size=48, num_shards=2, seed=0)
    synthetic.write_multiview_shards(root / "mv", 8, num_frames=3, size=48, num_shards=2, seed=0)
    stats = synthetic.write_text_image_shards(root / "bad", GOOD_SYNTH, size=48, seed=1,
                                              inject=list(synthetic.BAD_IMAGES))
    return {"text_image": str(root / "ti"), "multiview": str(root / "mv"), "bad": str(root / "bad"), "stats": stats}


def kw(**over):
    base = dict(global_batch_size=4, image_size=32, reference_size=24, total_steps=8, seed=0,
                process_index=0, process_count=1, min_size=16)
    return {**base, **over}


def take(ds, n):
    it = iter(ds)
    try:
        return [next(it) for _ in range(n)]
    finally:
        if hasattr(it, "close"):
            it.close()


def assert_same_batches(a, b, keys=("image", "reference", "caption", "index", "is_multiview")):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------------------------------------
# Records and converters.


def test_record_roundtrip_and_errors(tmp_path):
    ex = records.Example(kind="multiview", caption="a toy", frames=(b"a", b"bc"), names=("0", "1"),
                         masks=(None, b"m"), object_id="obj", source="here")
    assert records.decode(records.encode(ex)) == ex
    plain = records.Example(kind="text_image", caption="", frames=(b"x",), source="s")
    assert records.decode(records.encode(plain)).masks is None
    with pytest.raises(records.RecordError, match="shard.ar#3: not a msgpack"):
        records.decode(b"\xc1", "shard.ar#3")
    import msgpack

    with pytest.raises(records.RecordError, match="#4: missing key 'frames'"):
        records.decode(msgpack.packb({"v": 1, "kind": "text_image", "caption": ""}), "#4")
    with pytest.raises(records.RecordError, match="#5: caption must be a str"):
        records.decode(msgpack.packb({"v": 1, "kind": "text_image", "caption": "", "frames": 3}), "#5")
    with pytest.raises(records.RecordError, match="#6: frames and masks must be binary"):
        records.decode(msgpack.packb({"v": 1, "kind": "text_image", "caption": "", "frames": ["str"]}), "#6")
    with pytest.raises(records.RecordError, match="kind"):
        records.Example(kind="video", caption="", frames=(b"x",))
    with records.ShardedWriter(tmp_path, "t", num_shards=3) as w:
        for i in range(7):
            w.write(records.Example(kind="text_image", caption=str(i), frames=(b"x",)))
    assert [len(records.read_shard(p)) for p in w.paths] == [3, 2, 2]  # round robin
    assert records.read_shard(w.paths[1])[0].caption == "1"


def test_convert_image_folder(tmp_path):
    src = tmp_path / "src"
    captions = synthetic.write_image_folder(src, 6, size=32, per_folder=4)  # nested 00000/, 00001/
    Image.new("RGB", (32, 32)).save(src / "00001" / "nocaption.jpg")
    (src / "00001" / "broken.jpg").write_bytes(b"garbage")
    (src / "00001" / "broken.txt").write_text("broken")
    stats = convert.convert("folder", src, tmp_path / "out", "laion", num_shards=2, progress=False)
    assert stats["written"] == 6 and stats["skipped"] == {"missing_caption": 1, "undecodable": 1}
    on_disk = json.loads((tmp_path / "out" / "laion.stats.json").read_text())
    assert on_disk["written"] == 6 and on_disk["skipped_total"] == 2 and len(on_disk["shards"]) == 2
    got = [e for p in records.find_shards(tmp_path / "out") for e in records.read_shard(p)]
    assert sorted(e.caption for e in got) == sorted(captions)
    for e in got:  # bytes as stored
        assert e.kind == "text_image" and e.frames[0] == pathlib.Path(e.source).read_bytes()


def test_convert_jsonl_cli(tmp_path, capsys):
    manifest = synthetic.write_jsonl(tmp_path / "src", 4, size=32)
    with open(manifest, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"image": "images/missing.png", "caption": "x"}) + "\n")
        f.write(json.dumps({"image": "images/0000.png"}) + "\n")  # no caption
    assert convert.command(["jsonl", str(manifest), "--out", str(tmp_path / "out"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 text_image records" in out and "skipped 3" in out
    stats = json.loads((tmp_path / "out" / "train.stats.json").read_text())
    assert stats["skipped"] == {"bad_manifest_line": 1, "missing_caption": 1, "missing_file": 1}
    assert any(":5" in w for w in stats["skipped_examples"]["bad_manifest_line"])  # names the line
    got = records.read_shard(tmp_path / "out" / "train-00000-of-00001.array_record")
    assert [json.loads(line)["caption"] for line in manifest.read_text().splitlines()[:4]] == [e.caption for e in got]


def test_convert_multiview(tmp_path):
    src = tmp_path / "src"
    captions = synthetic.write_multiview_folder(src, 3, num_frames=3, size=32)
    (src / "object0001" / "view01.jpg").write_bytes(b"garbage")  # one bad frame: dropped from the object
    single = src / "single"
    single.mkdir()
    Image.new("RGB", (32, 32)).save(single / "a.jpg")
    (single / "caption.txt").write_text("one view")
    stats = convert.convert("multiview", src, tmp_path / "out", num_shards=2, progress=False)
    assert stats["written"] == 3 and stats["skipped"] == {"too_few_frames": 1}
    assert stats["frames_skipped"] == {"undecodable": 1}
    got = {e.object_id: e for p in records.find_shards(tmp_path / "out") for e in records.read_shard(p)}
    assert sorted(got) == ["object0000", "object0001", "object0002"]
    assert [got[o].caption for o in sorted(got)] == captions
    assert got["object0000"].names == ("view00", "view01", "view02") and len(got["object0001"].frames) == 2
    assert got["object0001"].names == ("view00", "view02")
    mask = Image.open(io.BytesIO(got["object0000"].masks[1]))
    assert mask.mode == "L" and mask.size == (32, 32)


def test_convert_multiview_masks_from_alpha_and_required(tmp_path):
    """A cut-out view's alpha channel is its subject mask when there is no masks/<frame>.png; with
    require_masks a view with neither is an error naming it, raised before any shard is written."""
    src = tmp_path / "src" / "cup"
    src.mkdir(parents=True)
    (src / "caption.txt").write_text("a cup")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[4:12, 4:12, 3] = 255                          # the subject; the rest transparent
    Image.fromarray(rgba, "RGBA").save(src / "a.png")
    Image.fromarray(rgba, "RGBA").save(src / "b.png")
    stats = convert.convert("multiview", tmp_path / "src", tmp_path / "out", progress=False, require_masks=True)
    assert stats["written"] == 1
    (ex,) = [e for p in records.find_shards(tmp_path / "out") for e in records.read_shard(p)]
    m = np.asarray(Image.open(io.BytesIO(ex.masks[0])))
    np.testing.assert_array_equal(m, rgba[..., 3])
    Image.new("RGB", (16, 16)).save(src / "c.png")       # opaque, no mask file
    with pytest.raises(convert.MissingMaskError, match=r"c\.png: no subject mask"):
        convert.convert("multiview", tmp_path / "src", tmp_path / "out2", progress=False, require_masks=True)
    assert not (tmp_path / "out2").exists()
    # optional masks (the default): the view is kept without one
    stats = convert.convert("multiview", tmp_path / "src", tmp_path / "out3", progress=False)
    (ex,) = [e for p in records.find_shards(tmp_path / "out3") for e in records.read_shard(p)]
    assert stats["written"] == 1 and ex.masks[2] is None and ex.masks[0] is not None
    # the command line: one line, exit code 2
    with pytest.raises(SystemExit) as e:
        convert.command(["multiview", str(tmp_path / "src"), "--out", str(tmp_path / "out4"), "--require_masks",
                         "--no_progress"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------
# Decoding and geometry.


def _png(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_open_rgb_modes_and_failures():
    base = Image.new("RGB", (40, 30), (200, 30, 30))
    cases = {
        "L": _png(base.convert("L")), "CMYK": _png(base.convert("CMYK"), "JPEG"),
        "P": _png(base.convert("P")), "RGBA": _png(base.convert("RGBA")),
        "I;16": _png(Image.fromarray(np.full((30, 40), 40000, np.uint16))),
    }
    for mode, data in cases.items():
        im, size = images.open_rgb(data, mode)
        assert im.mode == "RGB" and size == (30, 40), mode
    transparent = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    assert np.asarray(images.open_rgb(_png(transparent), "t")[0]).min() == 255  # on white
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x30, shown 30x40
    base.save(rotated, format="JPEG", exif=exif)
    im, size = images.open_rgb(rotated.getvalue(), "exif")
    assert size == (40, 30) and im.size == (30, 40)
    big = _png(Image.new("RGB", (256, 256)), "JPEG")
    im, size = images.open_rgb(big, "draft", scale=lambda h, w: 0.25)
    assert size == (256, 256) and im.size == (64, 64)  # decoded at 1/4 scale
    for data, reason in [(b"junk", "undecodable"), (big[: len(big) // 2], "truncated"), (cases["L"], "too_small")]:
        with pytest.raises(images.ImageError, match="rec#1") as e:
            images.open_rgb(data, "rec#1", min_size=31)
        assert e.value.reason == reason
        assert convert.check_image(data, "decode") == (None if reason == "too_small" else reason)
    # Header-only sizes: what open_rgb reports (EXIF orientation), without decoding (truncation unseen).
    assert images.oriented_size(rotated.getvalue(), "exif") == (40, 30)
    assert images.oriented_size(big[: len(big) // 2], "t") == (256, 256)
    assert images.oriented_size(np.zeros((20, 30, 3), np.uint8), "a") == (20, 30)
    for data, reason in [(b"junk", "undecodable"), (cases["L"], "too_small")]:
        with pytest.raises(images.ImageError, match="rec#2") as e:
            images.oriented_size(data, "rec#2", min_size=31)
        assert e.value.reason == reason
    assert convert.check_image(b"junk", "header") == "undecodable" and convert.check_image(big, "decode") is None


def test_crop_boxes():
    box, top_left = images.cover_crop_box((100, 200), (50, 50), (0.5, 0.5))
    assert box == (50.0, 0.0, 150.0, 100.0) and top_left == (0, 25)
    # Eq. 11: resize the centre square (100 px) to out * r = 20 and crop out = 10: a 50 px box.
    assert images.reference_crop_box((100, 200), 10, 2.0, (0.0, 0.0)) == (50.0, 0.0, 100.0, 50.0)
    assert images.reference_crop_box((100, 200), 10, 2.0, (1.0, 1.0)) == (100.0, 50.0, 150.0, 100.0)
    assert images.reference_crop_box((100, 200), 10, 1.0, (0.3, 0.9)) == (50.0, 0.0, 150.0, 100.0)


def _solid(color, size=40):
    return _png(Image.new("RGB", (size, size), color))


def test_augment_views_and_reference():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ex = records.Example(kind="multiview", caption="c", frames=tuple(_solid(c) for c in colors))
    aug = transforms.Augment(image_size=(16, 16), reference_size=8, total_steps=10,
                             recipe=curriculum.Recipe(crop="off"))
    for index in range(6):
        out = aug.map({"record": ex, "kind": "multiview", "step": 0, "index": index, "where": "w"})
        t, r = out["image"][0, 0], out["reference"][0, 0]
        assert out["image"].shape == (16, 16, 3) and out["reference"].shape == (8, 8, 3)
        assert tuple(t) in colors and tuple(r) in colors and tuple(t) != tuple(r)  # two different views
        assert out["is_multiview"] and out["skipped"].sum() == 0
    # A bad frame is replaced by another view and counted as bad_frame, exactly when the element's view
    # order (element_rng(0, i).permutation(3)) reaches it before two good views: it is first or second for
    # elements 1-5 ([0 1 2] x 4, [2 0 1]) and last for 0, 6, 7 ([1 2 0]).
    bad = records.Example(kind="multiview", caption="c", frames=(b"junk", _solid(colors[0]), _solid(colors[1])))
    outs = [aug.map({"record": bad, "kind": "multiview", "step": 0, "index": i, "where": "w"}) for i in range(8)]
    assert [o["skipped"].tolist() for o in outs] == [transforms.skip_vector(bad_frame=i in (1, 2, 3, 4, 5)).tolist()
                                                     for i in range(8)]
    assert all({tuple(o["image"][0, 0]), tuple(o["reference"][0, 0])} == set(colors[:2]) for o in outs)
    allbad = records.Example(kind="multiview", caption="c", frames=(b"junk", b"junk"))
    out = aug.map({"record": allbad, "kind": "multiview", "step": 0, "index": 0, "where": "obj7"})
    assert isinstance(out, transforms.Skipped) and out.reason == "undecodable" and out.where == "obj7"
    # Eq. 11 crop: on a horizontal ramp the reference spans the whole ramp without cropping and a third of it
    # at r = 3 (the centre square resized to 3 * 8 px, an 8 px window cropped).
    ramp = np.repeat(np.linspace(0, 255, 48).astype(np.uint8)[None, :, None], 48, 0).repeat(3, 2)
    el = {"record": records.Example(kind="text_image", caption="c", frames=(_png(Image.fromarray(ramp)),)),
          "kind": "text_image", "step": 10, "index": 3, "where": "w"}
    assert np.ptp(aug.map(el)["reference"][..., 0].astype(int)) > 200
    r3 = transforms.Augment(image_size=(16, 16), reference_size=8, total_steps=10,
                            recipe=curriculum.Recipe(crop="fixed", r_min=3.0, r_max=3.0))
    for i in range(4):
        assert 40 < np.ptp(r3.map({**el, "index": i})["reference"][..., 0].astype(int)) < 100


def test_subject_cutout():
    """The subject alone, centred on a square canvas (its longer side ``extent`` of it), everything else
    the first neutral fill far enough from the subject's colours; an empty mask gives None."""
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:] = (30, 60, 220)                                      # blue background
    frame[5:15, 35:55] = (220, 30, 30)                            # a red 10 x 20 box, the subject
    frame[20:30, 5:15] = (220, 30, 30)                            # a red distractor outside the mask
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 35:55] = 255
    im, size = images.subject_cutout(Image.fromarray(frame), Image.fromarray(mask), extent=0.5)
    a = np.asarray(im)
    assert size == (40, 40) and a.shape == (40, 40, 3)            # ceil(20 / 0.5)
    red = (a == (220, 30, 30)).all(-1)
    ys, xs = np.nonzero(red)
    assert red.sum() == 200 and (ys.min(), ys.max(), xs.min(), xs.max()) == (15, 24, 10, 29)   # centred, alone
    assert (a[~red] == 255).all()                                 # white fill (the canvas also leaves the frame)
    frame[5:15, 35:45] = (250, 250, 250)                          # a white half: the fill becomes gray
    a = np.asarray(images.subject_cutout(Image.fromarray(frame), Image.fromarray(mask), extent=0.5)[0])
    assert ((a == 128).all(-1) | (a == (220, 30, 30)).all(-1) | (a == 250).all(-1)).all() and (a == 128).all(-1).any()
    assert images.subject_cutout(Image.fromarray(frame), Image.fromarray(mask * 0)) is None


def test_augment_subject_reference(monkeypatch):
    """``subject_reference``: a multiview reference is the cut-out of a frame other than the target's
    (then Eq. 11); frames without a usable mask keep the whole frame and count ``bad_mask``;
    text-image references are unchanged."""
    frames, masks = [], []
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        f = np.full((40, 40, 3), 90, np.uint8)
        f[4 + 8 * k:14 + 8 * k, 6 + 5 * k:24 + 5 * k] = color
        m = (f != 90).any(-1).astype(np.uint8) * 255
        frames.append(f)
        masks.append(m)
    ex = records.Example(kind="multiview", caption="c", frames=tuple(_png(Image.fromarray(f)) for f in frames),
                         masks=tuple(_png(Image.fromarray(m)) for m in masks))
    aug = transforms.Augment(image_size=(16, 16), reference_size=12, total_steps=10, hflip=False,
                             recipe=curriculum.Recipe(crop="off"), subject_reference=True)
    cuts = []
    for f, m in zip(frames, masks):
        im, size = images.subject_cutout(Image.fromarray(f), Image.fromarray(m))
        cuts.append(np.asarray(images.crop_resize(im, size, images.reference_crop_box(size, 12, 1.0, (0.5, 0.5)),
                                                  (12, 12))))
    seen = set()
    for index in range(8):
        out = aug.map({"record": ex, "kind": "multiview", "step": 0, "index": index, "where": "w"})
        t = next(k for k, f in enumerate(frames) if (np.asarray(Image.fromarray(f).resize((16, 16), Image.BICUBIC))
                                                   == out["image"]).all())
        r = [k for k, c in enumerate(cuts) if (c == out["reference"]).all()]
        assert len(r) == 1 and r[0] != t and out["skipped"].sum() == 0
        seen.add(r[0])
    assert len(seen) > 1
    # without masks: the whole frame, not counted (nothing was asked of a mask); an empty mask: counted
    plain = dataclasses.replace(ex, masks=None)
    out = aug.map({"record": plain, "kind": "multiview", "step": 0, "index": 0, "where": "w"})
    assert (out["reference"] == 90).mean() > 0.5 and out["skipped"].sum() == 0
    empty = dataclasses.replace(ex, masks=tuple(_png(Image.fromarray(m * 0)) for m in masks))
    out = aug.map({"record": empty, "kind": "multiview", "step": 0, "index": 0, "where": "w"})
    assert (out["reference"] == 90).mean() > 0.5 and out["skipped"].tolist() == transforms.skip_vector(bad_mask=1).tolist()
    # a reference that will be cut is decoded at full size (its box is unknown before decoding); without the
    # cut-out the frame may be decoded reduced (JPEG draft) to what the reference crop needs
    scales = []
    real_open = images.open_rgb

    def spy(data, where, *, min_size=0, scale=None):
        scales.append(None if scale is None else scale(256, 256))
        return real_open(data, where, min_size=min_size, scale=scale)
    big = np.full((256, 256, 3), 90, np.uint8)
    big[100:140, 100:140] = (255, 0, 0)
    jpg = io.BytesIO()
    Image.fromarray(big).save(jpg, "JPEG")
    bm = np.zeros((256, 256), np.uint8)
    bm[100:140, 100:140] = 255
    large = records.Example(kind="multiview", caption="c", frames=(jpg.getvalue(),) * 2,
                            masks=(_png(Image.fromarray(bm)),) * 2)
    monkeypatch.setattr(images, "open_rgb", spy)
    for a in (aug, dataclasses.replace(aug, subject_reference=False)):
        scales.clear()
        out = a.map({"record": large, "kind": "multiview", "step": 0, "index": 0, "where": "w"})
        assert len(scales) == 2 and scales[0] < 0.1                         # the target: 16 / 256
        assert (scales[1] == 1.0) is a.subject_reference, scales
    red = (out["reference"][..., 0] > 200) & (out["reference"][..., 1] < 80)
    assert red.mean() < 0.05                                             # the whole frame: a small red square
    ti = records.Example(kind="text_image", caption="c", frames=(ex.frames[0],))
    a = transforms.Augment(image_size=(16, 16), reference_size=12, total_steps=10, hflip=False,
                           recipe=curriculum.Recipe(crop="off"), subject_reference=True)
    b = dataclasses.replace(a, subject_reference=False)
    el = {"record": ti, "kind": "text_image", "step": 0, "index": 0, "where": "w"}
    assert (a.map(el)["reference"] == b.map(el)["reference"]).all()


# ----------------------------------------------------------------------------------------------------------
# Curriculum (Eqs. 10-11, Table X) and the index -> record mixture.


def test_curriculum_schedules():
    S = 160_000
    assert curriculum.multiview_probability(0, S) == 0.0
    assert curriculum.multiview_probability(S // 2, S) == 0.5
    assert curriculum.multiview_probability(S, S) == 1.0 and curriculum.multiview_probability(2 * S, S) == 1.0
    assert curriculum.crop_ratio_bound(0, S) == 1.0
    assert curriculum.crop_ratio_bound(S // 2, S) == pytest.approx((1 + math.sqrt(10)) / 2)
    assert curriculum.crop_ratio_bound(S, S) == pytest.approx(math.sqrt(10))
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert curriculum.crop_ratio(0, S, rng()) == 1.0  # U(1, 1)
    assert curriculum.crop_ratio(S // 3, S, rng()) == curriculum.crop_ratio(S // 3, S, rng())  # pure in (step, rng)
    g = np.random.default_rng(0)
    mid = [curriculum.crop_ratio(S // 2, S, g) for _ in range(2000)]
    end = [curriculum.crop_ratio(S, S, g, "curriculum") for _ in range(2000)]
    fixed0 = [curriculum.crop_ratio(0, S, g, "fixed") for _ in range(2000)]
    assert 1 <= min(mid) and max(mid) <= (1 + math.sqrt(10)) / 2 and max(mid) > 2.0
    assert max(end) <= math.sqrt(10) and max(end) > 3.1 and np.mean(end) == pytest.approx(2.08, abs=0.05)
    assert max(fixed0) > 3.1  # Table X No.5: the full range from step 0
    assert curriculum.crop_ratio(S, S, g, "off") == 1.0
    # Table X rows: (P_multiview at step 0, mid, end), crop bound at the end.
    expect = {
        "table10_no1": ((0, 0, 0), "off"), "table10_no2": ((1, 1, 1), "off"), "table10_no3": ((0.5, 0.5, 0.5), "off"),
        "table10_no4": ((0, 0.5, 1), "off"), "table10_no5": ((0, 0.5, 1), "fixed"),
        "table10_no6": ((0, 0.5, 1), "curriculum"),
    }
    for name, (ps, crop) in expect.items():
        r = curriculum.recipe(name)
        assert tuple(r.p_multiview(s, S) for s in (0, S // 2, S)) == ps and r.crop == crop, name
    assert curriculum.recipe("curriculum") == curriculum.TABLE_X["table10_no6"]
    assert curriculum.recipe("table10_no1").needs == ("text_image",)
    with pytest.raises(ValueError, match="unknown recipe"):
        curriculum.recipe("table10_no7")


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000):
        for key in (0, 1, 12345):
            assert sorted(mixture.permute(i, n, key) for i in range(n)) == list(range(n))
    assert [mixture.permute(i, 1000, 1) for i in range(10)] != [mixture.permute(i, 1000, 2) for i in range(10)]


def test_mixture_follows_eq10():
    """Eq. 10 decides the data kind per training step (the batch of step S_cur is a multiview batch
    with probability S_cur / S_total): every element of one step has the same kind, and the fraction
    of multiview steps follows the schedule."""
    srcs = {"text_image": [b"t"] * 50, "multiview": [b"m"] * 30}
    G, S = 4, 2000
    mix = mixture.Mixture(srcs, curriculum.recipe("table10_no6"), total_steps=S, global_batch_size=G, seed=3)
    step_kind = []
    for step in range(S + 1):
        kinds = {mix[step * G + j]["kind"] for j in range(G)}
        assert all(mix[step * G + j]["step"] == step for j in range(G))
        assert len(kinds) == 1, (step, kinds)                      # one kind per step, never mixed
        step_kind.append(kinds.pop() == "multiview")
    assert not step_kind[0] and step_kind[S]                       # P = 0 at step 0, 1 at step S
    for lo, hi in ((0, 400), (800, 1200), (1600, 2000)):           # mean of P over the window, +- 5 sigma
        frac, want = np.mean(step_kind[lo:hi]), (lo + hi - 1) / 2 / S
        assert abs(frac - want) < 5 * np.sqrt(want * (1 - want) / (hi - lo)) + 0.01, (lo, frac, want)
    # Within one window of n indices a kind's records are distinct (sampling without replacement).
    only = mixture.Mixture({"text_image": list(range(50))}, curriculum.recipe("table10_no1"), S, G, seed=1)
    assert sorted(only[i]["record"] for i in range(50)) == list(range(50))
    assert [only[i]["record"] for i in range(50)] != [only[50 + i]["record"] for i in range(50)]  # reshuffled
    fixed = mixture.Mixture(srcs, curriculum.recipe("table10_no3"), S, G, seed=0)
    assert abs([fixed[i * G]["kind"] for i in range(2000)].count("multiview") / 2000 - 0.5) < 0.05
    with pytest.raises(ValueError, match="reads multiview data"):
        mixture.Mixture({"text_image": [b"t"]}, curriculum.recipe("table10_no4"), S, G)


# ----------------------------------------------------------------------------------------------------------
# The pipeline.


def test_loader_shapes_determinism_and_curriculum(data):
    srcs = {"text_image": data["text_image"], "multiview": data["multiview"]}
    a = take(make_loader(srcs, **kw(with_mask=True)), 8)
    b = take(make_loader(srcs, **kw(with_mask=True)), 8)
    assert_same_batches(a, b)
    c = take(make_loader(srcs, **kw(seed=1)), 8)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    x = a[0]
    assert x["image"].shape == (4, 32, 32, 3) and x["image"].dtype == np.float32
    assert -1 <= x["image"].min() and x["image"].max() <= 1 and x["image"].min() < -0.5
    assert x["reference"].shape == (4, 24, 24, 3) and 0 <= x["reference"].min() and x["reference"].max() <= 1
    assert x["mask"].shape == (4, 32, 32) and x["caption"].shape == (4,) and x["is_multiview"].dtype == bool
    assert x["original_size"].tolist() == [[48, 48]] * 4 and x["skipped"].shape == (4, len(transforms.SKIP_REASONS))
    assert [int(batch["step"][0]) for batch in a] == list(range(8))  # step = index // global batch
    mv = np.array([batch["is_multiview"].mean() for batch in a])
    assert mv[0] == 0 and mv[-2:].mean() > 0.5  # Eq. 10: multiview share grows with the step
    m = np.concatenate([batch["mask"][batch["is_multiview"]] for batch in a])
    assert 0 < m.mean() < 1  # multiview masks are the subject's
    ti = take(make_loader(srcs, **kw(recipe="table10_no1")), 2)
    assert not any(batch["is_multiview"].any() for batch in ti)
    start = take(make_loader(srcs, **kw(step_offset=8)), 1)[0]
    assert start["step"].tolist() == [8] * 4 and start["is_multiview"].all()


def test_loader_process_sharding(data):
    srcs = {"text_image": data["text_image"], "multiview": data["multiview"]}
    whole = take(make_loader(srcs, **kw(global_batch_size=8)), 3)
    parts = [take(make_loader(srcs, **kw(global_batch_size=8, process_index=p, process_count=2)), 3) for p in (0, 1)]
    for step in range(3):
        i0, i1 = parts[0][step]["index"], parts[1][step]["index"]
        assert not set(i0.tolist()) & set(i1.tolist())  # disjoint
        for key in ("index", "image", "reference", "caption"):  # and together the single-process global batch
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])
    with pytest.raises(ValueError, match="does not divide"):
        make_loader(srcs, **kw(global_batch_size=5, process_count=2))
    defaults = {k: v for k, v in kw().items() if k not in ("process_index", "process_count")}
    first = take(make_loader(srcs, **defaults), 1)[0]  # process index / count from jax (one CPU process)
    assert first["index"].tolist() == [0, 1, 2, 3]


def test_loader_state_restore(data, tmp_path):
    import grain
    from etils import epath

    srcs = {"text_image": data["text_image"], "multiview": data["multiview"]}
    ds = make_loader(srcs, **kw())
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))  # orbax handler
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_loader(srcs, **kw()))
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(3)], expected)
    restored = iter(make_loader(srcs, **kw()))
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(restored))
    assert_same_batches([next(restored) for _ in range(3)], expected)


def _train_config(**data):
    """A config with the keys ``configs/common.py`` ``add_train`` gives (and the loader reads)."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        method="realcustompp", seed=0, encoders=dict(image_size=28, scale=2),
        train=dict(batch=4, image_size=32, steps=2),
        data=dict(text_image="", multiview="", generator="synthetic", examples=12, size=64,
                  workers=0, recipe="curriculum", hflip=True, random_crop=False, latents="", **data)))


def test_train_loader_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOMJAX_CACHE", str(tmp_path / "cache"))
    c = _train_config()
    srcs = loader.train_sources(c)  # generated once into the cache, then reused
    assert {k: len(sources.as_source(v)) for k, v in srcs.items()} == {"text_image": 12, "multiview": 3}
    assert all(pathlib.Path(v).is_relative_to(tmp_path / "cache") for v in srcs.values())
    assert loader.train_sources(c) == srcs and len(list((tmp_path / "cache" / "data").iterdir())) == 1
    tl = training.make_train_loader(c, 56, process_index=0, process_count=1)
    start = tl.get_state()
    first = tl.peek()
    assert first["reference"].shape == (4, 56, 56, 3) and first["image"].shape == (4, 32, 32, 3)
    assert tl.get_state() == start  # peeking consumes nothing
    b0, b1 = next(tl), next(tl)
    np.testing.assert_array_equal(b0["index"], first["index"])
    after = tl.get_state()
    b2 = next(tl)
    tl.set_state(after)
    np.testing.assert_array_equal(next(tl)["index"], b2["index"])
    tl.set_state(start)
    np.testing.assert_array_equal(next(tl)["index"], b0["index"])
    assert tl.skips.records == 0
    # The recipe: Eq. 10 per step (P = 0, 0.5, 1 at steps 0, 1, 2 of train.steps = 2), one kind a batch;
    # text_image never.
    assert all(b["is_multiview"].all() or not b["is_multiview"].any() for b in (b0, b1, b2))
    assert not b0["is_multiview"].any() and b2["is_multiview"].all()
    c.data.recipe = "text_image"
    tl = training.make_train_loader(c, 56, process_index=0, process_count=1)
    assert not any(next(tl)["is_multiview"].any() for _ in range(4))
    # config.data.subject_reference reaches the transform; objective.subject_weight > 0 asks for the mask
    made, real = [], transforms.Augment
    monkeypatch.setattr(transforms, "Augment", lambda **k: made.append(k) or real(**k))
    for flag in (False, True):
        with c.unlocked():
            c.data.subject_reference = flag
            c.objective = dict(subject_weight=4.0 * flag)
        tl = training.make_train_loader(c, 56, process_index=0, process_count=1)
        assert made[-1]["subject_reference"] is flag and made[-1]["with_mask"] is flag
        assert ("mask" in tl.peek()) is flag
    c.data.generator = ""
    with pytest.raises(ValueError, match="names no generated dataset"):
        training.make_train_loader(c, 56, process_index=0, process_count=1)
    c.data.generator = "shapewrld"   # a typo, or a generator whose package was never imported
    with pytest.raises(ValueError, match=r"'shapewrld' is not registered \(registered: .*'synthetic'"):
        training.make_train_loader(c, 56, process_index=0, process_count=1)


def test_generated_sources_race(tmp_path, monkeypatch):
    """Concurrent first uses: one folder wins the rename, the others reuse it; no temporary folder stays."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("CUSTOMJAX_CACHE", str(tmp_path))
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: loader.generated_sources("synthetic", 4, 32, 1), range(3)))
    assert got[0] == got[1] == got[2] and [p.name for p in (tmp_path / "data").iterdir()] == [
        pathlib.Path(got[0]["text_image"]).parent.name]
    assert records.read_shard(records.find_shards(got[0]["text_image"])[0])[0].caption


def test_precomputed_latent_records_and_loader(data, tmp_path):
    """The precompute record format round-trips (per-frame posteriors, missing frames, storage
    dtypes); a latents-mode loader reads the same elements and references as the image loader
    without target flips, with the posterior of exactly the frame the image loader uses as target,
    whose centre crop is what precompute encodes. Fake posteriors: value = 100 * record + frame."""
    from customjax.data import precompute

    ex = records.read_shard(records.find_shards(data["multiview"])[0])[0]
    means = [np.full((4, 4, 4), 1.5, np.float32), None, np.arange(64, dtype=np.float32).reshape(4, 4, 4)]
    for dtype in precompute.DTYPES:
        rec = records.with_latents(ex, (32, 32), means, [m if m is None else -m for m in means], dtype)
        assert records.decode(rec).frames == ex.frames  # still a plain record
        lat = records.read_latents(rec)
        assert lat["image_size"] == (32, 32) and lat["mean"][1] is None and lat["logvar"][1] is None
        np.testing.assert_array_equal(lat["mean"][2].astype(np.float32), means[2])
        np.testing.assert_array_equal(lat["logvar"][0].astype(np.float32), -means[0])
        d = records.unpack(rec)  # one unpacked map serves both
        assert records.from_map(d) == records.decode(rec) and records.read_latents(d)["image_size"] == (32, 32)
    assert records.read_latents(records.encode(ex)) is None
    plain = {"record": records.encode(ex), "kind": "multiview", "where": "x", "step": 0, "index": 0}
    assert transforms.ParseRecord(latents=True).map(plain).reason == "bad_record"

    examples = {}
    for kind in ("text_image", "multiview"):
        examples[kind] = [e for f in records.find_shards(data[kind]) for e in records.read_shard(f)]
        with records.ShardedWriter(tmp_path / kind, kind) as w:
            for r, e in enumerate(examples[kind]):
                m = [np.full((4, 4, 4), 100.0 * r + fi, np.float32) for fi in range(len(e.frames))]
                w.write(records.with_latents(e, (32, 32), m, m, "float32"))
    srcs = {k: data[k] for k in examples}
    lat_srcs = {k: str(tmp_path / k) for k in examples}
    want = take(make_loader(srcs, **kw(hflip=False, with_mask=True)), 8)
    got = take(make_loader(lat_srcs, **kw(latents=True, with_mask=True)), 8)  # hflip (default) is ignored
    assert_same_batches(got, want, keys=("reference", "caption", "index", "is_multiview", "mask", "original_size",
                                         "crop_top_left"))
    assert "image" not in got[0] and got[0]["latent_mean"].shape == (4, 4, 4, 4)
    seen = set()
    for g, w in zip(got, want):
        for j in range(4):
            kind = "multiview" if g["is_multiview"][j] else "text_image"
            r, fi = divmod(int(g["latent_mean"][j, 0, 0, 0]), 100)
            crop = precompute.center_crop(examples[kind][r].frames[fi], "test", (32, 32))
            np.testing.assert_allclose(crop / 127.5 - 1, w["image"][j], atol=1e-6)
            seen.add(kind)
    assert seen == {"text_image", "multiview"}
    # A frame without latents (precompute could not decode it) is replaced like an undecodable frame.
    bad = records.Example(kind="multiview", caption="c", frames=(b"junk",) + ex.frames[:2])
    m = [None, np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), np.float32)]
    aug = transforms.Augment(image_size=(32, 32), reference_size=24, total_steps=8, hflip=False)
    for i in range(8):
        el = {"record": bad, "kind": "multiview", "where": "w", "step": 0, "index": i}
        img = aug.map(el)
        lat = transforms.ParseRecord(latents=True).map({**el, "record": records.with_latents(bad, (32, 32), m, m,
                                                                                              "float32")})
        out = dataclasses.replace(aug, latents=True).map(lat)
        assert out["skipped"].tolist() == img["skipped"].tolist()
        np.testing.assert_array_equal(out["reference"], img["reference"])


def test_precompute_matches_image_targets_on_large_jpegs(tmp_path):
    """Real precompute output (float32, tiny random VAE) equals the VAE posterior of the image path's
    target, for 512 px JPEGs whose reference (96 px) needs more pixels than the 32 px target: the
    target must not depend on the reference's decoding scale (JPEG draft)."""
    import ml_collections

    from customjax.data import precompute

    convert.write_shards(synthetic.text_image_examples(6, size=512, fmt="JPEG"), tmp_path / "ti", progress=False)
    convert.write_shards(synthetic.multiview_examples(2, num_frames=3, size=512), tmp_path / "mv", progress=False)
    c = ml_collections.ConfigDict(dict(
        seed=0, model=dict(path="", random="sd15", random_scale="tiny", dtype="float32"),
        train=dict(image_size=32), data=dict(text_image=str(tmp_path / "ti"), multiview=str(tmp_path / "mv"),
                                             recipe="curriculum")))
    manifest = precompute.precompute(c, tmp_path / "lat", batch=4, dtype="float32")
    assert {k: v["records"] for k, v in manifest["kinds"].items()} == {"text_image": 6, "multiview": 2}
    lat_srcs = precompute.latent_sources(tmp_path / "lat", image_size=(32, 32))
    over = dict(reference_size=96, total_steps=2)
    want = take(make_loader({"text_image": str(tmp_path / "ti"), "multiview": str(tmp_path / "mv")},
                            **kw(hflip=False, **over)), 4)
    got = take(make_loader(lat_srcs, **kw(latents=True, **over)), 4)
    assert_same_batches(got, want, keys=("reference", "caption", "index", "is_multiview", "original_size"))
    assert want[0]["original_size"].tolist() == [[512, 512]] * 4 and want[-1]["is_multiview"].all()
    vae, params = precompute.load_vae(c)
    for g, w in zip(got, want):
        mean, logvar = vae.apply({"params": params}, w["image"], method="encode")
        np.testing.assert_allclose(g["latent_mean"], mean, atol=1e-5)
        np.testing.assert_allclose(g["latent_logvar"], logvar, atol=1e-4)


def test_bad_images_are_skipped_and_counted_exactly(data):
    injected = list(synthetic.BAD_IMAGES)
    assert data["stats"]["written"] == GOOD_SYNTH + len(injected)
    counter = SkipCounter()
    ds = make_loader({"text_image": data["bad"]}, **kw(recipe="text_image", num_epochs=1, shuffle=False,
                                                        drop_remainder=False))
    batches = list(ds)
    for b in batches:
        counter.update(b)
    expected = {r: 0 for r in transforms.SKIP_REASONS}
    for kind, reason in synthetic.BAD_IMAGES.items():
        if reason:
            expected[reason] += 1
    assert counter.by_reason == expected and counter.records == 3
    captions = np.concatenate([b["caption"] for b in batches]).tolist()
    assert len(captions) == GOOD_SYNTH + len(injected) - 3
    for kind in ("grayscale", "cmyk", "palette", "rgba"):  # converted to RGB, kept
        assert f"a {kind} image" in captions
    gray = np.concatenate([b["image"] for b in batches])[captions.index("a grayscale image")]
    assert np.allclose(gray[..., 0], gray[..., 1]) and np.allclose(gray[..., 1], gray[..., 2])


def test_multiworker_loading(data):
    """num_workers=2 (spawned processes): the same batches as in-process, and exact skip counts."""
    srcs = {"text_image": data["text_image"], "multiview": data["multiview"]}
    inproc = take(make_loader(srcs, **kw()), 4)
    ds = make_loader(srcs, **kw(num_workers=2))
    it = iter(ds)
    try:
        workers = [next(it) for _ in range(2)]
        state = it.get_state()
        workers += [next(it) for _ in range(2)]
    finally:
        it.close()
    assert_same_batches(workers, inproc)  # worker count does not change the data
    it = iter(make_loader(srcs, **kw(num_workers=2)))  # a fresh pipeline resumed from the state
    try:
        it.set_state(state)
        assert_same_batches([next(it) for _ in range(2)], inproc[2:])
    finally:
        it.close()
    counter = SkipCounter()
    it = iter(make_loader({"text_image": data["bad"]}, **kw(recipe="text_image", num_epochs=1, shuffle=False,
                                                             drop_remainder=False, num_workers=2)))
    try:
        n = 0
        for batch in it:
            counter.update(batch)
            n += len(batch["caption"])
    finally:
        it.close()
    assert counter.records == 3 and counter.by_reason["truncated"] == 1
    assert n == GOOD_SYNTH + len(synthetic.BAD_IMAGES) - 3


def _tfds_builders(tfds):
    """Two tiny TFDS builders: text-image (bytes and uint8 pixels) and multiview (sequences of bytes)."""
    from tensorflow_datasets.core.registered import skip_registration

    with skip_registration():  # keep the global builder registry clean
        class TinyPairs(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                    "pixels": tfds.features.Tensor(shape=(20, 30, 3), dtype=np.uint8),  # raw pixels
                    "caption": tfds.features.Text(),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                rng = np.random.default_rng(0)
                for i in range(6):
                    im, text = synthetic.text_image(rng, 40)
                    yield i, {"image": synthetic.encode(im), "pixels": np.asarray(im.resize((30, 20))), "caption": text}

        class TinyViews(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                seq = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"frames": seq, "masks": seq, "caption": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                rng = np.random.default_rng(1)
                for i in range(4):
                    frames, masks, text = synthetic.multiview_object(rng, 40, 3)
                    yield i, {"frames": [synthetic.encode(f) for f in frames],
                              "masks": [synthetic.encode(m) for m in masks], "caption": text}

    return TinyPairs, TinyViews


def test_tfds_array_record_source_without_tensorflow(tmp_path):
    # Earlier tests' garbage is collected now, not during tfds's lazy imports: there, an object's failing
    # finalizer sent pytest's unraisable-exception hook to import tracemalloc inside etils' lazy-import
    # context, which breaks it ("'LazyModule' object is not callable"; seen once in CI). tracemalloc is
    # imported here for the same reason.
    import gc
    import importlib

    importlib.import_module("tracemalloc")
    gc.collect()
    import tensorflow_datasets as tfds

    pairs_cls, views_cls = _tfds_builders(tfds)
    pairs = pairs_cls(data_dir=str(tmp_path), file_format="array_record")
    views = views_cls(data_dir=str(tmp_path), file_format="array_record")
    pairs.download_and_prepare()
    views.download_and_prepare()
    assert "tensorflow" not in sys.modules
    src = sources.TfdsSource(pairs.data_dir, "train", image_key="image")
    assert len(src) == 6 and isinstance(src[0], records.Example) and src[0].caption.startswith("a")
    pix = sources.TfdsSource(pairs.data_dir, "train", image_key="pixels")
    mv = sources.TfdsSource(views.data_dir, "train", kind="multiview", image_key="frames", mask_key="masks")
    assert len(mv[0].frames) == 3 and len(mv[0].masks) == 3
    batches = take(make_loader({"text_image": src, "multiview": mv}, **kw(recipe="table10_no3", with_mask=True)), 2)
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["caption"][0].startswith("a")
    assert any(b["is_multiview"].any() for b in batches)
    out = take(make_loader({"text_image": pix}, **kw(recipe="text_image")), 1)[0]
    assert out["original_size"].tolist() == [[20, 30]] * 4
    assert "tensorflow" not in sys.modules
