"""CLIF (seed 002) on ShapeWorld: two learnt concepts in one image, confusion measured exactly.

    python benchmarks/shapeworld_clif.py                    # the configs' step counts (about 35 min on 2 CPU cores)
    python benchmarks/shapeworld_clif.py --skip_train       # evaluate the runs already in --work
    python benchmarks/shapeworld_clif.py --fast             # plumbing: 2 subjects, a few steps, 1 seed (own folders)

1. ``--subjects`` held-out two-colour subjects (never in the base's training data), each a concept folder
   of 4 views with exact masks, the two colours as captioned regions (R-Aug) and the category as the
   super-category word (``WORK/concepts``).
2. Every method learns all of them (``python -m customjax.finetune --concepts WORK/concepts``, a subprocess,
   log in ``WORK/<name>/train.log``; a rerun skips finished runs): CLIF (``configs/clif.py:shapeworld``),
   Table 2's ablations (without G-Aug, R-Aug, M-Aug), Table 1's CLIF + TI and CLIF + Custom Diffusion,
   Custom Diffusion's joint multi-concept training (the words and shared K, V on all concepts' images:
   ``clif.py:shapeworld,custom,no_contrastive,no_gaug,no_raug,no_maug``) and Textual Inversion
   (``textual_inversion.py:shapeworld``, each concept's word, two words in a prompt).
3. Every ordered pair of concepts (S1, S2), ``--seeds`` each: "a S1 on the left and a S2 on the right, on a
   <colour> background" (a colour both subjects show well on), DDIM ``--steps``, guidance ``--guidance``. Two
   reference rows: the base with each subject's appearance named in words ("a red and white striped star"),
   and with its class word alone.
4. Scores, exact (:func:`customjax.shapeworld.metrics.measure`, the prompt's two objects given their category
   and side only): ``own``: each object's appearance similarity to its own subject (0 when not found);
   ``other``: to the other subject; ``margin`` = own - other (confusion: the margin shrinks as the appearances
   mix or swap), averaged over the two objects; ``both_placed``: both objects found at their sides;
   ``swapped``: both found and each more similar to the other subject. Mean [95% bootstrap interval] over
   the ordered pairs (images of a pair resampled together), and paired differences against CLIF.

Writes ``--out``/results.json, results.md and samples.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "customjax" / "shapeworld" / "assets" / "shapeworld_base"
PROMPT = "a {} on the left and a {} on the right, on {} background"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    spec: str          # configs/<spec>, "" for a base-model row
    label: str


CLIF_ALL = "clif.py:shapeworld"
METHODS = (
    Method("clif", CLIF_ALL, "CLIF"),
    Method("no_gaug", CLIF_ALL + ",no_gaug", "CLIF w/o G-Aug"),
    Method("no_raug", CLIF_ALL + ",no_raug", "CLIF w/o R-Aug"),
    Method("no_maug", CLIF_ALL + ",no_maug", "CLIF w/o M-Aug"),
    Method("frozen_encoder", CLIF_ALL + ",frozen_encoder", "CLIF, Eq. 5 on the words only (encoder frozen)"),
    Method("clif_ti", CLIF_ALL + ",ti", "TI + CLIF"),
    Method("clif_cd", CLIF_ALL + ",custom", "Custom Diffusion + CLIF"),
    Method("cd", CLIF_ALL + ",custom,no_contrastive,no_gaug,no_raug,no_maug", "Custom Diffusion (joint)"),
    Method("ti", "textual_inversion.py:shapeworld", "Textual Inversion"),
    Method("named", "", "base, appearance named in words"),
    Method("class", "", "base, class word"),
)
BY_NAME = {m.name: m for m in METHODS}
KEYS = ("margin", "own", "other", "both_placed", "swapped", "category_accuracy")


# ---------------------------------------------------------------------------------------------------------
# Concepts.


def make_concepts(work: Path, n: int, views: int = 4):
    """(folders, subjects): ``n`` held-out two-colour subjects of the benchmark's single-subject cases."""
    from customjax.shapeworld import world as sw
    from customjax.shapeworld.benchmark.comparison import write_subjects
    from customjax.shapeworld.benchmark.concepts import concept_name

    folders = write_subjects(Path(work) / "concepts", n, views=views)
    by = {concept_name(s): s for s in sw.heldout_subjects()}
    return folders, [by[f.name] for f in folders]


