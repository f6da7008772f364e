"""CLIF (seed 002) through customjax.finetune: the curated data (G-Aug, R-Aug, M-Aug; deterministic, written
as ArrayRecord), Eq. 5 against a hand computation, what each stage trains, and the exports: the LoRA read
by diffusers' load_lora_weights, the text encoder by transformers, both back into text-to-image and the
adapter sampler."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from conftest import max_abs
from configs import clif

COLORS = [(230, 40, 40), (40, 200, 60), (40, 70, 230)]


def write_concepts(root: Path, n: int = 3, images: int = 2, size: int = 40, masks: bool = True) -> list[Path]:
    """Concept c: a square of colour COLORS[c] on grey, its mask, and its top half as region "top half"."""
    dirs = []
    for c in range(n):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(images):
            img = np.full((size, size, 3), 128, np.uint8)
            y, x = 8 + 2 * i, 6 + 3 * i
            img[y:y + 20, x:x + 20] = COLORS[c]
            Image.fromarray(img).save(d / f"{i}.png")
            if masks:
                (d / "masks").mkdir(exist_ok=True)
                (d / "regions" / str(i)).mkdir(parents=True)
                m = np.zeros((size, size), np.uint8)
                m[y:y + 20, x:x + 20] = 255
                Image.fromarray(m).save(d / "masks" / f"{i}.png")
                m[y + 10:] = 0
                Image.fromarray(m).save(d / "regions" / str(i) / "top_half.png")
        (d / "concept.json").write_text(json.dumps({"class": "dog"}))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """CLIF:tiny on a tiny diffusers folder, 3 concepts, 2 steps per stage; G-Aug's contexts from a folder
    (captions.json for one, the file name for the other; the base-made contexts are DreamBooth's class-image
    code, tested in test_finetune)."""
    from customjax.finetune import finetune
    from customjax.zoo import write_tiny_pipeline

    root = tmp_path_factory.mktemp("clif")
    dirs = write_concepts(root / "concepts")
    base = write_tiny_pipeline(root / "base")
    ctx = root / "contexts"
    ctx.mkdir()
    Image.fromarray(np.full((48, 40, 3), 230, np.uint8)).save(ctx / "x.png")
    Image.fromarray(np.full((40, 40, 3), 25, np.uint8)).save(ctx / "a_cat.png")
    (ctx / "captions.json").write_text(json.dumps({"x.png": "a dog"}))
    c = clif.get_config("tiny")
    c.model.path, c.curation.context_dir = str(base), str(ctx)
    out = finetune(c, dirs, str(root / "work"))
    return dict(out=out, dirs=dirs, base=base, work=root / "work", config=c)


def test_curation(run, tmp_path):
    """Counts as configured, the ArrayRecord shard holds what curate makes (8-bit), the same seed gives the same
    set and another seed another; M-Aug puts the left concept left; presets drop their kind; no mask: an error."""
    from customjax.concepts import augment
    from customjax.concepts.data import read_concept

    items = augment.read_curated(run["work"] / "data" / "curated")
    n, cu = augment.counts(items), run["config"].curation
    views = 3 * 2
    assert n == {"concept": views, "global": views * cu.global_per_view, "region": views * cu.region_per_view,
                 "mix": 3 * 2 * cu.mix_per_pair}
    assert {x.caption[-5:] for x in items if x.kind == "global"} == {"a dog", "a cat"}    # the contexts' captions
    concepts = [read_concept(d, 32) for d in run["dirs"]]
    phrases = ["<c0> <c0_1>", "<c1> <c1_1>", "<c2> <c2_1>"]
    contexts = [("a dog", np.full((32, 32, 3), 0.9, np.float32)), ("a cat", np.full((32, 32, 3), 0.1, np.float32))]
    templates = tuple(run["config"].concept.templates)
    a = augment.curate(concepts, phrases, contexts, cu, templates, seed=3)
    b = augment.curate(concepts, phrases, contexts, cu, templates, seed=3)
    other = augment.curate(concepts, phrases, contexts, cu, templates, seed=4)
    assert [x.caption for x in a] == [x.caption for x in b] and all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, other))
    augment.write_curated(a, tmp_path / "rec")
    back = augment.read_curated(tmp_path / "rec")
    assert [(x.kind, x.caption, x.concepts) for x in back] == [(x.kind, x.caption, x.concepts) for x in a]
    assert max(max_abs(x.image, y.image) for x, y in zip(a, back)) <= 0.5 / 255 + 1e-6
    for x in a:
        assert sum(p in x.caption for p in phrases) == (2 if x.kind == "mix" else 1), x.caption
        if x.kind == "global":
            assert "a dog" in x.caption or "a cat" in x.caption
        if x.kind == "region":
            assert x.caption.startswith("a photo of the top half of")
        if x.kind == "mix":         # each concept's colour on its side
            i, j = (int(c[1:]) for c in x.concepts)
            assert x.caption.index(phrases[i]) < x.caption.index(phrases[j])
            img = (x.image * 255).round()
            for c, side in ((i, slice(0, 16)), (j, slice(16, 32))):
                hit = np.all(np.abs(img - np.array(COLORS[c])) < 30, -1)
                assert hit.sum() > 4 and hit[:, side].sum() == hit.sum(), (x.caption, c)
    c = clif.get_config("tiny,no_gaug,no_raug,no_maug")
    assert augment.counts(augment.curate(concepts, phrases, contexts, c.curation, templates, 0)) == dict(
        concept=views, **{"global": 0, "region": 0, "mix": 0})
    bare = [read_concept(d, 32) for d in write_concepts(tmp_path / "bare", 1, masks=False)]
    with pytest.raises(ValueError, match="concept c0: CLIF's augmentation needs each image's mask"):
        augment.curate(bare, phrases[:1], contexts, cu, templates, 0)


def test_eq5_against_hand_computation():
    """Eq. 5 (symmetric InfoNCE; equal captions are not negatives) against float64 numpy on embeddings made
    another way: the placeholders as real rows of a widened text encoder, no replacement."""
    import dataclasses

    from customjax.concepts.tokens import with_table
    from customjax.methods.build import build
    from customjax.methods.clif import clif_infonce
    from customjax.tokenizer import tokenize

    c = clif.get_config("tiny")
    with c.unlocked():
        c.concept.joint_names, c.concept.joint_classes = ("a", "b"), ("dog", "cat")
    built = build(c)
    m = built.image_side
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.standard_normal((4, m.text.config.hidden_size)).astype(np.float32) * 0.02)
    caps = ["a photo of <a> <a_1>", "<b> <b_1> with a dog", "a photo of <a> <a_1>", "the top of <b> <b_1>"]
    ids = jnp.asarray(tokenize(built.pipe.tokenizers[0], caps))
    P = m.clip.text.config.projection_dim
    img = rng.standard_normal((4, P))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    same = np.array([[x == y for y in caps] for x in caps])
    text, proj = built.params["image"]["text"], built.params["image"]["clip"]["text"]["text_projection"]
    got = float(clif_infonce(m, text, proj, rows, ids, jnp.asarray(img, jnp.float32), jnp.asarray(same)))
    wide = m.pooled.clone(config=dataclasses.replace(m.pooled.config, vocab_size=m.vocab + 4))
    table = with_table({"text_encoders": (text,)}, rows, m.vocab)["text_encoders"][0]
    t = np.asarray(wide.apply({"params": {**table, "text_projection": proj}}, ids).text_embeds, np.float64)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    logits = t @ img.T / c.concept.temperature
    logits[same & ~np.eye(4, dtype=bool)] = -np.inf

    def ce(l):
        return -np.mean([l[i, i] - np.log(np.exp(l[i][np.isfinite(l[i])]).sum()) for i in range(4)])
    want = 0.5 * (ce(logits) + ce(logits.T))
    assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (got, want)


def test_stages_train_what_they_should(run):
    """Stage text: Eq. 5 alone, the text encoder and words change; stage unet: the diffusion loss, only the
    shared LoRA trains (merged, only attention projections differ from the base); presets."""
    from customjax.concepts.export import load_concept
    from customjax.methods.registry import get
    from customjax.pipeline import load_stable_diffusion

    m = get("clif")
    assert [m.stage(p).is_trainable(("text", "text_model", "x")) for p in [("text", "tokens"), ("lora",)]] == [True, False]
    assert m.stage(("lora",)).is_trainable(("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q",
                                            "lora_up", "kernel"))
    assert not m.stage(("lora",)).is_trainable(("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q",
                                                "kernel"))
    assert m.stage(("tokens", "kv")).is_trainable(("up_blocks_1", "attn2", "to_v", "kernel"))
    with pytest.raises(ValueError, match="contrastive stage"):
        m.stage(("text", "lora"), "contrastive")
    assert m.stage(("tokens",), "contrastive").needs == ("image_embeds", "same") and m.stage(("tokens",)).needs == ()
    assert m.stage(("tokens",)).objective(None, None) is None
    assert clif.get_config("tiny,frozen_encoder").stages.text.parts == "tokens"
    assert [clif.get_config(f"tiny,{p}").stages.unet.parts for p in ("ti", "custom")] == ["tokens", "tokens,kv"]
    assert clif.get_config("tiny,no_contrastive").stage_order == "unet"

    recs = [json.loads(x) for x in (run["work"] / "metrics.jsonl").read_text().splitlines()]
    text, unet = [r for r in recs if r["stage"] == "text"], [r for r in recs if r["stage"] == "unet"]
    assert text and all("loss/contrastive" in r and "loss/diffusion" not in r for r in text)
    assert unet and all("loss/diffusion" in r and "loss/contrastive" not in r for r in unet)
    pipe, params = load_stable_diffusion(run["base"])
    wide, p2, meta = load_concept(pipe, params, run["out"]["exports"][0])
    assert sorted(meta["concepts"]) == ["c0", "c1", "c2"] and meta["lora_file"] and "kv_file" not in meta
    base_te = traverse_util.flatten_dict(params["text_encoders"][0])
    te = traverse_util.flatten_dict(p2["text_encoders"][0])
    emb = ("text_model", "embeddings", "token_embedding", "embedding")
    assert te[emb].shape[0] == base_te[emb].shape[0] + 6
    assert any(max_abs(te[k], v) > 1e-7 for k, v in base_te.items() if k != emb)        # the encoder trained
    changed = [k for k, v in traverse_util.flatten_dict(params["unet"]).items()
               if max_abs(v, traverse_util.flatten_dict(p2["unet"])[k]) > 0]
    assert changed and all(k[-2] in ("to_q", "to_k", "to_v", "to_out_0") for k in changed)


def test_exports_load_in_diffusers_and_back(run):
    """diffusers' load_lora_weights reads the LoRA file (every adapted projection, fused = our merged kernel);
    transformers reads the text encoder and tokenizer (hidden states = ours); the Python API and the adapter
    sampler (Customizer, customjax.sample) load the export."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from customjax import api
    from customjax.concepts.export import load_concept
    from customjax.pipeline import encode_text, load_stable_diffusion
    from customjax.tokenizer import tokenize
    from customjax.weights.convert import torch_key

    export = Path(run["out"]["exports"][0])
    pipe, params = load_stable_diffusion(run["base"])
    wide, p2, meta = load_concept(pipe, params, export)
    dp = StableDiffusionPipeline.from_pretrained(run["base"], safety_checker=None)
    dp.load_lora_weights(export)
    n_lora = sum(1 for k in dp.unet.state_dict() if ".lora_A." in k)
    dp.fuse_lora()
    sd = {k.replace(".base_layer", ""): v for k, v in dp.unet.state_dict().items()}
    ours = {torch_key("/".join(k)): np.asarray(v).T for k, v in traverse_util.flatten_dict(p2["unet"]).items()
            if k[-2] in ("to_q", "to_k", "to_v", "to_out_0") and k[-1] == "kernel"}
    assert n_lora == len(ours) > 0
    assert max(max_abs(sd[k].numpy(), v) for k, v in ours.items()) < 1e-6

    te = CLIPTextModel.from_pretrained(export / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(export / "tokenizer")
    prompt = f"a photo of {meta['concepts']['c1']['phrase']} and {meta['concepts']['c2']['phrase']}"
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    mine = np.asarray(tokenize(wide.tokenizers[0], [prompt]))
    assert np.array_equal(ids.numpy(), mine) and (mine >= len(tok) - 6).sum() == 4
    with torch.no_grad():
        h = te(ids).last_hidden_state.numpy()
    ctx, _ = encode_text(wide, p2["text_encoders"], (mine,))
    assert max_abs(np.asarray(ctx), h) < 1e-5

    img = api.text_to_image(run["base"], [prompt], concepts=[export], steps=2, height=32, width=32, seeds=[0])
    assert img.shape == (1, 32, 32, 3) and np.all(np.isfinite(img))

    from configs import ip_adapter
    c = ip_adapter.get_config("tiny")
    c.model.path = str(run["base"])
    cz = api.Customizer.from_config(c, None, concepts=[export])
    assert len(cz.built.pipe.tokenizers[0]) == len(tok)
    assert max_abs(cz.built.params["text_encoders"][0]["text_model"]["final_layer_norm"]["scale"],
                   p2["text_encoders"][0]["text_model"]["final_layer_norm"]["scale"]) == 0
    k = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    assert max_abs(traverse_util.flatten_dict(cz.built.params["unet"])[k], traverse_util.flatten_dict(p2["unet"])[k]) == 0


def test_bad_concepts_are_named(tmp_path):
    from customjax.finetune import prepare

    dirs = write_concepts(tmp_path / "a", 2)
    (dirs[1] / "concept.json").unlink()
    with pytest.raises(ValueError, match="concept c1: clif initialises its tokens from the super-category word"):
        prepare(clif.get_config("tiny"), dirs)
    (dirs[1] / "concept.json").write_text(json.dumps({"class": "dog"}))
    c = clif.get_config("tiny")
    c.concept.token = "<s*>"
    with pytest.raises(ValueError, match="names each concept's tokens after its folder"):
        prepare(c, dirs)
    with pytest.raises(ValueError, match="set --config.model.path to a diffusers folder"):
        prepare(clif.get_config("tiny"), dirs)
    d = write_concepts(tmp_path / "b", 1)[0]
    (d / "regions" / "7").mkdir()
    with pytest.raises(ValueError, match=r"sub-folders \['7'\] name no image"):
        prepare(clif.get_config("tiny"), [d])
    bare = write_concepts(tmp_path / "c", 1, masks=False)
    with pytest.raises(ValueError, match="concept c0: CLIF's augmentation needs each image's mask"):
        prepare(clif.get_config("tiny"), bare)       # before the model is built


def test_confusion_score_is_exact():
    """The two-concept benchmark's score on images the world renders: the prompt's pair gives a high margin
    and no swap; the pair with the appearances swapped gives the negative margin and a swap."""
    import importlib.util

    from customjax.shapeworld import world as sw

    spec = importlib.util.spec_from_file_location("shapeworld_clif", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "shapeworld_clif.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench          # its dataclasses look their module up
    spec.loader.exec_module(bench)
    a = sw.Subject("star", sw.Appearance("green", "black", "stripes", 0))
    b = sw.Subject("ring", sw.Appearance("orange", "white", "dots", 0))
    bg = bench.background(a, b, 0)
    rng = np.random.default_rng(0)

    def render(left, right):
        objs = (sw.place(rng, left, "left", "large", 64), sw.place(rng, right, "right", "large", 64))
        return sw.render(sw.Scene(sw.Background(bg), objs), 64)[0]
    good = bench.confusion(render(a, b), a, b, bg)
    assert good["margin"] > 0.5 and good["own"] > 0.7 and good["both_placed"] == 1 and good["swapped"] == 0
    swap = bench.confusion(render(sw.Subject("star", b.appearance), sw.Subject("ring", a.appearance)), a, b, bg)
    assert swap["margin"] < -0.5 and swap["swapped"] == 1 and swap["both_placed"] == 1
    boot = bench.bootstrap(np.array([1.0, 1.0, 0.0, 0.0]), np.array(["p", "p", "q", "q"]))
    assert boot["mean"] == 0.5 and boot["lo"] == 0.0 and boot["hi"] == 1.0
