"""Per-concept fine-tuning (customjax.finetune; Textual Inversion, Custom Diffusion, DreamBooth,
Contrastive Inversion of seed 001): what each method trains, Eqs. 2 and 3 against hand computations,
concepts stacked = concepts one at a time (1 and 2 devices), the CLI through both of Contrastive
Inversion's stages with a resume, and every method's export loaded back for text-to-image."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import finetune_probe
from conftest import cpu_env, max_abs
from configs import contrastive_inversion, custom_diffusion, dreambooth, textual_inversion
from customjax.methods.build import build
from customjax.methods.registry import get as get_method

ROOT = Path(__file__).resolve().parents[1]


def write_concepts(root: Path, n: int, images: int = 3, size: int = 40) -> list[Path]:
    dirs = []
    for c in range(n):
        d = root / f"concept{c}"
        d.mkdir(parents=True)
        rng = np.random.default_rng(c)
        for i in range(images):
            Image.fromarray((rng.random((size, size + 8, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
        (d / "concept.json").write_text(json.dumps({"class": "dog"}))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    return write_concepts(tmp_path_factory.mktemp("concepts"), 4)


def trained_paths(method: str, parts=None) -> dict:
    m = get_method(method)
    m = m if parts is None else m.stage(parts)
    return {"rows": m.is_trainable(("tokens", "rows")), "k": m.is_trainable(("up_blocks_1", "attn2", "to_k", "kernel")),
            "q": m.is_trainable(("up_blocks_1", "attn2", "to_q", "kernel")),
            "self_k": m.is_trainable(("up_blocks_1", "attn1", "to_k", "kernel")),
            "aux": m.is_trainable(("up_blocks_1", "attn2", "to_k_aux", "kernel")),
            "conv": m.is_trainable(("conv_in", "kernel")), "clip": m.is_trainable(("clip", "text", "x"))}


def test_what_each_method_trains():
    no = dict(rows=False, k=False, q=False, self_k=False, aux=False, conv=False, clip=False)
    assert trained_paths("textual_inversion") == dict(no, rows=True)
    assert trained_paths("custom_diffusion") == dict(no, rows=True, k=True)            # cross-attention K, V only
    assert trained_paths("dreambooth") == dict(no, k=True, q=True, self_k=True, conv=True, aux=False)
    assert trained_paths("contrastive_inversion", ("tokens",)) == dict(no, rows=True)  # stage 1
    assert trained_paths("contrastive_inversion", ("kv", "aux_kv")) == dict(no, k=True, aux=True)  # stage 2 (Eq. 3)
    c = contrastive_inversion.get_config("sd15")
    assert [(s, c.stages[s].parts, c.stages[s].lr, c.stages[s].steps) for s in c.stage_order.split(",")] == \
        [("inversion", "tokens", 5e-4, 2000), ("finetune", "kv,aux_kv", 5e-6, 150)]      # Appendix A
    assert (c.train.batch, c.optim.weight_decay, c.sample.steps, c.sample.guidance) == (4, 0.01, 50, 5.0)
    assert contrastive_inversion.get_config("sd15,no_finetune").stage_order == "inversion"
    for mod, lr, steps in ((textual_inversion, 5e-4, 3000), (custom_diffusion, 1e-4, 300), (dreambooth, 5e-6, 150)):
        c = mod.get_config("sd15")
        assert (c.stages.train.lr, c.stages.train.steps) == (lr, steps)


def test_eq2_and_eq3_against_hand_computation(concepts):
    """Stage 1: the InfoNCE of Eq. 2 over the N images from the frozen CLIP, by hand; stage 2: K, V read
    the caption without A_i*, K^a, V^a read only A_i*'s states, scaled by lambda (Eq. 3)."""
    from customjax.finetune import prepare
    from customjax.methods.protocol import TrainInputs

    c = contrastive_inversion.get_config("tiny")
    p = prepare(c, concepts[:1])
    built, mods = p.built, p.built.image_side
    assert mods.vocab == built.pipe.tokenizers[0].vocab_size and c.concept.images == 3
    b = {k: (tuple(jnp.asarray(a[0]) for a in v) if isinstance(v, tuple) else jnp.asarray(v[0]))
         for k, v in p.batches(0).items() if k != "caption"}
    rows = jnp.asarray(p.rows[0]) + 0.3 * jax.random.normal(jax.random.key(1), p.rows[0].shape)
    frozen = {"text_encoders": built.params["text_encoders"], "clip": built.params["image"]["clip"]}
    x = TrainInputs(None, None, None, None, jnp.zeros(4, bool), jnp.zeros(4, bool))
    cond = built.method.stage(("tokens",)).condition(mods, frozen, {"tokens": {"rows": rows}}, b, x, None, None)
    # by hand: A_j* alone through the CLIP text tower, its projection; the images' CLIP embeddings
    clip, cp = mods.clip, built.params["image"]["clip"]
    tok = built.pipe.tokenizers[0]
    from customjax.methods.finetune import aux_names
    names = aux_names("<s*>", 3, 4)
    assert names[:2] == ["<s*_a0_0>", "<s*_a0_1>"] and len(set(names)) == 12
    aux = [" ".join(names[4 * i:4 * i + 4]) for i in range(3)]
    from customjax.tokenizer import tokenize
    ids = tokenize(tok, aux)
    table = jnp.concatenate([cp["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"], rows])
    cp2 = jax.tree_util.tree_map(lambda a: a, cp)
    cp2["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"] = table
    import dataclasses
    wide = clip.text.clone(config=dataclasses.replace(clip.text.config, vocab_size=table.shape[0]))
    t = np.asarray(wide.apply({"params": cp2["text"]}, jnp.asarray(ids)).text_embeds, np.float64)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    img = np.asarray(b["image_embeds"][0], np.float64)
    logits = t @ img.T / 0.07
    want = np.mean(-(np.diag(logits) - np.log(np.exp(logits).sum(-1))))
    assert abs(float(cond.losses["contrastive"]) - want) < 1e-4
    assert cond.text.shape == (4, 77, 32) and float(jnp.max(cond.scale)) == 0.0     # no K^a, V^a in stage 1
    # stage 2
    s2 = built.method.stage(("kv", "aux_kv")).condition(mods, {**frozen, "tokens": {"rows": rows}}, {}, b, x, None, None)
    from customjax.concepts.tokens import encode_with_rows
    want_ctx, _ = encode_with_rows(mods.text, built.params["text_encoders"][0], b["target_ids"], rows, mods.vocab)
    assert max_abs(s2.text, want_ctx) == 0.0
    ids0 = np.asarray(b["ids"][0])
    assert np.array_equal(np.asarray(s2.token_mask[:, 0]), ids0 >= mods.vocab + 1)  # A_i*'s vectors only
    assert int(np.asarray(s2.token_mask).sum()) == 4 * 4 and float(s2.scale[0]) == c.concept.aux_scale
    assert not np.any(np.asarray(b["target_ids"][0]) > mods.vocab)                 # no A_i* in K, V's caption