def background(a, b, seed: int) -> str:
    """A background colour on which both subjects' colours are distinguishable (deterministic)."""
    from customjax.shapeworld import world as sw
    order = np.random.default_rng([seed, 5]).permutation(len(sw.COLORS))
    return next(sw.COLORS[i] for i in order if sw.compatible(a.appearance, sw.Background(sw.COLORS[i]))
                and sw.compatible(b.appearance, sw.Background(sw.COLORS[i])))


def jobs(subjects, seeds) -> list[tuple[int, int, int, str]]:
    """(i, j, seed, background) for every ordered pair i != j and seed."""
    return [(i, j, s, background(subjects[i], subjects[j], 1000 * i + j)) for i in range(len(subjects))
            for j in range(len(subjects)) if i != j for s in seeds]


# ---------------------------------------------------------------------------------------------------------
# Training.


def train(m: Method, concepts: Path, work: Path, steps_scale: float, fast: bool, seed: int = 0, say=print) -> dict:
    """Runs (or skips, when its export exists) one method's fine-tuning; returns {"seconds", "skipped"}."""
    folder = work / m.name
    done = folder / "benchmark_run.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        say(f"{m.name}: finished before ({rec['seconds']:.0f} s), skipped")
        return dict(rec, skipped=True)
    from customjax.api import load_config
    cfg = load_config(str(ROOT / "configs" / m.spec))
    order = [s for s in cfg.stage_order.split(",") if s]
    cmd = [sys.executable, "-m", "customjax.finetune", "--config", str(ROOT / "configs" / m.spec), "--concepts",
           str(concepts), "--workdir", str(folder), "--config.train.preview_every=0", f"--config.seed={seed}"]
    for s in order:
        n = max(int(round(int(cfg.stages[s].steps) * steps_scale)), 2)
        cmd.append(f"--config.stages.{s}.steps={n}")
    if fast and "curation" in cfg:
        cmd += ["--config.curation.global_per_view=1", "--config.curation.region_per_view=1",
                "--config.curation.mix_per_pair=1", "--config.curation.context_images=1",
                "--config.stages.text.batch=8"]
    folder.mkdir(parents=True, exist_ok=True)
    say(f"{m.name}: training (log {folder / 'train.log'})")
    t0 = time.time()
    with open(folder / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
    if rc != 0:
        tail = (folder / "train.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{m.name}: customjax.finetune exited {rc}; rerun to resume. Log tail:\n" + "\n".join(tail))
    rec = dict(seconds=round(time.time() - t0, 1), command=" ".join(cmd))
    done.write_text(json.dumps(rec, indent=1))
    say(f"{m.name}: trained in {rec['seconds']:.0f} s")
    return dict(rec, skipped=False)


# ---------------------------------------------------------------------------------------------------------
# Sampling and scores.


def method_pipe(m: Method, work: Path, pipe, params, subjects, names):
    """(pipe, params, phrase per concept) that sample ``m``'s two-concept prompts."""
    from customjax.concepts.export import load_concept, read_concept_meta
    from customjax.shapeworld import world as sw

    if m.name == "named":
        return pipe, params, [sw.appearance_phrase(s.appearance) + " " + s.category for s in subjects]
    if m.name == "class":
        return pipe, params, [s.category for s in subjects]
    export = work / m.name / "export"
    if (export / "clif" / "concept.json").is_file():           # concepts learnt together: one folder
        wide, p, meta = load_concept(pipe, params, export / "clif")
        return wide, p, [meta["concepts"][n]["phrase"] for n in names]
    # per-concept words (Textual Inversion): each concept's row under its own placeholder
    import copy

    from customjax.concepts.files import load_token_file
    from customjax.concepts.tokens import add_placeholders, wider_pipe, with_table
    rows, tokens = [], [f"<w{k}>" for k in range(len(names))]
    for n in names:
        meta = read_concept_meta(export / n)
        rows.append(load_token_file(export / n / meta["token_file"])[meta["token"]][0])
    tok = copy.deepcopy(pipe.tokenizers[0])
    vocab = pipe.text_encoders[0].config.vocab_size
    add_placeholders(tok, tokens)
    wide = dataclasses.replace(wider_pipe(pipe, len(tokens)), tokenizers=(tok,))
    return wide, with_table(params, np.stack(rows), vocab), tokens


def sample(pipe, params, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 4) -> np.ndarray:
    from customjax.images import to_uint8
    from customjax.sampling.common import seed_latents
    from customjax.sampling.t2i import txt2img

    f = pipe.vae_scale
    size = pipe.unet.config.sample_size * f
    lat = seed_latents(seeds, (size // f, size // f, pipe.unet.config.in_channels))
    out = []
    for i in range(0, len(prompts), batch):
        p, x = list(prompts[i:i + batch]), lat[i:i + batch]
        n = len(p)
        p += [p[-1]] * (batch - n)
        x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)])
        imgs = txt2img(pipe, params, p, None, steps=steps, guidance=guidance, sampler="ddim", height=size,
                       width=size, latents=x)
        out.append(to_uint8(np.asarray(imgs)[:n]))
    return np.concatenate(out)


