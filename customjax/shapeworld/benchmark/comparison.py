"""The five-method comparison's ShapeWorld protocol (``python -m customjax.evaluate --protocol shapeworld``).

Subjects: the held-out subjects (never in the base's training data) whose concept folders the fine-tuning
methods learnt (``--subjects DIR``: ``<subject key>/NN.png`` views, :func:`~.concepts.write_concepts`).
Jobs, fixed seeds:
  * ``edit`` (single subject, new contexts): ``prompts_per_subject`` held-out prompts per subject (a new
    background colour, position and size, every second one with another named object; the subject's
    appearance never in words), each with ``seeds``;
  * ``two`` (two subjects): every ordered pair of subjects of different categories, at opposite places
    (left / right or top / bottom), ``pair_seeds``;
  * ``views`` (reconstruction): each subject's own training scenes as prompts (its views' background,
    place and size), one seed: what a method reproduces of what it was shown.
A method's phrase takes the category word's place (``a large {0} on the left, on a blue background``):
an adapter's is the category word with the reference image (the subject alone, large, centred, on a
neutral background), a concept's its learnt phrase, the ``named`` row the appearance in words.

Scores per image, exact (:func:`~.scoring.score`): similarity (appearance of the found subject to the
subject, 0 if not found; two: the mean), placement (found with its category at the named place),
controllability (background, placement, other objects), and for two subjects the confusion scores
(:func:`confusion`); CLIP-T (the prompt with category words) and CLIP-I (mean cosine to the subject's
views; two subjects: to both subjects' views) with the base's own CLIP. The rendered targets are the
``reference`` row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from customjax.evaluation.methods import Job, Subject
from customjax.shapeworld import world as sw
from customjax.shapeworld.benchmark.cases import Case, _pair, _single, case_prompt, reference_scene
from customjax.shapeworld.benchmark.concepts import concept_name, view_scenes

CONFUSION = ("margin", "own", "other", "both_placed", "swapped")

KINDS = (
    ("edit", "Single subject, held-out prompts (new background, place, size; every second with another object)",
     (("similarity", "Similarity"), ("share", "Share of words"), ("placement", "Placement"),
      ("controllability", "Controllability"), ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"))),
    ("two", "Two subjects in one prompt (every ordered pair of different categories)",
     (("similarity", "Similarity"), ("margin", "Margin (own - other)"), ("both_placed", "Both placed"),
      ("swapped", "Swapped"), ("controllability", "Controllability"))),
    ("views", "Own views (each subject's training scenes as prompts: reconstruction)",
     (("similarity", "Similarity"), ("share", "Share of words"), ("placement", "Placement"), ("clip_i", "CLIP-I"))),
)
METRICS = ("similarity", "placement", "placed_any", "controllability", "background", "clip_t", "clip_i", *CONFUSION)

# (paper, claim, method a, method b, kind, metrics): the claim is a > b on each metric; "~metric": a is not
# lower than b (holds unless the interval lies below 0)
CLAIMS = (
    ("RealCustom++, Fig. 1 / Table II", "RealCustom++ adds the subject to text-to-image without losing its control "
     "(the dual-optimum paradox solved)", "realcustompp", "class", "edit", ("similarity", "~controllability", "~clip_t")),
    ("RealCustom, Table 1", "RealCustom is more similar and more controllable than an unmasked adapter (IP-Adapter)",
     "realcustom", "ip_adapter", "edit", ("similarity", "controllability", "clip_t")),
    ("RealCustom++, Table II", "RealCustom++ improves on RealCustom in controllability and similarity",
     "realcustompp", "realcustom", "edit", ("similarity", "controllability", "clip_t")),
    ("RealCustom++, Table II", "RealCustom++ is more similar and more controllable than IP-Adapter",
     "realcustompp", "ip_adapter", "edit", ("similarity", "controllability", "clip_t")),
    ("RealCustom++, Table III", "RealCustom++ keeps two subjects apart (multi-subject) better than IP-Adapter",
     "realcustompp", "ip_adapter", "two", ("margin", "both_placed")),
    ("CustomContrast, Table 1", "CustomContrast is more similar and more controllable than IP-Adapter",
     "customcontrast", "ip_adapter", "edit", ("similarity", "controllability", "clip_t")),
    ("Contrastive Inversion, Table 1", "Contrastive Inversion is more faithful than Textual Inversion at kept prompt alignment",
     "ci", "ti", "edit", ("similarity", "clip_t")),
    ("Contrastive Inversion, Table 1", "Contrastive Inversion is more faithful than Custom Diffusion and DreamBooth",
     "ci", "cd", "edit", ("similarity",)),
    ("Contrastive Inversion, Table 1", "(continued)", "ci", "db", "edit", ("similarity",)),
    ("CLIF, Table 1", "CLIF confuses two learnt concepts less than Textual Inversion",
     "clif", "ti", "two", ("margin", "both_placed")),
)


def read_subjects(folder: str | Path) -> list[sw.Subject]:
    """The held-out subjects named by ``folder``'s sub-folders (their concept names), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"subjects folder {folder} does not exist (concept folders of held-out ShapeWorld subjects)")
    by = {concept_name(s): s for s in sw.heldout_subjects()}
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [n for n in names if n not in by]
    if unknown:
        raise ValueError(f"{folder}: {unknown} name no held-out ShapeWorld subject (folder names are subject keys, "
                         "e.g. 'star-green-black-stripes-0')")
    if not names:
        raise ValueError(f"{folder}: no subject folders")
    return [by[n] for n in names]


