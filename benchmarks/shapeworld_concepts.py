"""Contrastive Inversion's Table 1 on ShapeWorld: per-concept fine-tuning methods compared on held-out
subjects (Textual Inversion, DreamBooth, Custom Diffusion, Contrastive Inversion with and without its
LDM fine-tuning stage, and the pretrained base prompted with the class word).

    python benchmarks/shapeworld_concepts.py                      # the paper's step counts (26 min on 2 CPU cores)
    python benchmarks/shapeworld_concepts.py --steps_scale 0.5    # half of every stage's steps
    python benchmarks/shapeworld_concepts.py --skip_train         # evaluate the runs already in --work
    python benchmarks/shapeworld_concepts.py --fast               # plumbing: 2 subjects, a few steps, 1 seed

1. ``--subjects`` held-out subjects (those of ``concept_cases(2 * subjects)``), each written as a concept
   folder of 4 views with masks and its category as the class word (``WORK/concepts``).
2. Every method trains all concepts at once: ``python -m customjax.finetune --config configs/<m>.py:shapeworld
   --concepts WORK/concepts --workdir WORK/<name>`` (a subprocess, log in ``WORK/<name>/train.log``), the
   config's paper step counts times ``--steps_scale``, exporting at ``--curve_points`` evenly spaced steps of
   the last stage (the last point is its end). A rerun skips finished runs (``WORK/<name>/benchmark_run.json``)
   and resumes unfinished ones from their checkpoints.
3. Every method at every curve point samples each concept's two cases (the case prompt with the category word
   replaced by the concept's phrase from its ``concept.json``: ``"a large <s*> on the left ..."``, or
   ``"a large <s*> triangle ..."`` for DreamBooth / Custom Diffusion) for ``--seeds`` with DDIM ``--steps``
   and guidance ``--guidance``, in fixed-shape batches through one compiled sampler (one pipeline with the
   learnt word's row; each concept's exported params swapped in). Scores per image: ShapeWorld's exact
   ``score`` (similarity, position_correct, controllability, ...), CLIP-T against the plain case prompt
   (the class word, as DreamBench scores against the class noun) and CLIP-I against the concept's 4 views
   (mean cosine), with the base model's own CLIP. Images are cached in ``WORK/<name>/eval/``.
4. ``--out``: ``results.json`` (every figure per method and step, per-image scores, wall times, device,
   commit, arguments), ``results.md`` (Table 1 at each method's best step: the curve point with the highest
   mean of similarity and controllability; the curves), ``curves.png`` (similarity vs controllability and
   CLIP-I vs CLIP-T along the steps) and ``samples.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "customjax" / "shapeworld" / "assets" / "shapeworld_base"
TOKEN = "<s*>"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config: str        # configs/<config>.py
    preset: str        # "" or a preset of the config file
    label: str


METHODS = (Method("ti", "textual_inversion", "", "Textual Inversion"),
           Method("cd", "custom_diffusion", "", "Custom Diffusion"),
           Method("db", "dreambooth", "", "DreamBooth"),
           Method("ci", "contrastive_inversion", "", "Contrastive Inversion"),
           Method("ci_no_ft", "contrastive_inversion", "no_finetune", "Contrastive Inversion w/o LDM fine-tuning"))
BY_NAME = {m.name: m for m in METHODS}
TABLE_ORDER = ("pretrained", "ti", "db", "cd", "ci_no_ft", "ci")     # the paper's Table 1 rows
LABELS = {"pretrained": "Pretrained (class word)", **{m.name: m.label for m in METHODS},
          "ground_truth": "ground-truth render (ceiling)"}
SCORE_KEYS = ("similarity", "position_correct", "controllability", "clip_i", "clip_t", "background_correct",
              "others_correct", "placed_any", "category_correct", "size_correct", "count_correct")
COLUMNS = (("similarity", "Similarity"), ("position_correct", "Placement"), ("controllability", "Controllability"),
           ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


# ---------------------------------------------------------------------------------------------------------
# Concepts and cases.


def make_concepts(work: Path, subjects: int, views: int = 4, case_seed: int = 0):
    """(concept folder per subject name, cases per subject name, subjects in order): ``subjects`` held-out
    subjects of ``concept_cases(2 * subjects)``, written under ``work/concepts``."""
    from customjax.shapeworld.benchmark.concepts import concept_cases, concept_name, write_concepts

    cases, subs = concept_cases(2 * subjects, seed=case_seed)
    subs = subs[:subjects]
    folders = write_concepts(Path(work) / "concepts", subs, views=views)
    names = [concept_name(s) for s in subs]
    by = {n: [c for c in cases if concept_name(c.subjects[0]) == n] for n in names}
    return dict(zip(names, folders)), by, subs


def concept_prompt(case, phrase: str) -> str:
    """The case prompt with the subject's category word replaced by ``phrase`` (the grammar of
    :func:`~customjax.shapeworld.benchmark.cases.case_prompt`: the article goes with the size word)."""
    from customjax.shapeworld import world as sw
    from customjax.shapeworld.benchmark.cases import case_prompt

    objs = case.scene.objects
    scene = sw.Scene(case.scene.background, (dataclasses.replace(objs[0], category=phrase),) + tuple(objs[1:]))
    out = case_prompt(scene, len(case.subjects))
    if out.count(phrase) != 1 or out.replace(phrase, case.words[0], 1) != case.prompt:
        raise ValueError(f"case {case.name}: cannot put {phrase!r} in place of {case.words[0]!r} in {case.prompt!r}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Training.


def method_config(m: Method):
    from customjax.api import load_config
    return load_config(f"{ROOT / 'configs' / (m.config + '.py')}:shapeworld" + (f",{m.preset}" if m.preset else ""))


def plan(m: Method, scale: float, points: int) -> dict:
    """{"steps": {stage: steps}, "stage": the last stage, "curve": the evaluated steps of the last stage
    (``points`` evenly spaced, the last one its end)}."""
    cfg = method_config(m)
    order = [s for s in cfg.stage_order.split(",") if s]
    steps = {s: max(int(round(int(cfg.stages[s].steps) * scale)), 2) for s in order}
    last = steps[order[-1]]
    curve = sorted({max(1, int(round(last * k / points))) for k in range(1, points + 1)})
    return dict(steps=steps, stage=order[-1], curve=curve, paper_steps={s: int(cfg.stages[s].steps) for s in order})


def train_command(m: Method, p: dict, concepts: Path, workdir: Path) -> list[str]:
    spec = f"{ROOT / 'configs' / (m.config + '.py')}:shapeworld" + (f",{m.preset}" if m.preset else "")
    inner = [c for c in p["curve"] if c < p["steps"][p["stage"]]]
    return ([sys.executable, "-m", "customjax.finetune", "--config", spec, "--concepts", str(concepts),
             "--workdir", str(workdir)] + [f"--config.stages.{s}.steps={n}" for s, n in p["steps"].items()]
            + [f"--config.finetune.curve=({''.join(f'{c},' for c in inner)})"])


def export_folder(workdir: Path, p: dict, step: int, concept: str) -> Path:
    end = step == p["steps"][p["stage"]]
    return Path(workdir) / ("export" if end else f"curve/{step}") / concept


def train(m: Method, p: dict, concepts: Path, names: list[str], workdir: Path, say=print) -> dict:
    """Runs (or skips, when finished with the same plan) one method's fine-tuning; returns its record
    (``seconds``: wall time of every invocation that trained)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "benchmark_run.json"
    want = dict(method=m.name, steps=p["steps"], curve=p["curve"], concepts=names)
    rec = json.loads(path.read_text()) if path.is_file() else dict(plan=want, seconds=[])
    if rec["plan"] != want:
        raise SystemExit(f"{workdir} holds a run of another plan ({rec['plan']}, now {want}): give another --work")
    complete = all((export_folder(workdir, p, s, n) / "concept.json").is_file() for s in p["curve"] for n in names)
    if rec.get("status") == "finished" and complete:
        say(f"{m.name}: finished before ({sum(rec['seconds']):.0f} s), skipped")
        return dict(rec, skipped=True)
    from customjax.provenance import git_state
    cmd = train_command(m, p, concepts, workdir)
    rec.update(status="running", command=" ".join(cmd))
    rec.setdefault("git", []).append(git_state())      # the checkout each invocation trained with
    path.write_text(json.dumps(rec, indent=1))
    say(f"{m.name}: training {p['steps']} steps, exports at {p['curve']} (log {workdir / 'train.log'})")
    t0 = time.time()
    with open(workdir / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    rec["seconds"].append(round(time.time() - t0, 1))
    if rc != 0:
        rec["status"] = f"exit {rc}"
        path.write_text(json.dumps(rec, indent=1))
        tail = (workdir / "train.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{m.name}: customjax.finetune exited {rc}; rerun to resume. Log tail:\n" + "\n".join(tail))
    missing = [str(export_folder(workdir, p, s, n)) for s in p["curve"] for n in names
               if not (export_folder(workdir, p, s, n) / "concept.json").is_file()]
    if missing:
        raise SystemExit(f"{m.name}: finished without the exports {missing[:3]}... (curve points skipped by a "
                         "resume past them? delete the run folder and train again)")
    rec["status"] = "finished"
    path.write_text(json.dumps(rec, indent=1))
    say(f"{m.name}: trained in {rec['seconds'][-1]:.0f} s")
    return dict(rec, skipped=False)


def run_seconds(workdir: Path) -> dict[str, float]:
    """Seconds per logged training step of a finished run (``metrics.jsonl``), per stage."""
    out: dict = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.is_file():
        prev = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            st = r["stage"]
            if st in prev and r["step"] > prev[st]:
                out.setdefault(st, []).append(r["seconds"] / (r["step"] - prev[st]))
            prev[st] = r["step"]
    return {st: float(np.median(v)) for st, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


class Evaluator:
    """The base pipeline widened by the learnt word (one compiled sampler for every method and step), the
    base's CLIP, and the sampling settings."""

    def __init__(self, base: str | Path = BASE, seeds=(0, 1), steps: int = 25, guidance: float = 5.0,
                 sampler: str = "ddim", batch: int = 4):
        from customjax.concepts.export import concept_pipe
        from customjax.concepts.tokens import with_table
        from customjax.pipeline import load_stable_diffusion
        from customjax.sampling.t2i import txt2img
        from customjax.shapeworld.benchmark.scoring import clip_scorer

        self.base = Path(base)
        pipe, self.params0 = load_stable_diffusion(self.base)
        self.pipe = concept_pipe(pipe, TOKEN)
        enc = self.pipe.text_encoders[0].config
        self.vocab = enc.vocab_size - 1          # the learnt word's id
        self.plain = with_table(self.params0, np.zeros((1, enc.hidden_size), np.float32), self.vocab)
        self.seeds, self.steps, self.guidance, self.sampler = [int(s) for s in seeds], int(steps), float(guidance), sampler
        self.batch = int(batch)
        self.size = pipe.unet.config.sample_size * pipe.vae_scale
        self.sample_fn = txt2img                 # tests wrap it to see the prompts
        self.calls = 0
        self.scorer, self.clip_note = clip_scorer(SimpleNamespace(model=SimpleNamespace(path=str(self.base))))
        self._views: dict = {}

    def params(self, folder: Path | None) -> tuple[dict, dict | None]:
        """(params, concept.json) of an exported concept; the base (class word) without one."""
        if folder is None:
            return self.plain, None
        from customjax.concepts.export import concept_params
        return concept_params(self.pipe, self.params0, folder)

    def sample(self, params: dict, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """uint8 images for ``prompts`` / ``seeds`` in batches of ``self.batch`` (the last padded)."""
        from customjax.images import to_uint8
        from customjax.sampling.common import seed_latents

        f = self.pipe.vae_scale
        lat = seed_latents(seeds, (self.size // f, self.size // f, self.pipe.unet.config.in_channels))
        out = []
        for i in range(0, len(prompts), self.batch):
            p, x = list(prompts[i:i + self.batch]), lat[i:i + self.batch]
            n = len(p)
            p += [p[-1]] * (self.batch - n)
            x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, 0)])
            imgs = self.sample_fn(self.pipe, params, p, None, steps=self.steps, guidance=self.guidance,
                                  sampler=self.sampler, height=self.size, width=self.size, latents=x)
            self.calls += 1
            out.append(to_uint8(np.asarray(imgs)[:n]))
        return np.concatenate(out)

    def view_embeddings(self, folder: Path) -> np.ndarray | None:
        """(V, D) unit CLIP embeddings of a concept folder's views."""
        if self.scorer is None:
            return None
        key = str(folder)
        if key not in self._views:
            from PIL import Image

            from customjax.shapeworld.benchmark.scoring import _at
            views = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(Path(folder).glob("*.png"))])
            self._views[key] = np.asarray(self.scorer.embed_images(_at(views, self.scorer.image_size)))
        return self._views[key]

    def scores(self, images: np.ndarray, jobs: list, views: np.ndarray | None) -> list[dict]:
        """Per image: ``score(image, case)`` and CLIP-T (the plain case prompt) / CLIP-I (the concept's views)."""
        from customjax.shapeworld.benchmark.scoring import clip_scores, score

        rows = [score(im, case) for im, (case, _) in zip(images, jobs)]
        if self.scorer is not None and views is not None:
            t, i = clip_scores(self.scorer, images, [c.prompt for c, _ in jobs], [views] * len(jobs))
            for r, a, b in zip(rows, t, i):
                r.update(clip_t=float(a), clip_i=float(b))
        return rows


