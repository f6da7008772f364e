"""The Python API (customjax.api), in-process: the README's example as written on the shipped ShapeWorld
base (images, masks, record, the contact sheet), inputs as paths or arrays, errors that name the prompt
at fault, config specs with overrides, and train -> export -> sample on the tiny config."""

import io
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from customjax import api
from customjax.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]
REFS = ["examples/shapeworld/s000_ref0.png", "examples/shapeworld/s002_ref0.png"]   # the README's, relative
PROMPTS = ["a large triangle on the right, on a yellow background", "a small star in the center, on an orange background"]


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """The README's Python example run in this process as written, in a scratch folder beside links to
    configs/ and examples/: (its namespace, what it printed, the folder)."""
    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Customizer" in b)
    cwd = tmp_path_factory.mktemp("readme")
    for d in ("configs", "examples"):
        os.symlink(ROOT / d, cwd / d)
    here, ns, printed = os.getcwd(), {}, io.StringIO()
    os.chdir(cwd)
    try:
        with redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), ns)
    finally:
        os.chdir(here)
    return ns, printed.getvalue(), cwd


@pytest.fixture(scope="module")
def pipe(readme):
    return readme[0]["pipe"]


@pytest.fixture(scope="module")
def samples(readme):
    return readme[0]["out"]


def test_the_readme_example_runs_as_written(readme):
    ns, printed, cwd = readme
    assert printed.strip().startswith("(4, 64, 64, 3) (1, 8, 8)"), printed
    assert (cwd / "out/api/grid.png").is_file() and (cwd / "out/api/record.json").is_file()
    assert [c["prompt"] for c in ns["out"].cases] == [p for p in PROMPTS for _ in (0, 1)]


def test_call_returns_images_masks_and_record(samples):
    assert samples.images.shape == (4, 64, 64, 3) and samples.images.dtype == np.float32
    assert 0.0 <= samples.images.min() and samples.images.max() <= 1.0 and samples.images.std() > 0.01
    assert len(samples.masks) == 4 and all(m.shape == (1, 8, 8) for m in samples.masks)
    assert len(samples.mask_steps) == 4 and samples.mask_steps[0].shape[1:] == (1, 8, 8)
    recs = samples.record["images"]
    assert [(r["prompt"], r["seed"]) for r in recs] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert recs[0]["references"] == [REFS[0]] and recs[0]["words"] == ["triangle"]
    assert samples.record["config"]["sample"]["steps"] == 10         # the override reached the sampler
    assert not np.allclose(samples.images[0], samples.images[1])     # two seeds, two images


def test_arrays_and_pil_images_give_what_paths_give(pipe, samples):
    ref = np.asarray(Image.open(ROOT / REFS[0]).convert("RGB"))
    as_array = pipe(PROMPTS[0], references=ref, words="triangle", seeds=[0])
    as_float = pipe(PROMPTS[0], references=[ref.astype(np.float32) / 255.0], words=["triangle"], seeds=[0])
    as_pil = pipe(PROMPTS[0], references=Image.open(ROOT / REFS[0]), words="triangle", seeds=[0])
    for got in (as_array, as_float, as_pil):
        np.testing.assert_allclose(got.images[0], samples.images[0], atol=1e-6)
    assert as_array.record["images"][0]["references"] == ["<array 64x64>"]


def test_save_writes_a_sheet_a_person_can_read(samples, tmp_path):
    out = samples.save(tmp_path / "out")
    names = sorted(p.name for p in out.iterdir())
    assert "grid.png" in names and "record.json" in names
    assert {"0000_seed0.png", "0000_seed0_mask.png", "0000_seed0_steps.png", "0003_seed1.png"} <= set(names)
    sheet = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    # two rows (one per prompt), each: reference, then sample and masks per seed; tiles of 256 px
    assert sheet.shape[0] >= 2 * 256 and sheet.shape[1] >= 5 * 256
    ref = np.asarray(Image.open(ROOT / REFS[0]).convert("RGB"))
    big = np.repeat(np.repeat(ref, 4, axis=0), 4, axis=1)
    pad, line = 8, 16 + 6                                          # images.sheet's layout
    np.testing.assert_array_equal(sheet[pad + line:pad + line + 256, pad:pad + 256], big)
    sample = np.repeat(np.repeat(to_uint8(samples.images[0]), 4, axis=0), 4, axis=1)
    x = pad + 256 + pad
    np.testing.assert_array_equal(sheet[pad + line:pad + line + 256, x:x + 256], sample)
    assert (sheet[pad:pad + line] < 128).any()                     # the prompt is written above the row