def template_of(case: Case) -> str:
    """``case.prompt`` with each subject's category word replaced by ``{k}``."""
    n = len(case.subjects)
    objs = tuple(dataclasses.replace(o, category=f"{{{k}}}") if k < n else o for k, o in enumerate(case.scene.objects))
    t = case_prompt(sw.Scene(case.scene.background, objs), n)
    if t.format(*case.words) != case.prompt:
        raise ValueError(f"case {case.name}: cannot template {case.prompt!r} (got {t!r})")
    return t


class ShapeWorldProtocol:
    name = "shapeworld"
    kinds = KINDS
    metrics = METRICS
    reference_kinds = ("edit", "two", "views")     # the rendered targets' jobs
    steps, guidance = 25, 5.0                      # text-to-image sampling (the adapters' ShapeWorld configs' own)

    def __init__(self, folder: str | Path, prompts_per_subject: int = 4, seeds: Sequence[int] = (0, 1),
                 pair_seeds: Sequence[int] = (0,), views: int = 4, size: int = 64, case_seed: int = 0,
                 max_pairs: int | None = None):
        from PIL import Image

        subs = read_subjects(folder)
        self.folder, self.size = Path(folder), size
        self.prompts_per_subject, self.seeds, self.pair_seeds = prompts_per_subject, tuple(seeds), tuple(pair_seeds)
        self.sw = {concept_name(s): s for s in subs}
        self.subjects: dict[str, Subject] = {}
        for name, s in self.sw.items():
            files = sorted((self.folder / name).glob("*.png"))
            if not files:
                raise ValueError(f"{self.folder / name}: no views (NN.png)")
            shown = tuple(np.asarray(Image.open(f).convert("RGB")) for f in files)
            self.subjects[name] = Subject(name, s.category, sw.render(reference_scene(s, size), size)[0], shown,
                                          f"{sw.appearance_phrase(s.appearance)} {s.category}")
        self.cases: dict[str, Case] = {}
        self.jobs: list[Job] = []
        names = list(self.sw)
        for si, name in enumerate(names):
            s = self.sw[name]
            for k in range(prompts_per_subject):
                rng, case = np.random.default_rng([case_seed, 7, si, k]), None
                while case is None:
                    case = _single(rng, s, size, other=k % 2 == 1, name=f"{name}.s{k}")
                self._add(case, "edit", seeds, group=name)
        pairs = [(a, b) for a in names for b in names if a != b and self.sw[a].category != self.sw[b].category]
        for i, (a, b) in enumerate(pairs[:max_pairs]):
            rng, case = np.random.default_rng([case_seed, 8, i]), None
            for _ in range(100):
                case = _pair(rng, self.sw[a], self.sw[b], size, name=f"{a}+{b}")
                if case is not None:
                    break
            if case is None:
                raise RuntimeError(f"no two-subject case for {a} and {b}")
            self._add(case, "two", pair_seeds, group=f"{a}+{b}")
        for name in names:
            s = self.sw[name]
            for v, scene in enumerate(view_scenes(s, views, size, 0)):
                case = Case(f"{name}.v{v}", (s,), scene, case_prompt(scene, 1), (s.category,),
                            (reference_scene(s, size),))
                self._add(case, "views", (0,), group=name)
        self._clip = None

    def shares(self, results: dict, rows_by: dict) -> None:
        """Each method's similarity as a share of the ``named`` row's (what the base renders from words)
        on the same images' prompts, per kind, with a 95% interval over subjects."""
        from customjax.evaluation.report import ratio

        if "named" not in rows_by:
            return
        ref = {r["key"]: r for r in rows_by["named"]}
        for name, rows in rows_by.items():
            for kind, *_ in KINDS:
                kr = [r for r in rows if r["kind"] == kind and r["key"] in ref]
                s = ratio([r["similarity"] for r in kr], [ref[r["key"]]["similarity"] for r in kr], [r["group"] for r in kr])
                if s and kind in results[name]["summary"]:
                    results[name]["summary"][kind]["share"] = s

    def claims(self, rows_by: dict, results: dict) -> list[dict]:
        from customjax.evaluation.stats import paired

        out = []
        for paper, claim, a, b, kind, metrics in CLAIMS:
            if a not in rows_by or b not in rows_by:
                continue
            rb = {r["key"]: r for r in rows_by[b] if r["kind"] == kind}
            both = [(r, rb[r["key"]]) for r in rows_by[a] if r["kind"] == kind and r["key"] in rb]
            for spec in metrics:
                m, not_lower = spec.lstrip("~"), spec.startswith("~")
                pairs = [(x.get(m), y.get(m), x["group"]) for x, y in both if x.get(m) is not None and y.get(m) is not None]
                if not pairs:
                    continue
                d = paired([x for x, _, _ in pairs], [y for _, y, _ in pairs], [g for _, _, g in pairs])
                if not_lower:
                    verdict = "reversed" if d["hi"] < 0 else "holds (no loss shown)"
                else:
                    verdict = "holds" if d["lo"] > 0 else "reversed" if d["hi"] < 0 else "not separated"
                out.append(dict(paper=paper, claim=claim, a=a, b=b, kind=kind, metric=("not lower: " if not_lower else "") + m,
                                difference=d, verdict=verdict, a_label=results[a]["label"], b_label=results[b]["label"]))
        return out

    def markdown(self, r: dict) -> str:
        from customjax.evaluation.report import table
        from customjax.evaluation.stats import fmt

        s = r["settings"]
        lines = ["# One evaluation of every method on ShapeWorld", "",
                 f"{len(s['subjects'])} held-out ShapeWorld subjects ({', '.join(s['subjects'])}); "
                 f"{s['jobs']['edit']} single-subject images ({s['prompts_per_subject']} held-out prompts x seeds {s['seeds']} "
                 f"per subject), {s['jobs']['two']} two-subject images ({s['pairs']} ordered pairs x seeds {s['pair_seeds']}), "
                 f"{s['jobs']['views']} own-view images; text-to-image methods: DDIM {r['steps']} steps, guidance "
                 f"{r['guidance']}; adapters: their configs' sampling"
                 + (f" at {r['adapter_steps']} steps" if r.get("adapter_steps") else "") + ". "
                 f"Device: {r['device']['kind']} ({r['device']['cpus']} CPUs), commit {r['git'].get('commit', '?')[:12]}"
                 + (" (dirty)" if r['git'].get('dirty') else "") + f". Command: `{r['command']}` ({r['seconds']:.0f} s).", "",
                 "Mean [95% bootstrap interval over subjects (two subjects: over ordered pairs)]. Similarity: ShapeWorld's "
                 "exact appearance similarity of the found subject to the subject (0 if not found; two subjects: the mean); "
                 "Share of words: similarity over the `named` row's on the same prompts (what this base renders when the "
                 "appearance is named in words); Placement: the subject found with its category at the named place; "
                 "Controllability: mean of background, placement and other objects correct; Margin: each object's similarity "
                 "to its own subject minus to the other; Swapped: both found, each more like the other subject; CLIP-T: "
                 "the prompt with category words; CLIP-I: mean cosine to the subject's views (the base's own CLIP).", ""]
        for kind, title, cols in KINDS:
            lines += [f"## {title}", ""]
            extra = (("unet_evaluations", "UNet evals / img"), ("seconds_per_image", "s / img"),
                     ("train_seconds_per_concept", "train s / concept")) if kind == "edit" else ()
            lines += table(r["methods"], kind, cols, extra) + [""]
        unsup = [(m["label"], k, why) for m in r["methods"].values() for k, why in m.get("unsupported", {}).items()]
        if unsup:
            lines += ["Not sampled (n/a): " + "; ".join(f"{lab} ({k}): {why.split(': ', 1)[-1]}" for lab, k, why in unsup), ""]
        lines += ["## Cost", "", "Seconds per image: the median over full batches that did not compile (a short batch is padded: "
                  "its padding is the protocol's cost, not the method's); compile: the first batches' excess. "
                  "Training: the run's wall time, and its training loop alone (from its metrics.jsonl: no data generation, "
                  "loading or export); per concept: the loop over the concepts it learnt, an adapter's over the subjects "
                  "evaluated (it is trained once for any number).", "",
                  "| Method | UNet evals / img | s / img | s / img, two subjects | compile s | train wall s | train loop s | "
                  "train s / concept |", "|---|---|---|---|---|---|---|---|"]
        for m in r["methods"].values():
            if m["kind"] == "reference":
                continue
            per = m.get("train_seconds_per_concept")
            per_s = "-" if per is None else (f"{per:.0f} (amortised over {len(s['subjects'])})" if m.get("train_amortised")
                                             else f"{per:.0f}")
            cells = [m.get("unet_evaluations"), m.get("seconds_per_image"), m.get("seconds_per_image_two"),
                     m.get("compile_seconds"), m.get("train_seconds"), m.get("train_loop_seconds")]
            lines.append("| " + " | ".join([m["label"], *("-" if v is None else f"{v:g}" for v in cells), per_s]) + " |")
        if r.get("claims"):
            lines += ["", "## The papers' headline claims on this base", "",
                      "Paired differences (a - b) over the same prompts and seeds, 95% bootstrap interval over subjects / pairs; "
                      "holds: the interval lies above 0; reversed: below; not separated: it covers 0; for a 'not lower' "
                  "claim, holds unless the interval lies below 0 (no loss shown, which is not equality).", "",
                      "| Paper | Claim | a - b | Metric | Difference | Verdict |", "|---|---|---|---|---|---|"]
            for c in r["claims"]:
                lines.append(f"| {c['paper']} | {c['claim']} | {c['a_label']} - {c['b_label']} | {c['metric']} | "
                             f"{fmt(c['difference'])} | {c['verdict']} |")
        return "\n".join(lines) + "\n"

    def plots(self, r: dict, out: Path) -> None:
        from customjax.evaluation.report import frontier

        pts = []
        for name, m in r["methods"].items():
            s = m["summary"].get("edit", {})
            if name == "rendered" or "similarity" not in s or "controllability" not in s:
                continue
            pts.append(dict(label=m["label"], x=s["controllability"], y=s["similarity"],
                            kind="reference" if m.get("group") == "reference" else "method"))
        if pts:
            ceiling = r["methods"].get("rendered", {}).get("summary", {}).get("edit", {}).get("similarity")
            title = "Single subject, held-out prompts: similarity against controllability (95% intervals over subjects)"
            if ceiling:
                title += f"; rendered targets: similarity {ceiling['mean']:.2f} (off the scale)"
            frontier(pts, out / "frontier.png", "controllability (background, placement, other objects)",
                     "similarity to the subject (exact)", title)

    def sheet(self, r: dict, store, path: Path) -> None:
        from customjax.evaluation.report import sample_sheet

        picks, seen = [], set()
        for kind, count in (("edit", 4), ("two", 2), ("views", 1)):
            for j in self.jobs:
                if j.info["kind"] == kind and j.info["group"] not in seen and count > 0:
                    picks.append(j)
                    seen.add(j.info["group"])
                    count -= 1
        rows = []
        for j in picks:
            tiles = [(f"reference {k + 1}", self.subjects[s].reference) for k, s in enumerate(j.subjects)]
            for name, m in r["methods"].items():
                if name == "rendered":
                    tiles.append(("rendered target", self.rendered([j])[0]))
                elif store.has(name, j.key):
                    tiles.append((m["short"], store.image(name, j.key)))
            rows.append(dict(title=f"[{j.info['kind']}] {j.plain} (seed {j.seed})", tiles=tiles))
        sample_sheet(rows, path, min_size=96)

    def settings(self) -> dict:
        from collections import Counter
        kinds = Counter(j.info["kind"] for j in self.jobs)
        return dict(subjects=list(self.subjects), jobs=dict(kinds), prompts_per_subject=self.prompts_per_subject,
                    seeds=list(self.seeds), pair_seeds=list(self.pair_seeds), pairs=len({j.info["group"] for j in self.jobs
                                                                                            if j.info["kind"] == "two"}),
                    size=self.size, folder=str(self.folder))

    @staticmethod
    def write_subjects(out: str | Path, n: int) -> list[Path]:
        return write_subjects(out, n)

    @staticmethod
    def default_base() -> Path:
        from customjax.shapeworld.assets import SHAPEWORLD_BASE
        return Path(SHAPEWORLD_BASE)

    def _add(self, case: Case, kind: str, seeds: Sequence[int], group: str) -> None:
        self.cases[case.name] = case
        t = template_of(case)
        for seed in seeds:
            self.jobs.append(Job(f"{case.name}.{seed}", tuple(concept_name(s) for s in case.subjects), int(seed), t,
                                 case.prompt, dict(kind=kind, case=case.name, group=group)))

    def case(self, job: Job) -> Case:
        return self.cases[job.info["case"]]

    def clip(self, base: str | Path):
        if self._clip is None:
            from types import SimpleNamespace

            from customjax.shapeworld.benchmark.scoring import clip_scorer
            self._clip = clip_scorer(SimpleNamespace(model=SimpleNamespace(path=str(base))))
        return self._clip

    def rendered(self, jobs: Sequence[Job]) -> np.ndarray:
        """The rendered targets of ``jobs`` (the ``reference`` row's images)."""
        return np.stack([sw.render(self.case(j).scene, self.size)[0] for j in jobs])

    def score(self, images: np.ndarray, jobs: Sequence[Job], base: str | Path, method: str = "") -> list[dict]:
        from customjax.shapeworld.benchmark.scoring import _at, clip_scores, score

        rows = []
        for im, j in zip(images, jobs):
            case = self.case(j)
            s = score(im, case)
            r = dict(key=j.key, kind=j.info["kind"], group=j.info["group"], seed=j.seed,
                     similarity=s["similarity"], placement=float(s["position_correct"]), placed_any=float(s["placed_any"]),
                     controllability=s["controllability"], background=float(s["background_correct"]))
            if j.info["kind"] == "two":
                r.update(confusion(im, case))
            rows.append(r)
        scorer, _ = self.clip(base)
        if scorer is not None and len(jobs):
            if getattr(self, "_view_emb", None) is None:          # the subjects' views, embedded once
                self._view_emb = {n: np.asarray(scorer.embed_images(_at(np.stack(s.views), scorer.image_size)))
                                  for n, s in self.subjects.items()}
            emb = self._view_emb
            t, i = clip_scores(scorer, np.asarray(images), [j.plain for j in jobs],
                               [np.concatenate([emb[n] for n in j.subjects]) for j in jobs])
            for r, a, b in zip(rows, t, i):
                r.update(clip_t=float(a), clip_i=float(b))
        return rows