def evaluate_concept(ev: Evaluator, export: Path | None, cases: list, concept_dir: Path,
                     cache: Path | None = None) -> tuple[list[dict], np.ndarray]:
    """(rows, uint8 images) of one concept (``export``: its exported folder; None: the pretrained base
    with the plain prompt) on ``cases`` x ``ev.seeds``; images cached in ``cache`` (an .npz)."""
    params, meta = ev.params(export)
    if meta is not None and meta.get("class") and meta["class"] != cases[0].words[0]:
        raise ValueError(f"{export}: class {meta['class']!r}, its cases' {cases[0].words[0]!r}")
    jobs = [(c, s) for c in cases for s in ev.seeds]
    prompts = [c.prompt if meta is None else concept_prompt(c, meta["phrase"]) for c, _ in jobs]
    key = hashlib.sha1(json.dumps([prompts, [s for _, s in jobs], ev.steps, ev.guidance, ev.sampler,
                                   str(export)]).encode()).hexdigest()[:16]
    images = None
    if cache is not None and cache.is_file():
        z = np.load(cache)
        fresh = export is None or cache.stat().st_mtime >= (Path(export) / "concept.json").stat().st_mtime
        if str(z["key"]) == key and fresh:
            images = z["images"]
    if images is None:
        images = ev.sample(params, prompts, [s for _, s in jobs])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, images=images, key=key)
    rows = ev.scores(images, jobs, ev.view_embeddings(concept_dir))
    for r, (c, s), p in zip(rows, jobs, prompts):
        r.update(case=c.name, seed=s, prompt=p, plain_prompt=c.prompt, concept=concept_dir.name,
                 phrase=None if meta is None else meta["phrase"])
    return rows, images