def test_bad_input_names_the_prompt_at_fault(pipe):
    refs = [str(ROOT / r) for r in REFS]
    with pytest.raises(api.CaseError, match=r"prompt 1 .*'circle'"):
        pipe(PROMPTS, references=refs, words=["triangle", "circle"])
    with pytest.raises(api.CaseError, match=r"shape \(3, 64, 64\).*channels last"):
        pipe(PROMPTS[0], references=np.zeros((3, 64, 64), np.float32), words="triangle")
    with pytest.raises(api.CaseError, match="2 prompt.*1 references"):
        pipe(PROMPTS, references=refs[:1], words=["triangle", "star"])
    with pytest.raises(api.CaseError, match="does not exist"):
        pipe(PROMPTS[0], references="no/such.png", words="triangle")


def test_load_config_specs_and_overrides():
    bare = api.load_config(ROOT / "configs/realcustompp.py")
    assert bare.variant == "shapeworld" and bare.model.path.endswith("shapeworld_base")   # the embedded default
    c = api.load_config(str(ROOT / "configs/realcustompp.py") + ":tiny,table5_no2", train={"steps": 3}, seed=5)
    assert (c.variant, c.ablations, c.train.steps, c.seed) == ("tiny", "table5_no2", 3, 5)
    assert c.guidance.self_factors == ()
    with pytest.raises(KeyError, match="train.stesp"):
        api.load_config(str(ROOT / "configs/realcustompp.py") + ":tiny", train={"stesp": 3})
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        api.load_config("configs/nope.py:tiny")
    with pytest.raises(TypeError, match=r"overrides \['seed'\] apply to a config spec"):
        api.Customizer.from_config(c, seed=1)            # not silently dropped


def test_train_export_and_load_in_process(tmp_path):
    """api.train -> export -> Customizer.from_config(checkpoint=...): the customizer holds the trained
    adapter (sampling through the API: the README example above)."""
    from customjax.methods.build import trainable_tree
    from customjax.weights.safetensors_io import load_file

    config = api.load_config(str(ROOT / "configs/realcustompp.py") + ":tiny", train=dict(
        steps=2, batch=2, preview_every=0, save_every=0, log_every=1, async_save=False), data={"examples": 16})
    result = api.train(config, tmp_path / "run")
    assert result["status"] == "finished" and result["step"] == 2 and np.isfinite(result["loss"])
    assert (tmp_path / "run/export/adapter.safetensors").is_file()
    out = api.export(tmp_path / "run", tmp_path / "a.safetensors")
    assert out.is_file() and out.stat().st_size == (tmp_path / "run/export/adapter.safetensors").stat().st_size
    pipe = api.Customizer.from_config(config, checkpoint=tmp_path / "run/export")
    assert pipe.checkpoint == str(tmp_path / "run/export")
    held = pipe.built.method.state_dict(jax.device_get(trainable_tree(pipe.built)))
    saved = load_file(tmp_path / "run/export/adapter.safetensors")
    assert sorted(held) == sorted(saved)
    for k in saved:
        np.testing.assert_array_equal(np.asarray(held[k]), saved[k], err_msg=k)
    fresh = api.Customizer.from_config(config)           # a random adapter differs from the trained one
    other = fresh.built.method.state_dict(jax.device_get(trainable_tree(fresh.built)))
    assert any(not np.array_equal(other[k], saved[k]) for k in saved)