def confusion(image: np.ndarray, case: Case) -> dict:
    """Two subjects' confusion (CLIF on ShapeWorld) in ``case``'s image: :func:`confusion_scores` against the
    prompt's scene with the subjects' appearance left out (objects found by category and place only)."""
    objs = tuple(dataclasses.replace(o, appearance=None) if k < 2 else o for k, o in enumerate(case.spec.objects))
    return confusion_scores(image, sw.Scene(case.scene.background, objs), *case.subjects)[0]


def confusion_scores(image: np.ndarray, spec: sw.Scene, a: sw.Subject, b: sw.Subject) -> tuple[dict, dict]:
    """(scores, the own-reference measurement): the first two objects of ``spec`` scored against their own
    subjects (a, b) and swapped: ``own``, ``other``, ``margin`` = own - other (means over both objects),
    ``both_placed``, ``swapped`` (both found, each more like the other subject)."""
    from customjax.shapeworld.metrics import measure

    m = measure(image, spec, references={0: a, 1: b})
    own = m["objects"][:2]
    other = measure(image, spec, references={0: b, 1: a})["objects"][:2]
    o, x = [r["similarity"] for r in own], [r["similarity"] for r in other]
    return dict(own=float(np.mean(o)), other=float(np.mean(x)), margin=float(np.mean(o) - np.mean(x)),
                both_placed=float(all(r["found"] and r["position_correct"] is not False for r in own)),
                swapped=float(all(r["found"] for r in own) and o[0] < x[0] and o[1] < x[1])), m


def write_subjects(out: str | Path, n: int, views: int = 4) -> list[Path]:
    """Concept folders of ``n`` held-out two-colour subjects (the benchmark's first ones; two colours give
    CLIF's R-Aug regions and a confusion that can show), as every comparison run trains them."""
    from customjax.shapeworld.benchmark.concepts import concept_cases, write_concepts

    subs, k = [], n
    while len(subs) < n:
        k *= 2
        _, found = concept_cases(k)
        subs = [s for s in found if len(s.appearance.colors) == 2][:n]
    return write_concepts(Path(out), subs, views=views)