def ground_truth(ev: Evaluator, cases_by: dict, folders: dict) -> list[dict]:
    """The scores of the cases' own rendered scenes (the ceiling)."""
    from customjax.shapeworld import world as sw
    rows = []
    for name, cases in cases_by.items():
        imgs = np.stack([sw.render(c.scene, ev.size)[0] for c in cases])
        rows += ev.scores(imgs, [(c, 0) for c in cases], ev.view_embeddings(folders[name]))
    return rows


def summary(rows: list[dict]) -> dict:
    from customjax.shapeworld.benchmark.scoring import UNIT
    from customjax.shapeworld.metrics import summarise
    return summarise([{k: r[k] for k in SCORE_KEYS if k in r} for r in rows], UNIT)


def best_step(per_step: dict) -> int:
    """The curve point with the highest mean of similarity and controllability (the earliest on ties)."""
    return int(max(sorted(per_step, key=int), key=lambda s: 0.5 * (per_step[s]["similarity"]["mean"]
                                                                   + per_step[s]["controllability"]["mean"])))


# ---------------------------------------------------------------------------------------------------------
# Report.


def fmt(s: dict | None, key: str) -> str:
    v = (s or {}).get(key)
    return "-" if v is None else f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def compare(a: dict, b: dict, key: str) -> str:
    """'>' / '<' when the 95% intervals of a and b are disjoint, else '~'."""
    x, y = a.get(key), b.get(key)
    if x is None or y is None:
        return "-"
    return ">" if x["lo"] > y["hi"] else ("<" if x["hi"] < y["lo"] else "~")


