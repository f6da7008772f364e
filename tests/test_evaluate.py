"""customjax.evaluate: the DreamBench protocol on tiny random encoders and a subjects folder written here
(each score against a hand computation with transformers' processors and torch models), the resumable
sample store, the method list, bad input; the ShapeWorld protocol's ``--fast`` command end to end."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from customjax.evaluation import dreambench as db
from customjax.evaluation.methods import Job, Unsupported, read_methods
from customjax.evaluation.run import run_method, stop_on_sigterm
from customjax.evaluation.store import SampleStore

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = """Classes

subject_name,class
toy_a,toy
dog1,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]
"""


def write_subjects(root: Path) -> Path:
    """Two subjects in DreamBench's layout: toy_a (3 images of other sizes, with masks), dog1 (2 images)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for name, sizes in (("toy_a", [(40, 48), (48, 40), (44, 44)]), ("dog1", [(36, 36), (40, 52)])):
        d = root / name
        d.mkdir()
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.jpg", quality=95)
            if name == "toy_a":
                (d / "masks").mkdir(exist_ok=True)
                m = np.zeros((h, w), np.uint8)
                m[5:h - 9, 7:w - 4] = 255
                Image.fromarray(m).save(d / "masks" / f"{i:02d}.png")
    return root


def _randomise(model, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny SD base, tiny random CLIP (CLIPImageProcessor: shortest edge 32, crop 32) and DINO ViT
    (ViTImageProcessor: 32 x 32, bilinear), the subjects, and the evaluation of two methods: the class word
    and a one-word concept per subject (random rows), with sample masks for some of the class row's images."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    from customjax.concepts.files import save_token_file
    from customjax.evaluate import evaluate, options
    from customjax.tokenizer import load_tokenizer
    from customjax.zoo import write_tiny_pipeline

    root = tmp_path_factory.mktemp("eval")
    base = write_tiny_pipeline(root / "base")
    tok = load_tokenizer(base / "tokenizer")
    torch.manual_seed(0)
    clip = _randomise(tr.CLIPModel(tr.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)))
    clip.save_pretrained(root / "clip")
    tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    dino = _randomise(tr.ViTModel(tr.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8),
                                  add_pooling_layer=False), seed=1)
    dino.save_pretrained(root / "dino")
    tr.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    subjects = write_subjects(root / "dataset")
    rng = np.random.default_rng(1)
    for name, cls in (("toy_a", "toy"), ("dog1", "dog")):
        e = root / "ti" / name
        e.mkdir(parents=True)
        save_token_file(e / "learned_embeds.safetensors", {"<s*>": rng.standard_normal((1, 32)).astype(np.float32)})
        (e / "concept.json").write_text(json.dumps({"method": "textual_inversion", "token": "<s*>", "phrase": "<s*>",
                                                    "class": cls, "token_file": "learned_embeds.safetensors"}))
    methods = root / "methods.json"
    methods.write_text(json.dumps([
        {"name": "class", "label": "class word", "kind": "text", "phrase": "class"},
        {"name": "ti", "label": "learnt word", "kind": "concepts", "export": str(root / "ti"),
         "train": {"seconds": 10.0, "concepts": 2}}]))
    masks = root / "sample_masks" / "class"
    masks.mkdir(parents=True)
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 10:30] = 255
    for key in ("toy_a.e00.0", "toy_a.r.1", "dog1.e01.1"):
        Image.fromarray(m).save(masks / f"{key}.png")
    report = evaluate(options(methods=str(methods), out=str(root / "out"), protocol="dreambench", subjects=str(subjects),
                              base=str(base), steps=2, guidance=3.0, batch=4, progress=False, clip=str(root / "clip"),
                              dino=str(root / "dino"), clip_tokenizer=str(base / "tokenizer"), images_per_prompt=2,
                              live_classes=["dog"], sample_masks=str(root / "sample_masks")), say=lambda s: None)
    return dict(root=root, report=report, clip=clip, dino=dino, tok=tok, subjects=subjects, methods=methods, base=base)


