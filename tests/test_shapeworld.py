"""ShapeWorld: deterministic generation with exact masks, held-out splits, captions, shards that the
project's loader reads, and the exact metrics (perfect on ground truth, robust to mild degradation,
low on wrong backgrounds / categories / subjects)."""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from customjax.data import records
from customjax.shapeworld import world as sw
from customjax.data.loader import make_loader
from customjax.shapeworld import metrics as M


def scenes(seed, n, size=64, **kw):
    rng = np.random.default_rng(seed)
    return [sw.sample_scene(rng, size, **kw) for _ in range(n)]


def degrade(image, rng, sigma=0.6, noise=6.0, drift=8.0):
    """Blur, per-pixel noise and a global colour shift: a stand-in for an imperfect generation."""
    x = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
    x = x + rng.normal(0, noise, x.shape) + rng.uniform(-drift, drift, 3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Generation.


def test_deterministic():
    a, b, c = scenes(0, 20), scenes(0, 20), scenes(1, 20)
    assert a == b and a != c
    for s, t in zip(a, b):
        (ia, ma), (ib, mb) = sw.render(s), sw.render(t)
        assert ia.tobytes() == ib.tobytes() and ma.tobytes() == mb.tobytes()
    assert sw.text_image_record(0, 5)[0] == sw.text_image_record(0, 5)[0]
    assert sw.multiview_record(0, 3)[0] == sw.multiview_record(0, 3)[0]
    assert sw.text_image_record(0, 5)[0].frames != sw.text_image_record(1, 5)[0].frames
    b1, b2 = sw.batch(np.random.default_rng(4), 8), sw.batch(np.random.default_rng(4), 8)
    assert b1["image"].shape == (8, 64, 64, 3) and b1["image"].dtype == np.uint8
    np.testing.assert_array_equal(b1["image"], b2["image"])
    assert b1["caption"] == b2["caption"]


@pytest.mark.parametrize("size", [64, 128])
def test_masks_match_pixels(size):
    for scene in scenes(2, 60, size):
        image, masks = sw.render(scene, size)
        assert masks.shape == (len(scene.objects), size, size)
        assert masks.any((1, 2)).all()
        assert (masks.sum(0) <= 1).all()  # disjoint
        bg = {sw.PALETTE[c] for c in scene.background.colors}
        assert {tuple(p) for p in image[~masks.any(0)]} <= bg
        for obj, mask in zip(scene.objects, masks):
            allowed = {tuple(c) for c in sw.appearance_colors(obj.appearance)}
            assert {tuple(p) for p in image[mask]} <= allowed
            assert not allowed & bg
            ys, xs = np.nonzero(mask)
            assert M.position_of((xs.mean() + 0.5, ys.mean() + 0.5), image.shape) == obj.position
            assert M.size_of(obj.radius, image.shape) == obj.size


def test_scene_json_roundtrip():
    for s in scenes(3, 10):
        assert sw.scene_from_dict(json.loads(json.dumps(sw.scene_to_dict(s)))) == s


def test_captions_name_categories_and_background():
    rng = np.random.default_rng(5)
    for s in scenes(5, 200):
        for text in (sw.caption(s, rng), sw.prompt(s)):
            words = text.replace(",", " ").split()
            assert all(o.category in words for o in s.objects), text
            assert all(c in words for c in s.background.colors), text
    s = sw.Scene(sw.Background("blue"), (sw.Obj("star", sw.Appearance("red", "white", "stripes", 0), "left", "large",
                                                (14.0, 32.0), 13.0, 0.0),))
    assert sw.prompt(s) == "a large red and white striped star on the left, on a blue background"
    assert sw.subject_phrase(s.objects[0].subject) == "a red and white striped star"


def test_heldout_splits():
    held = sw.heldout_subjects()
    patterned = sum(a.pattern != "solid" for a in sw.all_appearances()) * len(sw.CATEGORIES)
    assert 0.07 < len(held) / patterned < 0.13 and all(sw.is_heldout_subject(s) for s in held)
    assert 0.05 < len(sw.heldout_combos()) / (len(sw.CATEGORIES) * len(sw.COLORS) * len(sw.POSITIONS)) < 0.15
    train = scenes(6, 1500)
    for i in range(40):
        train += sw.multiview_record(6, i)[2]
    for s in train:
        for o in s.objects:
            assert not sw.is_heldout_subject(o.subject)
            assert not any(sw.is_heldout_combo(o.category, c, o.position) for c in s.background.colors)
    ev = sw.eval_scenes(30, seed=0)
    assert ev == sw.eval_scenes(30, seed=0)
    for s in ev:
        o = s.objects[0]
        assert sw.is_heldout_combo(o.category, s.background.color, o.position) and not sw.is_heldout_subject(o.subject)
    rng = np.random.default_rng(0)
    subject = sw.sample_subject(rng, "heldout")
    views = sw.multiview_scenes(rng, subject, 3, split="heldout")
    assert all(v.objects[0].subject == subject for v in views)


def test_multiview_keeps_appearance():
    rng = np.random.default_rng(7)
    own, other = [], []
    for _ in range(12):
        subject = sw.sample_subject(rng)
        views = sw.multiview_scenes(rng, subject, 4)
        assert all(v.objects[0].subject == subject for v in views)
        assert len({(v.background, v.objects[0].center) for v in views}) == 4
        sigs = [M.signature(im, m[0]) for im, m in (sw.render(v) for v in views)]
        foreign = M.subject_signature(sw.sample_subject(rng))
        for i, j in [(0, 1), (1, 2), (2, 3), (0, 3)]:
            own.append(M.similarity(sigs[i], sigs[j]))
        other += [M.similarity(s, foreign) for s in sigs]
    own, other = np.array(own), np.array(other)
    assert own.mean() > 0.85 and np.median(own) > 0.9, own
    assert other.mean() < 0.2 and own.mean() - other.mean() > 0.6


# ----------------------------------------------------------------------------------------------------------
# Metrics.

KEYS = ("background_correct", "count_correct", "category_correct", "position_correct", "size_correct",
        "color_correct")


def test_metrics_ground_truth_and_degraded():
    rng = np.random.default_rng(8)
    clean, noisy = [], []
    for s in scenes(8, 40):
        image, _ = sw.render(s)
        clean.append(M.measure(image, s))
        noisy.append(M.measure(degrade(image, rng), s))
    for r in clean:
        assert all(r[k] for k in KEYS), r
        assert r["background_score"] > 0.99 and r["appearance_similarity"] > 0.6
    summary = M.summarise(clean)
    assert summary["appearance_similarity"]["mean"] > 0.9
    noisy_summary = M.summarise(noisy)
    for k in KEYS:
        assert noisy_summary[k]["mean"] >= 0.9, (k, noisy_summary[k])
    assert noisy_summary["appearance_similarity"]["mean"] > 0.75
    lo, hi = summary["background_score"]["lo"], summary["background_score"]["hi"]
    assert lo <= summary["background_score"]["mean"] <= hi and summary["background_score"]["n"] == 40


def test_metrics_detect_errors():
    subject = sw.Subject("star", sw.Appearance("red", "white", "stripes", 0))
    obj = sw.place(np.random.default_rng(0), subject, "left", "large", 64)
    scene = sw.Scene(sw.Background("blue"), (obj,))
    image, masks = sw.render(scene)
    # Wrong background in the image.
    wrong_bg, _ = sw.render(sw.Scene(sw.Background("green"), (obj,)))
    r = M.measure(wrong_bg, scene)
    assert r["background_score"] < 0.1 and not r["background_correct"] and r["background_detected"] == "green"
    # Wrong category, position and size in the prompt.
    for field, value in (("category", "circle"), ("position", "right"), ("size", "small")):
        prompt = sw.Scene(scene.background, (dataclasses.replace(obj, **{field: value}),))
        r = M.measure(image, prompt)
        assert r[f"{field}_correct"] is False and r["background_correct"], (field, r)
    # A different subject as the reference; a solid one and one with other colours.
    assert M.measure(image, scene, references=[subject])["appearance_similarity"] > 0.8
    assert M.measure(image, scene, references={0: (image, masks[0])})["appearance_similarity"] > 0.99
    for other in (sw.Appearance("red"), sw.Appearance("red", "white", "stripes", 90), sw.Appearance("red", "white", "dots"),
                  sw.Appearance("yellow", "black", "stripes", 0)):
        assert M.measure(image, scene, references=[sw.Subject("star", other)])["appearance_similarity"] < 0.5, other
    # Nothing drawn: everything is wrong but the background.
    empty, _ = sw.render(sw.Scene(scene.background, ()))
    r = M.measure(empty, scene)
    assert r["background_correct"] and not r["category_correct"] and r["num_detected"] == 0
    assert r["appearance_similarity"] == 0.0


def test_measure_references_of_several_objects():
    """One measure call scores every object given a reference; a reference of another subject scores low."""
    a = sw.Subject("star", sw.Appearance("red", "white", "stripes", 0))
    b = sw.Subject("heart", sw.Appearance("yellow", "blue", "dots"))
    objs = (sw.place(np.random.default_rng(3), a, "left", "small", 64),
            sw.place(np.random.default_rng(4), b, "right", "small", 64))
    scene = sw.Scene(sw.Background("gray"), objs)
    image, _ = sw.render(scene)
    r = M.measure(image, scene, references={0: a, 1: b})
    assert [o["similarity"] > 0.8 for o in r["objects"]] == [True, True], r["objects"]
    assert r["appearance_similarity"] == r["objects"][0]["similarity"]
    swapped = M.measure(image, scene, references=[b, a])
    assert all(o["similarity"] < 0.15 for o in swapped["objects"]), swapped["objects"]
    only_second = M.measure(image, scene, references=[None, b])
    assert only_second["appearance_similarity"] is None and only_second["objects"][1]["similarity"] > 0.8
    with pytest.raises(ValueError):
        M.measure(image, scene, references={2: a})


def test_measure_fits_only_the_largest_components(monkeypatch):
    """Only the MAX_CANDIDATES largest components are fitted and assigned; all of them are counted."""
    scene = sw.Scene(sw.Background("white"), (sw.Obj("square", sw.Appearance("red"), "center", "large"),))
    image = np.full((64, 64, 3), sw.PALETTE["white"], np.uint8)
    image[24:40, 24:40] = sw.PALETTE["red"]                      # the subject
    for k in range(M.MAX_CANDIDATES + 2):                        # small blobs of 5 x 5 px above it
        y, x = 2 + 7 * (k // 8), 2 + 7 * (k % 8)
        image[y:y + 5, x:x + 5] = sw.PALETTE["blue"]
    fitted, real_fit = [], M.fit_shape
    monkeypatch.setattr(M, "fit_shape", lambda c, *a, **kw: fitted.append(c.area) or real_fit(c, *a, **kw))
    r = M.measure(image, scene)
    assert r["num_detected"] == M.MAX_CANDIDATES + 3 and not r["count_correct"]
    assert len(fitted) == M.MAX_CANDIDATES and fitted[0] == 256
    assert r["category_correct"] and r["position_correct"] and r["color_correct"]


def test_summarise_intervals():
    """Booleans: Wilson intervals (inside [0, 1], not degenerate at all-true); numbers: the normal
    interval, clipped to [0, 1] for scores known to lie there."""
    s = M.summarise([{"x": 0}, {"x": 1}])["x"]
    assert s["mean"] == 0.5 and s["n"] == 2 and s["lo"] < 0 < 1 < s["hi"]   # unbounded: not clipped
    assert s["hi"] - 0.5 == pytest.approx(1.959964 * np.std([0, 1], ddof=1) / np.sqrt(2))
    u = M.summarise([{"x": 0.0}, {"x": 1.0}], unit=("x",))["x"]
    assert (u["lo"], u["mean"], u["hi"]) == (0.0, 0.5, 1.0)
    b = M.summarise([{"b": True}, {"b": True}, {"b": True}, {"b": False}, {"b": None}])["b"]
    assert b["n"] == 4 and b["mean"] == 0.75
    assert (b["lo"], b["hi"]) == pytest.approx((0.3006, 0.9544), abs=1e-4)    # Wilson 95%, 3 of 4
    t = M.summarise([{"b": True}, {"b": np.bool_(True)}])["b"]
    assert t["hi"] == t["mean"] == 1.0 and 0.1 < t["lo"] < 0.5
    f = M.summarise([{"b": False}])["b"]
    assert f["lo"] == f["mean"] == 0.0 and 0.5 < f["hi"] < 1.0
    assert M.summarise([{"x": 0.3}])["x"] == {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 1}


def test_metrics_two_tone_background_and_partial_prompt():
    bg = sw.Background("white", "black", "checkered")
    a = sw.Appearance("red", "yellow", "checker")
    objs = (sw.place(np.random.default_rng(1), sw.Subject("cross", a), "top", "small", 64),
            sw.place(np.random.default_rng(2), sw.Subject("ring", sw.Appearance("blue")), "bottom", "small", 64))
    image, _ = sw.render(sw.Scene(bg, objs))
    prompt = sw.Scene(bg, (sw.Obj("ring"), sw.Obj("cross", position="top")))  # unnamed attributes are None
    r = M.measure(ndimage.gaussian_filter(image, (0.5, 0.5, 0)), prompt)
    assert r["background_correct"] and r["category_correct"] and r["position_correct"] and r["count_correct"]
    assert r["size_correct"] is None and r["appearance_similarity"] is None
    assert not M.measure(image, sw.Scene(sw.Background("white"), objs))["background_correct"]


# ----------------------------------------------------------------------------------------------------------
# Shards and the project's loader.


def test_shards_load(tmp_path):
    sources = sw.write_dataset(tmp_path, num_text_image=12, num_multiview=4, frames=3, size=64, seed=0, shards=2,
                               num_eval=5)
    ti = [e for p in records.find_shards(sources["text_image"]) for e in records.read_shard(p)]
    mv = [e for p in records.find_shards(sources["multiview"]) for e in records.read_shard(p)]
    assert len(ti) == 12 and len(mv) == 4
    lines = [json.loads(x) for x in (tmp_path / "text_image" / "scenes.jsonl").read_text().splitlines()]
    for ex, line in zip(sorted(ti, key=lambda e: e.source), lines):
        scene = sw.scene_from_dict(line["scene"])
        assert ex.caption == line["caption"] == sw.text_image_record(0, line["index"])[2]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ex.frames[0]))), sw.render(scene)[0])
    for ex in mv:
        assert len(ex.frames) == len(ex.masks) == 3 and ex.object_id
        _, subject, views = sw.multiview_record(0, int(ex.source.rsplit("/", 1)[1]), 3)
        assert ex.caption == sw.subject_caption(subject) == sw.article(subject.category)   # the real word only
        for frame, mask, view in zip(ex.frames, ex.masks, views):
            image, masks = sw.render(view)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(frame))), image)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask))) > 0, masks[0])
    assert len((tmp_path / "eval_prompts.jsonl").read_text().splitlines()) == 5
    ds = make_loader(sources, global_batch_size=4, image_size=64, reference_size=32, total_steps=4,
                     recipe="table10_no6", seed=0, process_index=0, process_count=1, hflip=False, with_mask=True)
    it = iter(ds)
    captions = {e.caption for e in ti + mv}
    for _ in range(3):
        b = next(it)
        assert b["image"].shape == (4, 64, 64, 3) and b["mask"].shape == (4, 64, 64)
        assert set(b["caption"].tolist()) <= captions
        for img, mask, mv_flag in zip(b["image"], b["mask"], b["is_multiview"]):
            if mv_flag:  # the subject mask covers exactly the non-background pixels of one object
                assert 0 < mask.mean() < 0.5 and set(np.unique(mask)) <= {0.0, 1.0}
