"""benchmarks/shapeworld_concepts.py (Contrastive Inversion's Table 1 on ShapeWorld): its evaluation of an
exported concept, on a Textual Inversion run of 2 steps on one held-out subject."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("shapeworld_concepts", ROOT / "benchmarks" / "shapeworld_concepts.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# slow: the concepts benchmark script end to end; CI samples and scores learnt words on ShapeWorld through
# tests/test_evaluate.py (the --fast run's concept rows)
@pytest.mark.slow
def test_evaluation_samples_the_learnt_word_and_scores_every_image(tmp_path):
    from customjax.api import load_config
    from customjax.concepts.files import load_token_file
    from customjax.finetune import finetune
    from customjax.tokenizer import tokenize

    b = _bench()
    folders, cases_by, subjects = b.make_concepts(tmp_path, 1)
    (name, folder), = folders.items()
    category = subjects[0].category
    assert len(cases_by[name]) == 2 and all(c.words == (category,) for c in cases_by[name])
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:02d}.png" for i in range(4)]
    for c in cases_by[name]:      # the phrase takes the category word's place, the rest of the prompt is kept
        assert b.concept_prompt(c, "<s*> " + category) == c.prompt.replace(category, "<s*> " + category)

    plan = b.plan(b.BY_NAME["ti"], 2 / 3000, 2)
    assert plan["steps"] == {"train": 2} and plan["curve"] == [1, 2]
    assert b.train_command(b.BY_NAME["ti"], plan, tmp_path, tmp_path)[-2:] == [
        "--config.stages.train.steps=2", "--config.finetune.curve=(1,)"]
    config = load_config(ROOT / "configs" / "textual_inversion.py")
    config.stages.train.steps = 2
    config.train.preview_every = 0
    config.train.preview_count = 0         # (empty preview_prompts would break ConceptPreview)
    config.finetune.curve = (1,)
    run = tmp_path / "ti"
    assert finetune(config, [folder], str(run))["status"] == "finished"
    assert (b.export_folder(run, plan, 2, name) / "concept.json").is_file()
    export = b.export_folder(run, plan, 1, name)
    assert export == run / "curve" / "1" / name

    ev = b.Evaluator(seeds=(0,), steps=2, batch=2)
    assert ev.scorer is not None
    seen, real = [], ev.sample_fn

    def spy(pipe, params, prompts, key, **kw):
        seen.append((list(prompts), params, kw))
        return real(pipe, params, prompts, key, **kw)

    ev.sample_fn = spy
    case = cases_by[name][0]
    cache = tmp_path / "eval.npz"
    rows, images = b.evaluate_concept(ev, export, [case], folder, cache)

    assert len(seen) == 1 and ev.calls == 1
    prompts, params, kw = seen[0]
    assert len(prompts) == 2 and kw["steps"] == 2 and kw["guidance"] == 5.0 and kw["latents"].shape[0] == 2
    p = prompts[0]
    assert p == rows[0]["prompt"] == b.concept_prompt(case, "<s*>") and "<s*>" in p and category not in p
    assert ev.vocab in tokenize(ev.pipe.tokenizers[0], [p])[0]              # the learnt word is one token ...
    word = load_token_file(export / "learned_embeds.safetensors")["<s*>"]
    table = params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_allclose(np.asarray(table[ev.vocab]), word[0], rtol=1e-6)   # ... reading its export's row

    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    (r,) = rows
    assert r["plain_prompt"] == case.prompt and r["concept"] == name and r["phrase"] == "<s*>" and r["seed"] == 0
    for k in ("similarity", "controllability", "clip_t", "clip_i"):
        assert np.isfinite(r[k]), k
    assert isinstance(r["position_correct"], bool) and 0 <= r["similarity"] <= 1
    # CLIP-T against the plain prompt (the class word), CLIP-I the mean over the concept's 4 views
    size = ev.scorer.image_size
    img = ev.scorer.embed_images(np.asarray(Image.fromarray(images[0]).resize((size, size), Image.BICUBIC))[None])
    np.testing.assert_allclose(r["clip_t"], float(img[0] @ ev.scorer.embed_text([case.prompt])[0]), atol=1e-5)
    np.testing.assert_allclose(r["clip_i"], float(np.mean(ev.view_embeddings(folder) @ img[0])), atol=1e-5)
    assert ev.view_embeddings(folder).shape[0] == 4
    s = b.summary(rows)
    assert s["similarity"]["n"] == 1 and s["clip_t"]["mean"] == r["clip_t"]

    again, images2 = b.evaluate_concept(ev, export, [case], folder, cache)   # cached: no sampling
    assert ev.calls == 1 and np.array_equal(images, images2) and again[0]["similarity"] == r["similarity"]
    base_rows, _ = b.evaluate_concept(ev, None, [case], folder)               # pretrained: the class word
    assert seen[-1][0][0] == case.prompt and base_rows[0]["phrase"] is None
    assert b.best_step({"1": s, "2": b.summary(base_rows)}) in (1, 2)