def _hand_segment(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Segmentation written out again: white outside, bounding box, centred on a white square."""
    ys, xs = np.where(mask)
    crop = np.where(mask[..., None], image, 255)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    side = max(crop.shape[:2])
    out = np.full((side, side, 3), 255, np.uint8)
    y0, x0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return out


def test_dreambench_scores_against_hand_computation(bench):
    """Every stored image of the class row: CLIP-T, CLIP-I, DINO-I and the segmented CI / DI, each recomputed
    from the PNG with transformers' own image processors and torch models (< 1e-4)."""
    import torch
    import transformers as tr

    root, rpt = bench["root"], bench["report"]
    clip_proc = tr.CLIPImageProcessor.from_pretrained(root / "clip")
    dino_proc = tr.ViTImageProcessor.from_pretrained(root / "dino")
    tok = bench["tok"]

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def features(out):            # transformers 5: an output whose pooler_output is projected; 4: the tensor
        return getattr(out, "pooler_output", out)

    def clip_img(imgs):
        with torch.no_grad():
            return unit(features(bench["clip"].get_image_features(**clip_proc(imgs, return_tensors="pt"))))

    def dino_img(imgs):
        with torch.no_grad():
            return unit(bench["dino"](**dino_proc(imgs, return_tensors="pt")).last_hidden_state[:, 0])

    def clip_txt(texts):
        ids = torch.tensor(np.asarray(tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]))
        with torch.no_grad():
            return unit(features(bench["clip"].get_text_features(input_ids=ids)))

    reals = {n: [np.asarray(Image.open(f).convert("RGB")) for f in sorted((bench["subjects"] / n).glob("*.jpg"))]
             for n in ("toy_a", "dog1")}
    masks = [np.asarray(Image.open(f)) >= 128 for f in sorted((bench["subjects"] / "toy_a" / "masks").glob("*.png"))]
    rows = [r for r in map(json.loads, (root / "out" / "rows.jsonl").read_text().splitlines()) if r["method"] == "class"]
    assert len(rows) == 2 * (2 + 1) * 2          # 2 subjects x (2 prompts + reconstruction) x 2 images
    worst, seg_checked = 0.0, 0
    for r in rows:
        img = np.asarray(Image.open(root / "out" / "samples" / "class" / f"{r['key']}.png").convert("RGB"))
        rec = json.loads((root / "out" / "samples" / "class" / f"{r['key']}.json").read_text())
        cls = "toy" if r["subject"] == "toy_a" else "dog"
        assert rec["plain"].split().count(cls) == 1 and "{" not in rec["plain"]
        ci = float(np.mean(clip_img(reals[r["subject"]]) @ clip_img([img])[0]))
        di = float(np.mean(dino_img(reals[r["subject"]]) @ dino_img([img])[0]))
        ct = float(clip_img([img])[0] @ clip_txt([rec["plain"]])[0])
        worst = max(worst, abs(ci - r["clip_i"]), abs(di - r["dino_i"]), abs(ct - r["clip_t"]))
        mf = root / "sample_masks" / "class" / f"{r['key']}.png"
        if r["subject"] == "toy_a" and mf.is_file():
            seg = _hand_segment(img, np.asarray(Image.open(mf)) >= 128)
            refs = [_hand_segment(x, m) for x, m in zip(reals["toy_a"], masks)]
            worst = max(worst, abs(float(np.mean(clip_img(refs) @ clip_img([seg])[0])) - r["seg_clip_i"]),
                        abs(float(np.mean(dino_img(refs) @ dino_img([seg])[0])) - r["seg_dino_i"]))
            seg_checked += 1
        else:
            assert "seg_clip_i" not in r and "seg_dino_i" not in r
    print(f"\n[dreambench] max |ours - hand| {worst:.2e} over {len(rows)} images ({seg_checked} segmented)")
    assert worst < 1e-4          # rows.jsonl rounds to 5 decimals
    assert seg_checked == 2                       # dog1 has no masks of its real images
    m = rpt["methods"]["class"]
    assert m["unet_evaluations"] == 2 * 2 and m["summary"]["edit"]["clip_t"]["groups"] == 2
    assert set(m["summary"]["reconstruction"]) >= {"clip_i", "dino_i", "seg_clip_i", "seg_dino_i"}
    assert rpt["methods"]["ti"]["train_seconds_per_concept"] == 5.0
    md = (root / "out" / "results.md").read_text()
    assert "E-CI" in md and "R-DI" in md and "learnt word" in md
    assert (root / "out" / "frontier.png").is_file() and (root / "out" / "samples.png").is_file()


