"""Word binding (customjax.metrics.binding, benchmarks/word_binding.py): where each subject word's
cross-attention falls relative to its own and the other object."""

import importlib.util
import pathlib

import numpy as np
import pytest

from customjax.metrics.binding import word_binding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scene(h=4, n=6):
    regions = np.zeros((1, 2, h, h), np.float32)
    regions[0, 0, :2, :2] = 1.0                 # object 0 top left, object 1 bottom right
    regions[0, 1, 2:, 2:] = 1.0
    words = np.zeros((1, 2, n), bool)
    words[0, 0, 1] = words[0, 1, [3, 4]] = True   # a two-token word for subject 1
    return regions, words


def test_binding_is_one_when_each_word_attends_its_own_object_and_half_when_both_alike():
    regions, words = _scene()
    T, n = 16, words.shape[-1]
    probs = np.full((1, T, n), 0.01)
    own = regions.reshape(2, T)
    probs[0, :, 1] += own[0]              # word 0 only on object 0
    probs[0, :, 3] += own[1]              # word 1 (both tokens) only on object 1
    probs[0, :, 4] += own[1]
    probs /= probs.sum(-1, keepdims=True)
    r = word_binding(probs, words, regions)
    assert np.all(r["binding"] > 0.9) and np.all(r["density_own"] > 2.0)
    swapped = word_binding(probs, words[:, ::-1], regions)
    assert np.all(swapped["binding"] < 0.1)
    both = np.full((1, T, n), 1.0 / n)
    both[0, :, [1, 3, 4]] *= 1.0 + own.sum(0)          # every word on both objects alike
    both /= both.sum(-1, keepdims=True)
    r = word_binding(both, words, regions)
    assert r["binding"] == pytest.approx(0.5) and r["density_own"] == pytest.approx(r["density_other"])
    assert r["word_mass"][0] == pytest.approx(both[0][:, [1, 3, 4]].sum(-1).mean())
    with pytest.raises(ValueError, match="shapes do not match"):
        word_binding(probs[:, :9], words, regions)
    with pytest.raises(ValueError, match="no word tokens"):
        word_binding(probs, np.zeros_like(words), regions)


@pytest.mark.slow
def test_word_binding_benchmark_regenerates_the_committed_figures_of_the_shipped_base():
    """benchmarks/word_binding.py at t = 500 (all 30 pairs, both noise draws) gives the figures committed in
    benchmarks/results/word_binding_shapeworld_base1296k_cpu.json (README: ShapeWorld > Status) to 0.005."""
    import json

    spec = importlib.util.spec_from_file_location("word_binding", ROOT / "benchmarks" / "word_binding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = json.loads((ROOT / "benchmarks/results/word_binding_shapeworld_base1296k_cpu.json").read_text())
    got = mod.measure(str(ROOT / "customjax/shapeworld/assets/shapeworld_base"), pairs=rec["pairs"], ts=[500],
                      draws=rec["draws"])["500"]
    want = rec["by_t"]["500"]
    assert sorted(got) == sorted(want) and len(got) == 7
    for layer, stats in want.items():
        for name, v in stats.items():
            assert abs(got[layer][name]["mean"] - v["mean"]) <= 0.005, (layer, name, got[layer][name], v)