def test_stacked_concepts_equal_separate_runs(concepts, tmp_path):
    """4 concepts trained together (one vmapped, jitted step) give each concept's parameters of its own
    run, 3 steps of Custom Diffusion (words + K/V), on 1 device and on 2 simulated devices (the concept
    axis split 2 + 2); tolerance 2e-6 (float32 reductions of another batch shape)."""
    alone = finetune_probe.separate(concepts)
    together = finetune_probe.stacked(concepts)
    assert set(alone) == set(together) and any(k.startswith("tokens") for k in alone)
    assert len([k for k in alone if "attn2" in k]) >= 4
    for k in alone:
        assert together[k].shape == alone[k].shape and together[k].shape[0] == 4
        assert max_abs(together[k], alone[k]) < 2e-6, k
    rows = alone["tokens/rows"]
    assert max_abs(rows[0], rows[1]) > 1e-4          # the concepts did train apart
    out = tmp_path / "two.npz"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "finetune_probe.py"), str(out), *map(str, concepts)],
                       env=cpu_env(2), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = np.load(out)
    for k in alone:
        assert max_abs(two[k], alone[k]) < 2e-6, k


@pytest.mark.slow
def test_two_processes_equal_one(concepts, tmp_path):
    """``finetune`` in 2 jax.distributed processes x 1 device (the concept axis across processes; previews
    and curve exports gather it) exports what 1 process does, to 1e-6 (about 40 s)."""
    import os
    import socket

    from customjax.weights.safetensors_io import load_file

    finetune_probe.cli_run(tmp_path / "one", concepts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cpu_env(1)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)     # as tests/test_train.py's processes
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "finetune_probe.py"), "--process", str(i), str(port),
                               str(tmp_path / "two"), *map(str, concepts)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert not any(p.returncode for p in procs), "\n".join(e[-2000:] for _, e in outs)
    assert json.loads(outs[0][0].strip().splitlines()[-1])["status"] == "finished"
    for sub in ("export", os.path.join("curve", "2")):
        for k in concepts:
            for f in ("learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors"):
                a, b = (load_file(tmp_path / w / sub / k.name / f) for w in ("one", "two"))
                assert set(a) == set(b) and all(max_abs(a[n], b[n]) < 1e-6 for n in a if a[n].size), (sub, k.name, f)
    assert sorted(p.name for p in (tmp_path / "two" / "previews").glob("*.png")) == ["train_000002.png", "train_000004.png"]