def test_dreambench_prompts_and_jobs(bench):
    """The google/dreambooth prompt file: classes, object and live lists; live subjects take the live list;
    a concept's phrase and an adapter's class word fill the same template."""
    p = db.read_prompts(bench["subjects"] / "prompts_and_classes.txt")
    assert p.classes == {"toy_a": "toy", "dog1": "dog"}
    assert p.objects == ("a {0} {1} in the jungle", "a red {0} {1}") and p.live[0] == "a {0} {1} wearing a red hat"
    subs = db.read_subjects(bench["subjects"], p, live_classes=("dog",))
    jobs = db.make_jobs(subs, p, images_per_prompt=2)
    plain = {j.key: j.plain for j in jobs}
    assert plain["toy_a.e00.1"] == "a toy in the jungle" and plain["dog1.e00.0"] == "a dog wearing a red hat"
    assert plain["dog1.r.1"] == "a photo of a dog"
    j = next(j for j in jobs if j.key == "toy_a.e01.0")
    assert j.prompt(["<s*> toy"]) == "a red <s*> toy" and j.prompt(["toy"]) == "a red toy"
    assert subs["toy_a"].masks is not None and subs["dog1"].masks is None
    # the learnt-word images differ from the class word's (the concept was loaded)
    out = bench["root"] / "out" / "samples"
    a, b = (np.asarray(Image.open(out / m / "toy_a.e00.0.png")) for m in ("class", "ti"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    # a rerun finds every image stored: it samples nothing, rewrites no image, and scores the same
    from customjax.evaluate import evaluate, options
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    said = []
    rpt = evaluate(options(methods=str(bench["methods"]), out=str(bench["root"] / "out2"), samples=str(out),
                           protocol="dreambench", subjects=str(bench["subjects"]), base=str(bench["base"]), progress=False,
                           clip=str(bench["root"] / "clip"), clip_tokenizer=str(bench["base"] / "tokenizer"),
                           images_per_prompt=2, live_classes=["dog"]), say=said.append)
    assert not [m for m in said if "sampling" in m] and {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert rpt["methods"]["class"]["summary"]["edit"]["clip_t"] == bench["report"]["methods"]["class"]["summary"]["edit"]["clip_t"]


def test_dreambench_bad_input(tmp_path):
    root = write_subjects(tmp_path / "d")
    p = db.read_prompts(root / "prompts_and_classes.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("a {0} in the jungle\n")
    with pytest.raises(ValueError, match=r"bad.txt line 1.*\{0\} \{1\}"):
        db.read_prompts(bad)
    (root / "toy_a" / "02.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"toy_a/02.jpg: cannot read"):
        db.read_subjects(root, p)
    (root / "toy_a" / "02.jpg").unlink()
    (root / "toy_a" / "03.png").write_bytes((root / "toy_a" / "00.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no mask for \['03.png'\]"):
        db.read_subjects(root, p)
    (root / "toy_a" / "03.png").unlink()
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "toy_a" / "masks" / "00.png")
    with pytest.raises(ValueError, match=r"masks/00.png: mask of 10x10, its image is 40x48"):
        db.read_subjects(root, p)
    with pytest.raises(ValueError, match=r"subject\(s\) \['cat9'\] are not in the class list"):
        db.read_subjects(root, p, only=["cat9"])


def test_method_list_errors(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"name": "a", "label": "A", "kind": "adapter", "confg": "x.py"}]))
    with pytest.raises(ValueError, match=r"entry 0 \(a\): unknown field\(s\) \['confg'\]"):
        read_methods(f)
    f.write_text(json.dumps([{"name": "a", "label": "A", "kind": "concepts"}]))
    with pytest.raises(ValueError, match=r"kind 'concepts' needs 'export'"):
        read_methods(f)
    f.write_text(json.dumps([{"name": "a b", "label": "A", "kind": "text"}]))
    with pytest.raises(ValueError, match="file-safe"):
        read_methods(f)
    f.write_text(json.dumps([{"name": "a", "label": "A", "kind": "text"}]))
    with pytest.raises(ValueError, match=r"no method\(s\) \['b'\]"):
        read_methods(f, only=["b"])


class _Counting:
    """A fake sampler: grey images, counts the jobs it sampled, raises after ``stop_after`` batches."""

    batch = 2

    def __init__(self, stop_after=None, refuse_two=False):
        self.sampled, self.calls, self.stop_after, self.refuse_two = [], 0, stop_after, refuse_two

    def group(self, job):
        return len(job.subjects)

    def evals_per_image(self, job):
        return 7

    def sample(self, jobs):
        if self.refuse_two and len(jobs[0].subjects) == 2:
            raise Unsupported("two subjects: not here")
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt
        self.sampled += [j.key for j in jobs]
        return np.full((len(jobs), 8, 8, 3), 100, np.uint8)


def test_store_resumes_and_keeps_finished_images(tmp_path):
    jobs = [Job(f"j{i}", ("a",) if i < 5 else ("a", "b"), i, "a {0}" if i < 5 else "{0} {1}", "p",
                dict(kind="edit" if i < 5 else "two")) for i in range(7)]
    store = SampleStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_method(store, "m", _Counting(stop_after=2), jobs, progress=False)
    assert sorted(p.stem for p in (tmp_path / "m").glob("*.png")) == ["j0", "j1", "j2", "j3"]
    assert not list((tmp_path / "m").glob("*.tmp*"))
    s = _Counting(refuse_two=True)
    said = []
    out = run_method(store, "m", s, jobs, progress=False, say=said.append)
    assert s.sampled == ["j4"] and out["unsupported"] == {"two": "two subjects: not here"} and "two" in said[0]
    assert store.record("m", "j4")["unet_evaluations"] == 7 and store.record("m", "j4")["seed"] == 4
    assert [e["first"] for e in store.timings("m")] == [True, False, True]
    with pytest.raises(ValueError, match="file"):
        store.put("m", "a/b", np.zeros((2, 2, 3), np.uint8), {})


def test_sigterm_stops_between_images():
    with pytest.raises(SystemExit) as e:
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):      # the handler runs at the next bytecode boundary
                pass
    assert e.value.code == 143
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))