def confusion(image: np.ndarray, a, b, bg: str) -> dict:
    """The scores of one image of "a <a> on the left and a <b> on the right" (module docstring; the evaluation's
    :func:`~customjax.shapeworld.benchmark.comparison.confusion_scores`, plus the category accuracy)."""
    from customjax.shapeworld import world as sw
    from customjax.shapeworld.benchmark.comparison import confusion_scores

    scene = sw.Scene(sw.Background(bg), (sw.Obj(a.category, position="left"), sw.Obj(b.category, position="right")))
    scores, own = confusion_scores(image, scene, a, b)
    return dict(scores, category_accuracy=float(own["category_accuracy"]))


def bootstrap(values: np.ndarray, groups: np.ndarray, n: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% percentile interval, resampling the groups (ordered pairs) with replacement."""
    ids = np.unique(groups)
    per = np.array([values[groups == g].mean() for g in ids])
    rng = np.random.default_rng(seed)
    boots = per[rng.integers(len(per), size=(n, len(per)))].mean(1)
    return dict(mean=float(values.mean()), lo=float(np.percentile(boots, 2.5)), hi=float(np.percentile(boots, 97.5)),
                n=int(len(values)))


def fmt(s: dict | None) -> str:
    return "-" if not s else f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="runs (default runs/shapeworld_clif, --fast: runs/shapeworld_clif_fast)")
    ap.add_argument("--out", default=None, help="results (default docs/shapeworld/clif, --fast: WORK/out)")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--steps_scale", type=float, default=1.0)
    ap.add_argument("--methods", default=",".join(m.name for m in METHODS))
    ap.add_argument("--train_seed", type=int, default=0, help="config.seed of every training run (a replicate)")
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--fast", action="store_true", help="plumbing: 2 subjects, 1 seed, 2 steps per stage, 4 DDIM steps")
    a = ap.parse_args(argv)
    if a.fast:
        a.subjects, a.seeds, a.steps, a.steps_scale = 2, 1, 4, 0.0
    work = Path(a.work or ROOT / "runs" / ("shapeworld_clif_fast" if a.fast else "shapeworld_clif"))
    out = Path(a.out or (work / "out" if a.fast else ROOT / "docs" / "shapeworld" / "clif"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    folders, subjects = make_concepts(work, a.subjects)
    names = [f.name for f in folders]
    chosen = [BY_NAME[n] for n in a.methods.split(",")]
    t_train = {}
    for m in chosen:
        done = work / m.name / "benchmark_run.json"
        if m.spec and not a.skip_train:
            t_train[m.name] = train(m, work / "concepts", work, a.steps_scale, a.fast, a.train_seed)["seconds"]
        elif m.spec and done.is_file():         # trained by an earlier invocation
            t_train[m.name] = json.loads(done.read_text())["seconds"]
    from customjax.pipeline import load_stable_diffusion
    pipe0, params0 = load_stable_diffusion(BASE)
    js = jobs(subjects, list(range(a.seeds)))
    results, images = {}, {}
    for m in chosen:
        t0 = time.time()
        pipe, params, phrases = method_pipe(m, work, pipe0, params0, subjects, names)
        prompts = [PROMPT.format(phrases[i], phrases[j], "an " + bg if bg[0] in "aeiou" else "a " + bg)
                   for i, j, _, bg in js]
        imgs = sample(pipe, params, prompts, [s for _, _, s, _ in js], a.steps, a.guidance)
        rows = [dict(confusion(im, subjects[i], subjects[j], bg), pair=f"{names[i]}|{names[j]}", seed=s, prompt=p)
                for im, (i, j, s, bg), p in zip(imgs, js, prompts)]
        groups = np.array([r["pair"] for r in rows])
        results[m.name] = dict(label=m.label, spec=m.spec, train_seconds=t_train.get(m.name),
                               sample_seconds=round(time.time() - t0, 1),
                               summary={k: bootstrap(np.array([r[k] for r in rows]), groups) for k in KEYS}, rows=rows)
        images[m.name] = imgs
        print(f"{m.name}: margin {fmt(results[m.name]['summary']['margin'])}, own {fmt(results[m.name]['summary']['own'])}, "
              f"both placed {fmt(results[m.name]['summary']['both_placed'])}", flush=True)
    if "clif" in results:
        ref = results["clif"]["rows"]
        for n, r in results.items():
            if n == "clif":
                continue
            r["clif_minus"] = {k: bootstrap(np.array([x[k] - y[k] for x, y in zip(ref, r["rows"])]),
                                            np.array([x["pair"] for x in ref])) for k in ("margin", "own", "both_placed")}
    from customjax.provenance import git_state
    report = dict(subjects=[s.key for s in subjects], concepts=names, seeds=a.seeds, steps=a.steps, guidance=a.guidance,
                  train_seed=a.train_seed,
                  steps_scale=a.steps_scale, fast=a.fast, prompt=PROMPT, device=device(), git=git_state(),
                  command="python benchmarks/shapeworld_clif.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  methods=results)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    sheet(images, js, subjects, [m.name for m in chosen], out / "samples.png")
    print(f"wrote {out / 'results.md'}")
    return 0


def device() -> dict:
    import platform

    import jax
    return dict(platform=jax.devices()[0].platform, kind=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                machine=platform.machine())


def markdown(r: dict) -> str:
    n = len(r["concepts"])
    lines = ["# CLIF on ShapeWorld: two learnt concepts in one image", "",
             f"{n} held-out two-colour ShapeWorld subjects ({', '.join(r['subjects'])}), 4 views each with exact masks "
             f"and colour regions, learnt by every method; {n * (n - 1)} ordered pairs x {r['seeds']} seeds of "
             f"`{r['prompt']}`, DDIM {r['steps']} steps, guidance {r['guidance']}; step counts x {r['steps_scale']}, "
             f"training seed {r.get('train_seed', 0)}. "
             f"Device: {r['device']['kind']} ({r['device']['cpus']} CPUs). Command: `{r['command']}`.", "",
             "Mean [95% bootstrap interval over the ordered pairs]. Margin: each object's exact appearance similarity "
             "to its own subject minus to the other subject (higher: less confusion); Own: similarity to its own "
             "subject; Both placed: both objects found at their sides; Swapped: both found, each more like the other "
             "subject.", "",
             "`samples.png`: the first seed of 6 ordered pairs (columns); rows: the pair as the world renders it, "
             "then " + ", ".join(m["label"] for m in r["methods"].values()) + ".", "",
             "| Method | Margin | Own | Both placed | Swapped | Category | train s |", "|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        s = m["summary"]
        t = "-" if m.get("train_seconds") is None else f"{m['train_seconds']:.0f}"
        lines.append(f"| {m['label']} | {fmt(s['margin'])} | {fmt(s['own'])} | {fmt(s['both_placed'])} | "
                     f"{fmt(s['swapped'])} | {fmt(s['category_accuracy'])} | {t} |")
    if "clif" in r["methods"]:
        lines += ["", "CLIF minus each row over the same (pair, seed) images (paired; bootstrap over the pairs):", "",
                  "| CLIF minus | Margin | Own | Both placed |", "|---|---|---|---|"]
        for name, m in r["methods"].items():
            if "clif_minus" in m:
                d = m["clif_minus"]
                lines.append(f"| {m['label']} | {fmt(d['margin'])} | {fmt(d['own'])} | {fmt(d['both_placed'])} |")
    return "\n".join(lines) + "\n"


def sheet(images: dict, js, subjects, order, path: Path, pairs: int = 6) -> None:
    """Rows: the pair rendered by the world (the target), then each method in ``order``; columns: the first
    seed of ``pairs`` ordered pairs."""
    from customjax.images import grid, save_png
    from customjax.shapeworld import world as sw

    cols = [k for k, (i, j, s, bg) in enumerate(js) if s == 0][:pairs]
    truth = []
    for k in cols:
        i, j, _, bg = js[k]
        size = images[order[0]].shape[1]
        rng = np.random.default_rng(0)
        objs = (sw.place(rng, subjects[i], "left", "large", size), sw.place(rng, subjects[j], "right", "large", size))
        truth.append(sw.render(sw.Scene(sw.Background(bg), objs), size)[0])
    rows = [np.stack(truth)] + [images[n][cols] for n in order]
    save_png(grid(np.concatenate(rows).astype(np.float32) / 255.0, cols=len(cols)), path)


if __name__ == "__main__":
    sys.exit(main())
