"""The sample CLI and the method plumbing behind it: cases are checked before anything compiles,
the CLI runs end to end on tiny random models, adapters save and load (ours and the public
RealCustom++ key names), and RealCustom's per-step scoring runs inside the sampler."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env
from flax import traverse_util

from customjax.methods import realcustom
from customjax.methods.build import build, guidance_config, load_adapter, save_adapter, trainable_tree
from customjax.sampling.common import cached_sampler
from customjax.sampling.dual_branch import dual_branch_sample
from customjax.tokenizer import tokenize, word_token_mask

ROOT = Path(__file__).resolve().parents[1]


def config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def run_cli(*args, timeout=600, devices=1):
    return subprocess.run([sys.executable, "-m", "customjax.sample", *args], cwd=ROOT, env=cpu_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def test_cli_end_to_end_tiny(tmp_path):
    from PIL import Image
    halves = np.zeros((2, 40, 40), np.uint8)
    halves[0, :, :20] = halves[1, :, 20:] = 255                 # a layout: the toy left, the box right
    for k, m in enumerate(halves):
        Image.fromarray(m).save(tmp_path / f"m{k}.png")
    toy = str(ROOT / "examples/toy.png")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prompt": "a toy and a box", "words": ["toy", "box"], "references": [toy, toy],
                                 "masks": [str(tmp_path / "m0.png"), str(tmp_path / "m1.png")], "seeds": [3]}) + "\n"
                     + json.dumps({"prompt": "a toy on the beach", "words": ["toy"],
                                   "references": [toy], "seeds": [0, 1]}) + "\n")
    out = tmp_path / "out"
    r = run_cli("--config", "configs/realcustompp.py:tiny", "--prompts", str(cases),
                "--config.sample.steps=3", "--config.guidance.t_stop=2", "--config.sample.batch=2",
                "--out", str(out), devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["devices"] == 2 and rec["batch"] == 2     # the batch is split over both devices
    assert [i["seed"] for i in rec["images"]] == [0, 1, 3] and rec["config"]["guidance"]["t_stop"] == 2
    assert rec["unet_evaluations_per_image"] == 3 * 2 + 2 * 1
    # the layout case: sampled after the attention-mask cases, its masks fixed (no guidance branch)
    assert [(i["layout"], i["unet_evaluations"]) for i in rec["images"]] == [(False, 8), (False, 8), (True, 6)]
    for item in rec["images"]:
        stem = item["file"][:-4]
        for suffix in ("", "_mask", "_steps"):
            assert (out / f"{stem}{suffix}.png").is_file()
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("case,needle", [
    ({"prompt": "a cat on a mat", "words": ["toy"], "references": ["examples/toy.png"]}, "'toy'"),
    ({"prompt": "a toy on a mat", "words": ["toy"], "references": ["examples/nope.png"]}, "does not exist"),
    ({"prompt": "a toy on a mat", "words": ["toy"], "references": ["BAD"]}, "cannot be read"),
    ({"prompt": "a toy and a box", "words": ["toy", "box"], "references": ["examples/toy.png"]}, "2 word"),
    ({"prompt": "a toy", "references": ["examples/toy.png"]}, "missing 'words'"),
])
def test_bad_cases_are_named(tmp_path, case, needle):
    from customjax.base_model import first_tokenizer
    from customjax.sampling.cases import CaseError, check_cases
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    case = {k: ([str(bad)] if v == ["BAD"] else [str(ROOT / p) if p.startswith("examples") else p for p in v]
                if k == "references" else v) for k, v in case.items()}
    with pytest.raises(CaseError, match=needle) as e:
        check_cases([dict(case, _where="cases.jsonl:3")], first_tokenizer(config("realcustompp.py", "tiny")),
                    "many2many", [0])
    assert "cases.jsonl:3" in str(e.value)


def test_layout_masks_checked_and_resized(tmp_path):
    from PIL import Image

    from customjax.base_model import first_tokenizer
    from customjax.sampling.cases import CaseError, check_cases, resize_masks
    tok = first_tokenizer(config("realcustompp.py", "tiny"))
    m = np.zeros((8, 8), np.uint8)
    m[:, :4] = 255
    m[0, 4:] = 128
    Image.fromarray(m).save(tmp_path / "left.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    toy = str(ROOT / "examples/toy.png")
    case = dict(prompt="a toy and a box", words=["toy", "box"], references=[toy, toy], _where="c.jsonl:2")
    (c,) = check_cases([dict(case, masks=[str(tmp_path / "left.png")] * 2)], tok, "many2many", [0])
    assert len(c["masks"]) == 2 and c["masks"][0][0, 4] == pytest.approx(128 / 255) and c["masks"][0][1, 7] == 0.0
    assert check_cases([case], tok, "many2many", [0])[0]["masks"] is None
    r = resize_masks(c["masks"], (2, 4))                     # box average over 4 x 2 cells
    assert r.shape == (2, 2, 4) and r[0, 1].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert r[0, 0, 2] == pytest.approx(0.25 * 128 / 255, abs=1 / 255)
    for masks, needle in (([str(tmp_path / "left.png")], "1 mask\\(s\\) for 2 word"),
                          ([str(tmp_path / "left.png"), str(tmp_path / "none.png")], "none.png does not exist"),
                          ([str(tmp_path / "left.png"), str(tmp_path / "bad.png")], "bad.png cannot be read"),
                          ([str(tmp_path / "black.png")] * 2, "black.png is all black")):
        with pytest.raises(CaseError, match=needle) as e:
            check_cases([dict(case, masks=masks)], tok, "many2many", [0])
        assert "c.jsonl:2" in str(e.value)


def test_cli_reports_a_bad_case_before_loading_models(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prompt": "a cat", "words": ["toy"], "references": ["examples/toy.png"]}) + "\n")
    r = run_cli("--config", "configs/realcustompp.py:tiny", "--prompts", str(cases), "--out", str(tmp_path / "o"),
                timeout=120)
    assert r.returncode != 0
    assert "'toy'" in r.stderr and f"{cases}:1" in r.stderr, r.stderr[-2000:]
    assert "random tiny" not in r.stderr   # failed before the pipeline was built


def test_read_cases_names_the_file_and_line(tmp_path):
    from customjax.sampling.cases import CaseError, read_cases
    with pytest.raises(CaseError, match="no such file"):
        read_cases(tmp_path / "none.jsonl")
    f = tmp_path / "c.jsonl"
    for text, needle in (('{"prompt": "a"}\n\n{bad\n', "c.jsonl:3: not JSON"),
                         ('{"prompt": "a"}\n[1]\n', "c.jsonl:2: not a JSON object")):
        f.write_text(text)
        with pytest.raises(CaseError, match=needle):
            read_cases(f)
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [(c["prompt"], c["_where"]) for c in read_cases(f)] == [("a", f"{f}:1"), ("b", f"{f}:3")]


def test_batch_inputs_word_masks_and_padding(tiny_pp):
    from customjax.sampling.batch import batch_inputs, pad_to
    from customjax.tokenizer import word_token_positions
    pipe, gcfg = tiny_pp.pipe, guidance_config(config("realcustompp.py", "tiny"))
    prompts, words = pad_to(["a toy and a box", "a box on a toy"], 3), pad_to([["toy", "box"], ["box", "toy"]], 3)
    x = batch_inputs(pipe, gcfg, prompts, words, [0, 1, 1], (32, 32), init_mask=0.5)
    tok = pipe.tokenizers[0]
    assert x["wm"].shape == (3, 2, tok.model_max_length) and x["m0"].shape[:2] == (3, 2) and np.all(x["m0"] == 0.5)
    for b, (p, ws) in enumerate(zip(prompts, words)):
        for j, w in enumerate(ws):
            assert np.flatnonzero(x["wm"][b, j]).tolist() == word_token_positions(tok, p, w)
    np.testing.assert_array_equal(x["neg"][0], np.repeat(tokenize(tok, [""]), 3, axis=0))
    np.testing.assert_array_equal(x["lat"][1], x["lat"][2])           # the same seed, the same noise
    with pytest.raises(ValueError, match="same number of target words"):
        batch_inputs(pipe, gcfg, prompts[:2], [["toy"], ["box", "toy"]], [0, 1], (32, 32))


def test_resize_reference_rounds():
    from customjax.images import resize_reference
    img = np.full((6, 6, 3), 0.999, np.float32)
    assert np.all(resize_reference(img, 3) == 1.0)                     # 254.7 rounds to 255, not 254
    u8 = (np.arange(6 * 6 * 3) % 256).astype(np.uint8).reshape(6, 6, 3)
    np.testing.assert_array_equal(resize_reference(u8, 6), u8 / np.float32(255))
    np.testing.assert_array_equal(resize_reference(u8, 4), resize_reference(u8 / np.float32(255), 4))


@pytest.fixture(scope="module")
def tiny_pp():
    return build(config("realcustompp.py", "tiny"))


def test_adapter_save_load_roundtrip(tiny_pp, tmp_path):
    path = save_adapter(tiny_pp, tmp_path)
    perturbed = jax.tree_util.tree_map(lambda a: a + 1.0, tiny_pp.params)
    from dataclasses import replace
    loaded = load_adapter(replace(tiny_pp, params=perturbed), path.parent)
    want = traverse_util.flatten_dict(trainable_tree(tiny_pp))
    got = traverse_util.flatten_dict(trainable_tree(loaded))
    assert want.keys() == got.keys() and len(want) > 10
    assert all(np.array_equal(want[k], got[k]) for k in want)
    # the frozen UNet stays as it was given (perturbed), only the adapter is replaced
    assert np.array_equal(loaded.params["unet"]["conv_in"]["kernel"], perturbed["unet"]["conv_in"]["kernel"])


def test_public_checkpoint_through_load_adapter(tmp_path):
    from customjax.adapters.public_checkpoint import save_public
    cfg = config("realcustompp.py", "tiny")
    cfg.ccp.cross_layer, cfg.ccp.deep_proj = False, "linear"      # the released projector's structure
    built = build(cfg)
    tree = trainable_tree(built)
    save_public(tmp_path / "realcustompp.safetensors", tree["unet"], tree["ccp"])
    fresh = build(dict_replace(cfg, seed=1))
    loaded = load_adapter(fresh, tmp_path / "realcustompp.safetensors")
    a, b = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(trainable_tree(loaded))
    assert all(np.allclose(a[k], b[k]) for k in a)
    # the default (paper) projector has other parameters: a clear error, not a silent partial load
    with pytest.raises(ValueError, match="missing|unexpected"):
        load_adapter(build(config("realcustompp.py", "tiny")), tmp_path / "realcustompp.safetensors")


def dict_replace(cfg, **kw):
    c = cfg.copy_and_resolve_references()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_realcustom_scoring_inside_the_sampler():
    """RealCustom: the scoring module runs every step on z_t times the mask; two-scale CFG."""
    cfg = config("realcustom.py", "tiny")
    built = build(cfg)
    pipe, side = built.pipe, built.image_side
    prompts = ["a toy on the beach", "a red toy"]
    imgs = jax.random.uniform(jax.random.key(0), (2, 28, 28, 3))
    feats = realcustom.METHOD.reference_tokens(side, built.params["image"], imgs)[:, None]
    ids = tuple(jnp.asarray(tokenize(t, prompts)) for t in pipe.tokenizers)
    neg = tuple(jnp.asarray(tokenize(t, [""] * 2)) for t in pipe.tokenizers)
    wm = jnp.asarray(word_token_mask(pipe.tokenizers[0], prompts, "toy"))[:, None]
    gcfg = guidance_config(cfg)
    params = {k: built.params[k] for k in ("unet", "vae", "text_encoders")}
    params["adapter"] = built.params["image"]["scoring"]
    lat = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    smp = cached_sampler(pipe.schedule, "ddim", 2)
    run = lambda g: dual_branch_sample(pipe, built.unet, smp, gcfg, realcustom.ScoringVisual(side.scoring, g),
                                       params, ids, neg, wm, feats, lat, jnp.zeros((2, 1, 16, 16)))
    out = run(0.8)
    assert out["images"].shape == (2, 32, 32, 3) and np.isfinite(np.asarray(out["images"])).all()
    k = int(0.25 * 256)
    assert np.all((np.asarray(out["masks"]) > 0).reshape(2, -1).sum(-1) == k)