def test_adapter_one_and_two_subjects(tmp_path):
    """An adapter (the tiny RealCustom++ config, random) samples one-subject jobs with the subject's reference;
    two-subject jobs go through a second Customizer on the same model with ``two_overrides``; the dual-branch
    sampler's UNet evaluations are reported."""
    from customjax.evaluation.methods import MethodSpec, Subject, make_sampler

    rng = np.random.default_rng(0)
    subs = {n: Subject(n, n, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), ()) for n in ("toy", "cat")}
    spec = MethodSpec("pp", "pp", "adapter", config=str(ROOT / "configs/realcustompp.py:tiny"),
                      two_overrides={"guidance": {"references": "many2many", "gamma_scope": 0.3}})
    s = make_sampler(spec, subs, None, 2, 3.0, adapter_steps=2)
    jobs = [Job("a", ("toy", "cat"), 0, "a {0} and a {1}", "a toy and a cat"),
            Job("b", ("cat", "toy"), 1, "a {0} and a {1}", "a cat and a toy")]
    assert s.two().guidance.references == "many2many" and s.two().config.guidance.gamma_scope == 0.3
    assert s.one.config.guidance.gamma_scope != 0.3
    assert s.two().built is s.one.built and s.one.config.sample.steps == 2
    one = s.sample([Job("c", ("toy",), 0, "a {0} on a table", "a toy on a table"),
                    Job("d", ("cat",), 1, "a {0} on a table", "a cat on a table")])
    assert one.shape[0] == 2 and one.dtype == np.uint8 and s.evals_per_image(jobs[0]) > 2 * 2   # three branches guided
    assert np.abs(one[0].astype(int) - one[1].astype(int)).max() > 0
    # two subjects: each prompt gets both words and both references (the dual-branch sampler with two of them:
    # test_guidance's two-subject test, test_customcontrast's)
    cases = s.two().check([j.prompt(["toy", "cat"]) for j in jobs], [[subs["toy"].reference, subs["cat"].reference]] * 2,
                          [["toy", "cat"]] * 2)
    assert [c["words"] for c in cases] == [["toy", "cat"]] * 2 and all(len(c["images"]) == 2 for c in cases)
    with pytest.raises(KeyError, match="two_overrides"):
        make_sampler(MethodSpec("q", "q", "adapter", config=spec.config, two_overrides={"guidance": {"nope": 1}}),
                     subs, None, 2, 3.0).two()