def test_cli_contrastive_inversion_resumes_exports_and_samples(tmp_path):
    """``python -m customjax.finetune`` through both stages of Contrastive Inversion: stopped inside stage 1,
    resumed to the end; metrics name the InfoNCE term; the export (word file, K/V without K^a, V^a) samples
    with ``python -m customjax.txt2img --concept``."""
    from customjax.zoo import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "base")
    write_concepts(tmp_path / "concepts", 2, images=2)
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "customjax.finetune", "--config", "configs/contrastive_inversion.py:tiny",
           f"--config.model.path={base}", "--config.train.preview_every=4",
           "--concepts", str(tmp_path / "concepts"), "--workdir", str(work), "--config.train.save_every=2",
           "--config.finetune.curve=(1,)"]
    r = subprocess.run(cmd + ["--stop_after=2"], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "stopped"
    from customjax.api import load_config       # a config that trains differently is refused (the CLI: exit 2)
    from customjax.finetune import check_resume
    bad = load_config(str(ROOT / "configs" / "contrastive_inversion.py") + ":tiny")
    bad.model.path, bad.train.preview_every, bad.train.save_every = str(base), 4, 2
    bad.concept.temperature = 0.5
    with pytest.raises(ValueError, match="concept.temperature: checkpoint 0.07 -> this run 0.5"):
        check_resume(bad, sorted((tmp_path / "concepts").iterdir()), work)
    r = subprocess.run(cmd, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "inversion: resumed from step 2 of 4" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "finished" and len(out["exports"]) == 2
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in lines] == [("inversion", s) for s in (1, 2, 3, 4)] + [("finetune", 1), ("finetune", 2)]
    assert all(x["loss/contrastive"] > 0 for x in lines[:4]) and "loss/contrastive" not in lines[-1]
    assert set(lines[0]["concepts"]) == {"concept0", "concept1"}
    export = work / "export" / "concept0"
    meta = json.loads((export / "concept.json").read_text())
    assert meta["method"] == "contrastive_inversion" and meta["phrase"] == "<s*>"
    assert (work / "curve" / "1" / "concept1" / "concept.json").is_file()
    sheets = sorted(p.name for p in (work / "previews").glob("*.png"))     # each stage's end (and step 4)
    assert sheets == ["finetune_000002.png", "inversion_000004.png"]
    assert np.asarray(Image.open(work / "previews" / sheets[0])).shape[:2] == (70, 70)   # 2 concepts x (view, 1 prompt)
    from customjax.weights.safetensors_io import load_file
    assert list(load_file(export / "learned_embeds.safetensors")) == ["<s*>"]         # A_i* dropped
    kv = load_file(export / "pytorch_custom_diffusion_weights.safetensors")
    assert kv and not any("aux" in k for k in kv)                                       # K^a, V^a dropped
    r = subprocess.run([sys.executable, "-m", "customjax.txt2img", "--model", str(base), "--concept", str(export),
                        "--prompt", "a photo of <s*>", "--steps", "2", "--batch", "1", "--out", str(tmp_path / "img")],
                       cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "img" / "record.json").read_text())
    assert rec["concepts"] == [str(export)] and len(rec["images"]) == 1