def paired(report: dict, a: str, b: str, key: str) -> dict | None:
    """Mean [95% interval] of ``a``'s score minus ``b``'s over the images both have (the same concept,
    case and seed), each method at its best step (normal approximation over the image pairs)."""
    def at_best(n):
        m = report["methods"][n]
        return {(r["concept"], r["case"], r["seed"]): r.get(key) for r in report["rows"].get(n, [])
                if r["step"] == m["best_step"] and r.get(key) is not None}
    x, y = at_best(a), at_best(b)
    d = np.array([float(x[k]) - float(y[k]) for k in x if k in y])
    if d.size < 2:
        return None
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    return dict(mean=float(d.mean()), lo=float(d.mean() - half), hi=float(d.mean() + half), n=int(d.size))


def markdown(report: dict) -> str:
    r = report
    dev = r["device"]
    lines = ["# Contrastive Inversion's Table 1 on ShapeWorld", "",
             f"{len(r['concepts'])} held-out ShapeWorld subjects (4 views each) fine-tuned per method, all concepts "
             f"stacked in one run; {r['cases']} single-subject cases (2 per subject) x seeds {r['seeds']}, "
             f"{r['steps']} DDIM steps, guidance {r['guidance']}, {r['image_size']} px. Steps: the configs' paper "
             f"step counts x {r['steps_scale']}. Device {dev['kind']} ({dev['platform']}, {dev['cpus']} CPUs), commit "
             f"{(r.get('commit') or '?')[:12]}{' (dirty)' if r.get('dirty') else ''}. Command: `{r['command']}`"
             + (" (the runs trained by an earlier invocation; their wall times below)" if r.get("skip_train") else "")
             + ".", "",
             "Mean [95% interval] over cases x seeds (Wilson for yes / no scores, normal approximation otherwise). "
             "Similarity: ShapeWorld's exact appearance similarity of the detected subject to the held-out subject "
             "(0 when not found); Placement: the subject found with its category at the named position "
             "(`position_correct`); Controllability: the mean of background / placement / other object correct; "
             "CLIP-I: mean cosine of the image to the concept's 4 training views; CLIP-T: cosine to the plain case "
             "prompt (the class word in place of the learnt word), both with the base model's own CLIP. "
             f"Prompts name the concept by its phrase (TI / CI: `{TOKEN}`, CD / DB: `{TOKEN} <class>`); the "
             "pretrained row uses the class word.", "",
             "## Table 1 (each method at its best step)", "",
             "Best step = the evaluated step (curve point) with the highest mean of similarity and "
             "controllability, chosen on the same images it is reported on (an optimistic pick for every "
             "method alike).", "",
             "| Method | step | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in TABLE_ORDER + ("ground_truth",):
        if name not in r["methods"]:
            continue
        m = r["methods"][name]
        s = m["per_step"][str(m["best_step"])]
        step = "-" if name in ("pretrained", "ground_truth") else f"{m['best_step']} / {m['last_step']}"
        lines.append(f"| {LABELS[name]} | {step} | " + " | ".join(fmt(s, c[0]) for c in COLUMNS) + " |")
    ci = r["methods"].get("ci")
    if ci:
        cs = ci["per_step"][str(ci["best_step"])]
        lines += ["", "Contrastive Inversion against each row ('>' / '<': CI's 95% interval lies above / below the "
                  "row's; '~': they overlap):", "",
                  "| vs | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name in TABLE_ORDER:
            if name in r["methods"] and name != "ci":
                m = r["methods"][name]
                s = m["per_step"][str(m["best_step"])]
                lines.append(f"| {LABELS[name]} | " + " | ".join(compare(cs, s, c[0]) for c in COLUMNS) + " |")
        lines += ["", "Paired differences, Contrastive Inversion minus each row over the same (concept, case, seed) "
                  "images, mean [95% interval] (normal approximation over image pairs; the images of one subject "
                  "are not independent, so these intervals are on the narrow side):", "",
                  "| CI minus | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name in TABLE_ORDER:
            if name in r["methods"] and name != "ci" and name in r["rows"]:
                lines.append(f"| {LABELS[name]} | " + " | ".join(
                    fmt({c[0]: paired(r, "ci", name, c[0])}, c[0]) for c in COLUMNS) + " |")
    lines += ["", "## Along the steps", "",
              "Every method at every evaluated step of its last stage (CI: the LDM fine-tuning stage; CI w/o "
              "fine-tuning: the inversion stage); the best step is in bold.", "",
              "| Method | step | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in TABLE_ORDER:
        if name not in r["methods"] or name == "pretrained":
            continue
        m = r["methods"][name]
        for st in sorted(m["per_step"], key=int):
            b = "**" if int(st) == m["best_step"] else ""
            lines.append(f"| {LABELS[name]} | {b}{st}{b} | " + " | ".join(fmt(m["per_step"][st], c[0]) for c in COLUMNS)
                         + " |")
    lines += ["", "## Training and evaluation time", "", "| Method | steps | train wall s | s / step (median) | "
              "evaluation s |", "|---|---|---|---|---|"]
    for name in TABLE_ORDER:
        if name in r["methods"]:
            m = r["methods"][name]
            t = m.get("train") or {}
            steps = " + ".join(f"{k} {v}" for k, v in m["steps"].items()) if m.get("steps") else "-"
            per = ", ".join(f"{k} {v:.3f}" for k, v in t["seconds_per_step"].items()) if t.get("seconds_per_step") else "-"
            cached = " (images cached)" if m.get("sampler_calls") == 0 else ""
            lines.append(f"| {LABELS[name]} | {steps} | {t.get('seconds', '-')} | {per} | {m['eval_seconds']}{cached} |")
    lines += ["", f"Training wall time (all invocations) {r['train_seconds']} s; this invocation {r['seconds']} s "
              f"(evaluation images are cached in WORK/<method>/eval/: a rerun re-scores them). Seconds per step: the "
              f"median over `metrics.jsonl` records (every 25 steps; previews and curve exports included). "
              f"{r['clip_note']}.", ""]
    lines += [f"Note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


COLORS = {"pretrained": (0, 0, 0), "ti": (40, 90, 200), "db": (210, 40, 40), "cd": (230, 140, 20),
          "ci_no_ft": (120, 160, 60), "ci": (130, 40, 170), "ground_truth": (150, 150, 150)}


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _panel(d, box, report: dict, x: str, y: str, xlabel: str, ylabel: str) -> None:
    L, T, R, B = box
    pts = {n: [(int(s), m["per_step"][s]) for s in sorted(m["per_step"], key=int)]
           for n, m in report["methods"].items() if n != "ground_truth"}     # the ceiling is in the table
    best = {n: report["methods"][n]["best_step"] for n in pts}    # the axes hold the best steps' intervals
    vals_x = [p[x][k] for n, v in pts.items() for s, p in v if x in p
              for k in (("mean", "lo", "hi") if s == best[n] else ("mean",))]
    vals_y = [p[y][k] for n, v in pts.items() for s, p in v if y in p
              for k in (("mean", "lo", "hi") if s == best[n] else ("mean",))]
    if not vals_x or not vals_y:
        return

    def span(v):
        lo, hi = math.floor(min(v) * 10) / 10, math.ceil(max(v) * 10) / 10
        return (lo, hi) if hi > lo else (lo - 0.1, hi + 0.1)
    (x0, x1), (y0, y1) = span(vals_x), span(vals_y)
    X = lambda v: L + (min(max(v, x0), x1) - x0) / (x1 - x0) * (R - L)      # clipped to the frame
    Y = lambda v: B - (min(max(v, y0), y1) - y0) / (y1 - y0) * (B - T)
    font, small = _font(14), _font(11)
    d.rectangle([L, T, R, B], outline="black")
    for lo, hi, f, vert in ((x0, x1, X, True), (y0, y1, Y, False)):
        step = next(s for s in (0.02, 0.05, 0.1, 0.2, 0.5) if (hi - lo) / s <= 10)
        for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1):
            v = k * step
            if vert:
                d.line([f(v), T, f(v), B], fill=(232, 232, 232))
                d.text((f(v), B + 6), f"{v:.2f}", fill="black", font=small, anchor="mt")
            else:
                d.line([L, f(v), R, f(v)], fill=(232, 232, 232))
                d.text((L - 6, f(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
    d.text(((L + R) / 2, B + 24), xlabel, fill="black", font=font, anchor="mt")
    d.text((L, T - 20), ylabel, fill="black", font=font)
    for n, v in pts.items():
        c = COLORS.get(n, (0, 0, 0))
        xy = [(X(p[x]["mean"]), Y(p[y]["mean"])) for _, p in v if x in p and y in p]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        best = report["methods"][n]["best_step"]
        for (s, p), (px, py) in zip(v, xy):
            r = 5 if s == best else 3
            if s == best:   # intervals at the best step only, to keep the plot readable
                d.line([X(p[x]["lo"]), py, X(p[x]["hi"]), py], fill=c)
                d.line([px, Y(p[y]["lo"]), px, Y(p[y]["hi"])], fill=c)
            d.ellipse([px - r, py - r, px + r, py + r], fill=c)
        if xy:
            d.text((xy[-1][0] + 6, xy[-1][1] - 6), f"{n} {v[-1][0]}" if len(v) > 1 else n, fill=c, font=small)


def plot(report: dict, path: Path, width: int = 1200, height: int = 560) -> None:
    """Two panels: similarity vs controllability and CLIP-I vs CLIP-T, one line per method along its
    evaluated steps (large dot: the best step, with its 95% intervals; the label at the last step)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((width / 2, 14), "ShapeWorld Table 1: fidelity vs text alignment along fine-tuning steps",
           fill="black", font=_font(16), anchor="mm")
    half = (width - 180) // 2
    _panel(d, (70, 60, half - 20, height - 60), report, "controllability", "similarity",
           "controllability (exact)", "similarity to the subject (exact)")
    _panel(d, (half + 70, 60, 2 * half - 20, height - 60), report, "clip_t", "clip_i", "CLIP-T (plain prompt)",
           "CLIP-I (concept views)")
    ly = 70
    for n in TABLE_ORDER:
        if n in report["methods"]:
            d.rectangle([2 * half + 10, ly + 3, 2 * half + 22, ly + 15], fill=COLORS[n])
            d.text((2 * half + 28, ly), n, fill="black", font=_font(12))
            ly += 20
    img.save(path, optimize=True)


def samples_sheet(report: dict, images: dict, refs: dict, path: Path, scale: int = 2) -> None:
    """One row per method (at its best step, first seed): for each of the first two subjects its first
    view, then its two cases; the case prompts (with the class word) on top."""
    from PIL import Image, ImageDraw
    import textwrap

    shown = report["sample_cases"]            # [(concept, [case names])]
    t, pad, left = report["image_size"] * scale, 6, 150
    font = _font(11)
    cols = sum(1 + len(cs) for _, cs in shown)
    head = 14 * 6
    rows = [n for n in TABLE_ORDER if n in images]
    img = Image.new("RGB", (left + cols * (t + pad) + pad, head + len(rows) * (t + pad) + 30), "white")
    d = ImageDraw.Draw(img)
    prompts = {c["name"]: c["prompt"] for c in report["case_list"]}
    x = left
    for concept, cs in shown:
        d.text((x, 4), "\n".join(textwrap.wrap(f"view of {concept}", 20)), fill="black", font=font)
        x += t + pad
        for c in cs:
            d.text((x, 4), "\n".join(textwrap.wrap(prompts[c], 21)[:6]), fill="black", font=font)
            x += t + pad
    for i, n in enumerate(rows):
        y = head + i * (t + pad)
        m = report["methods"][n]
        label = LABELS[n] if n == "pretrained" else f"{LABELS[n]}\nstep {m['best_step']}\n'{m.get('phrase') or ''}'"
        d.text((6, y + 4), "\n".join(line for part in label.split("\n") for line in textwrap.wrap(part, 22)),
               fill=COLORS.get(n, (0, 0, 0)), font=font)
        x = left
        for concept, cs in shown:
            tiles = [refs[concept]] + [images[n][(concept, c)] for c in cs]
            for tile in tiles:
                big = np.repeat(np.repeat(tile, scale, 0), scale, 1)
                img.paste(Image.fromarray(big), (x, y))
                x += t + pad
    d.text((6, img.height - 20), "prompts as given with the class word; each method's sampler saw its phrase in "
           "its place (TI / CI: <s*>, CD / DB: <s*> <class>); seed " + str(report["seeds"][0]),
           fill="dimgray", font=font)
    img.save(path, optimize=True)


def dump_json(report: dict) -> str:
    """``report`` as JSON: indented, except the per-image rows (one line each, floats to 5 digits)."""
    def small(r):
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}
    head = json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1, default=str)
    rows = ",\n".join(f" {json.dumps(n)}: [\n" + ",\n".join("  " + json.dumps(small(r), default=str) for r in rs)
                      + "]" for n, rs in report["rows"].items())
    text = head[:-2] + ',\n "rows": {\n' + rows + "}\n}\n"
    json.loads(text)
    return text


# ---------------------------------------------------------------------------------------------------------
# The command.


def define_flags() -> None:
    from absl import flags
    flags.DEFINE_integer("subjects", 8, "held-out subjects (concepts)")
    flags.DEFINE_integer("views", 4, "views per concept")
    flags.DEFINE_string("work", None, "runs folder (default runs/shapeworld_concepts; --fast: runs/shapeworld_concepts_fast)")
    flags.DEFINE_string("out", None, "report folder (default docs/shapeworld/concepts; --fast: WORK/report)")
    flags.DEFINE_list("methods", [m.name for m in METHODS], "methods to train and evaluate")
    flags.DEFINE_float("steps_scale", 1.0, "multiplies every stage's step count (1: the configs' paper counts)")
    flags.DEFINE_integer("curve_points", 5, "evaluated steps of the last stage, evenly spaced, the last its end")
    flags.DEFINE_bool("skip_train", False, "evaluate the finished runs in --work only")
    flags.DEFINE_list("seeds", ["0", "1"], "sampling seeds")
    flags.DEFINE_integer("steps", 25, "DDIM steps")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance (the configs' sample.guidance)")
    flags.DEFINE_integer("batch", 4, "images per sampler call")
    flags.DEFINE_bool("fast", False, "2 subjects, steps x 0.002 (a few), 1 seed, 2 sampling steps (explicit flags win)")


def main(argv) -> None:
    from absl import flags

    import jax

    from customjax.provenance import git_state

    del argv
    F = flags.FLAGS
    given = lambda n: F[n].present
    fast = F.fast
    subjects = 2 if fast and not given("subjects") else F.subjects
    scale = 0.002 if fast and not given("steps_scale") else F.steps_scale
    seeds = [0] if fast and not given("seeds") else [int(s) for s in F.seeds]
    steps = 2 if fast and not given("steps") else F.steps
    work = Path(F.work or ("runs/shapeworld_concepts_fast" if fast else "runs/shapeworld_concepts")).resolve()
    out = Path(F.out or (work / "report" if fast else ROOT / "docs/shapeworld/concepts"))
    unknown = [m for m in F.methods if m not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; known: {list(BY_NAME)}")
    methods = [BY_NAME[n] for n in F.methods]
    say = lambda s: print(f"shapeworld_concepts: {s}", file=sys.stderr, flush=True)
    t_start = time.time()

    folders, cases_by, subs = make_concepts(work, subjects, F.views)
    names = list(folders)
    say(f"{len(names)} concepts in {work / 'concepts'}: {names}")
    plans = {m.name: plan(m, scale, F.curve_points) for m in methods}
    runs = {}
    for m in methods:
        wd = work / m.name
        if F.skip_train:
            path = wd / "benchmark_run.json"
            rec = json.loads(path.read_text()) if path.is_file() else {}
            if rec.get("status") != "finished":
                say(f"{m.name}: no finished run in {wd}, left out")
                continue
            if rec["plan"]["steps"] != plans[m.name]["steps"]:
                raise SystemExit(f"{wd}: a run of {rec['plan']['steps']} steps, not {plans[m.name]['steps']}")
            runs[m.name] = dict(rec, skipped=True)
        else:
            runs[m.name] = train(m, plans[m.name], work / "concepts", names, wd, say)

    ev = Evaluator(BASE, seeds, steps, F.guidance, batch=F.batch)
    say(ev.clip_note)
    report = dict(command=" ".join(sys.argv), subjects=subjects, steps_scale=scale, seeds=seeds, steps=steps,
                  guidance=ev.guidance, sampler=ev.sampler, image_size=ev.size, batch=ev.batch,
                  curve_points=F.curve_points, work=str(work), clip_note=ev.clip_note, skip_train=F.skip_train,
                  concepts=[dict(name=n, key=s.key, category=s.category) for n, s in zip(names, subs)],
                  cases=sum(len(v) for v in cases_by.values()),
                  case_list=[dict(c.to_dict(), concept=n) for n, cs in cases_by.items() for c in cs],
                  methods={}, rows={}, notes=[])
    dev = jax.devices()[0]
    report.update(device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count(),
                              cpus=os.cpu_count()), **git_state())
    images: dict = {}

    def run_eval(name: str, points: list[tuple[int, str | None]]) -> None:
        t0, calls0 = time.time(), ev.calls
        per_step, rows_all = {}, []
        for step, run in points:
            rows, step_images = [], {}
            for n in names:
                export = None if run is None else export_folder(work / run, plans[run], step, n)
                cache = work / (run or "pretrained") / "eval" / f"{step}_{n}.npz"
                r, imgs = evaluate_concept(ev, export, cases_by[n], folders[n], cache)
                rows += r
                step_images.update({(n, x["case"]): im for x, im in zip(r, imgs) if x["seed"] == seeds[0]})
            for x in rows:
                x["step"] = step
            per_step[str(step)] = summary(rows)
            rows_all += rows
            images.setdefault(name, {})[step] = step_images
            s = per_step[str(step)]
            say(f"{name} step {step}: similarity {fmt(s, 'similarity')}, controllability {fmt(s, 'controllability')}, "
                f"CLIP-T {fmt(s, 'clip_t')}, CLIP-I {fmt(s, 'clip_i')}")
        best = best_step(per_step)
        m = dict(per_step=per_step, best_step=best, last_step=points[-1][0], eval_seconds=round(time.time() - t0, 1),
                 sampler_calls=ev.calls - calls0,
                 phrase=next((x["phrase"] for x in rows_all if x.get("phrase")), None))
        if name in plans:
            p, rec = plans[name], runs[name]
            m.update(steps=p["steps"], paper_steps=p["paper_steps"], curve=p["curve"], stage=p["stage"],
                     train=dict(seconds=round(sum(rec["seconds"]), 1), invocations=rec["seconds"],
                                skipped_now=rec.get("skipped"), seconds_per_step=run_seconds(work / name),
                                git=rec.get("git"),
                                command=rec.get("command")))
        report["methods"][name] = m
        report["rows"][name] = rows_all

    run_eval("pretrained", [(0, None)])
    for m in methods:
        if m.name in runs:
            run_eval(m.name, [(s, m.name) for s in plans[m.name]["curve"]])
    gt = ground_truth(ev, cases_by, folders)
    report["methods"]["ground_truth"] = dict(per_step={"0": summary(gt)}, best_step=0, last_step=0, eval_seconds=0)
    report["sampler_calls"] = ev.calls
    report["notes"].append("the pretrained row samples the plain case prompt with the base; the ground-truth row "
                           "scores the renders of the cases' own scenes (each case once)")
    unrecorded = [n for n, r in runs.items() if not r.get("git")]
    if unrecorded:
        report["notes"].append(f"no git state recorded for the training of {unrecorded} (trained by an earlier "
                               "version of this script); the commit above is this invocation's")
    if scale != 1.0:
        report["notes"].append(f"steps scaled by {scale}: not the paper's step counts")
    report["seconds"] = round(time.time() - t_start, 1)
    report["train_seconds"] = round(sum(sum(r["seconds"]) for r in runs.values()), 1)

    out.mkdir(parents=True, exist_ok=True)
    shown = [(n, [c.name for c in cases_by[n]]) for n in names[:2]]
    report["sample_cases"] = shown
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "curves.png")
    best_images = {n: images[n][report["methods"][n]["best_step"]] for n in images}
    from PIL import Image
    refs = {n: np.asarray(Image.open(folders[n] / "00.png").convert("RGB")) for n, _ in shown}
    samples_sheet(report, best_images, refs, out / "samples.png")
    (out / "results.json").write_text(dump_json(report))
    print(markdown(report))
    say(f"wrote {out} ({report['seconds']} s)")


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