def test_shapeworld_fast_end_to_end(tmp_path):
    """``python -m customjax.evaluate --fast``: the ShapeWorld protocol with the base's words, the rendered
    targets and learnt words alone and two in a prompt (adapters: test_adapter_one_and_two_subjects)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "customjax.evaluate", "--fast", "--noprogress", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    r = json.loads((tmp_path / "results.json").read_text())
    ms = r["methods"]
    assert set(ms) == {"named", "class", "rendered", "ti"}
    assert ms["rendered"]["summary"]["edit"]["similarity"]["mean"] > 0.8          # the exact scores see the target
    assert ms["class"]["unet_evaluations"] == 8                                   # 4 steps x CFG
    for name, m in ms.items():
        assert set(m["summary"]) == {"edit", "two", "views"}, name
        assert "margin" in m["summary"]["two"] and "clip_t" in m["summary"]["edit"]
    assert ms["named"]["summary"]["edit"]["share"]["mean"] == pytest.approx(1.0)
    md = (tmp_path / "results.md").read_text()
    assert "## The papers' headline claims" not in md        # no paper's methods in the plumbing list
    assert len(sorted((tmp_path / "samples").rglob("*.png"))) == 3 * 5     # a rerun's resume: test_store_resumes...


def test_claims_are_paired_over_the_same_images():
    """A claim compares the same prompts and seeds of two methods: a > b holds when the paired interval lies
    above 0; 'not lower' holds unless it lies below 0."""
    from customjax.shapeworld.benchmark.comparison import ShapeWorldProtocol

    def rows(sim, ctl, clip_t, extra=0):
        return [dict(key=f"k{i}", kind="edit", group=f"g{i % 4}", similarity=sim, controllability=ctl + 0.01 * (i % 2),
                     clip_t=clip_t) for i in range(8 + extra)]
    by = {"realcustompp": rows(0.2, 0.8, 0.7), "class": rows(0.0, 0.8, 0.75, extra=3)}     # extra keys: unpaired
    out = ShapeWorldProtocol.claims(None, by, {"realcustompp": {"label": "pp"}, "class": {"label": "c"}})
    got = {c["metric"]: (c["verdict"], round(c["difference"]["mean"], 3), c["difference"]["n"]) for c in out}
    assert got == {"similarity": ("holds", 0.2, 8), "not lower: controllability": ("holds (no loss shown)", 0.0, 8),
                   "not lower: clip_t": ("reversed", -0.05, 8)}