def test_exports_load_back(concepts, tmp_path):
    """Textual Inversion, Custom Diffusion and DreamBooth on a tiny diffusers folder, 2 steps each: the
    exports hold exactly the trained words and weights, and load back for text-to-image (DreamBooth: a
    whole pipeline folder with the word in its tokenizer)."""
    from flax import traverse_util

    from customjax.concepts.export import concept_params, concept_pipe
    from customjax.concepts.tokens import init_rows
    from customjax.finetune import finetune
    from customjax.pipeline import load_stable_diffusion
    from customjax.sampling.t2i import txt2img
    from customjax.zoo import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "base")
    pipe, params = load_stable_diffusion(base)
    wide = concept_pipe(pipe, "<s*>")
    for mod, arg in ((textual_inversion, "tiny"), (custom_diffusion, "tiny"), (dreambooth, "tiny,prior")):
        c = mod.get_config(arg)
        c.model.path = str(base)
        c.train.preview_every = 0
        work = tmp_path / c.method
        out = finetune(c, concepts[:1], str(work))
        assert out["status"] == "finished"
        folder = Path(out["exports"][0])
        p2, meta = concept_params(wide, params, folder)
        row = np.asarray(p2["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"][-1])
        base_row = np.asarray(params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"])
        changed = [k for k, v in traverse_util.flatten_dict(p2["unet"]).items()
                   if max_abs(v, traverse_util.flatten_dict(params["unet"])[k]) > 0]
        if c.method == "dreambooth":
            assert meta["model"] == "model" and (folder / "model" / "model_index.json").is_file()
            assert len(list((work / "class_images" / "dog").glob("*.png"))) == 4        # prior preservation
            assert max_abs(row, init_rows(pipe.tokenizers[0], base_row, ["sks"])[0]) < 1e-6    # frozen rare word
            assert any("attn1" in k for k in changed) and any("conv_in" in k for k in changed)
        elif c.method == "custom_diffusion":
            assert changed and all("attn2" in k and k[-2] in ("to_k", "to_v") for k in changed)
        else:
            assert not changed
        if c.method != "dreambooth":
            assert max_abs(row, init_rows(pipe.tokenizers[0], base_row, ["dog"])[0]) > 1e-6   # the word trained
        img = txt2img(wide, p2, [f"a photo of {meta['phrase']}"], jax.random.key(0), steps=2, height=32, width=32)
        assert img.shape == (1, 32, 32, 3) and np.all(np.isfinite(img))
        if c.method == "textual_inversion":      # the Python API: the same image from the export folder
            from customjax import api
            same = api.text_to_image(base, [f"a photo of {meta['phrase']}"], concepts=[folder], steps=2, height=32,
                                     width=32, seeds=[0])
            from customjax.sampling.common import seed_latents
            f = wide.vae_scale
            lat = seed_latents([0], (32 // f, 32 // f, wide.unet.config.in_channels))
            ref = txt2img(wide, p2, [f"a photo of {meta['phrase']}"], None, steps=2, height=32, width=32, latents=lat)
            assert max_abs(same, ref) < 1e-6


def test_prior_preservation_batches(concepts):
    """DreamBooth's prior preservation: B class images (made by the base with "a photo of a dog") follow
    each concept's B examples, with the class prompt."""
    from customjax.concepts.data import ConceptBatches, read_concept
    from customjax.tokenizer import tokenize

    c = dreambooth.get_config("tiny,prior")
    c.concept.hflip = False
    tok = build(c).pipe.tokenizers[0]
    k = read_concept(concepts[0], 32)
    post = (np.zeros((1, 3, 1, 4, 4, 4)), np.zeros((1, 3, 1, 4, 4, 4)))
    prior = (np.ones((1, 4, 4, 4, 4)), np.full((1, 4, 4, 4, 4), 2.0), ["a photo of a dog"])
    b = ConceptBatches([k], tok, c, post, prior=prior)(0)
    assert b["latent_mean"].shape == (1, 8, 4, 4, 4)
    assert np.all(b["latent_mean"][0, :4] == 0) and np.all(b["latent_mean"][0, 4:] == 1)
    assert np.all(b["latent_logvar"][0, 4:] == 2)
    assert np.array_equal(b["ids"][0][0, 4], tokenize(tok, ["a photo of a dog"])[0])
    assert all("<s*> dog" in cap for cap in b["caption"])


def test_bad_concepts_are_named(tmp_path):
    from customjax.concepts.data import concept_phrase, read_concept
    from customjax.concepts.tokens import add_placeholders

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        read_concept(empty, 32)
    bad = write_concepts(tmp_path / "bad", 1)[0]
    (bad / "9.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="9.png"):
        read_concept(bad, 32)
    masked = write_concepts(tmp_path / "masked", 1)[0]
    (masked / "masks").mkdir()
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(masked / "masks" / "0.png")
    with pytest.raises(FileNotFoundError, match="none for 1.png"):
        read_concept(masked, 32)
    import shutil
    shutil.rmtree(masked / "masks")
    (masked / "concept.json").write_text(json.dumps({"clas": "dog"}))
    with pytest.raises(ValueError, match="unknown keys"):
        read_concept(masked, 32)
    with pytest.raises(ValueError, match="class word"):
        concept_phrase("{token} {class}", "<s*>", "")
    c = textual_inversion.get_config("tiny")
    tok = build(c).pipe.tokenizers[0]
    with pytest.raises(ValueError, match="already a word"):
        add_placeholders(tok, ["a"])          # a word of the (character-level) tiny vocabulary
    sdxl = textual_inversion.get_config("tiny")
    sdxl.model.random = "sdxl"
    with pytest.raises(ValueError, match="SDXL"):
        build(sdxl)
