"""One evaluation for every method: trained adapters and fine-tuned concepts on one base, fixed seeds.

    python -m customjax.evaluate --methods benchmarks/comparison/shapeworld.json --out docs/comparison
    python -m customjax.evaluate --protocol dreambench --methods my_methods.json --subjects dreambooth/dataset \
        --base /path/to/sd15 --clip /path/to/clip-vit-large-patch14 --dino /path/to/dino-vits16 --out eval/
    python -m customjax.evaluate --fast --out /tmp/eval      # plumbing: 2 subjects, 4 steps (the test suite's)

``--methods``: a JSON list of methods (:mod:`customjax.evaluation.methods`): adapter exports with their
config, ``customjax.finetune`` concept exports, text-only rows. Protocols:

  * ``shapeworld`` (:mod:`customjax.shapeworld.benchmark.comparison`): held-out ShapeWorld subjects in new
    contexts, two subjects, and their own views, scored exactly (similarity, placement, controllability,
    confusion) and with the base's CLIP; the rendered targets as the ceiling row;
  * ``dreambench`` (:mod:`customjax.evaluation.dreambench`): a DreamBench-layout subjects folder, CLIP-T,
    CLIP-I, DINO-I (and with masks the segmented R- / E- variants).

Per method: the protocol's scores (mean [95% bootstrap interval over subjects / subject pairs]), UNet
evaluations per image, sampling seconds per image (batches that did not compile; compile time apart) and
training device time (per concept for fine-tuning; an adapter's amortised over the subjects evaluated).
Writes ``--out``: ``results.json`` (settings, summaries, claims), ``rows.jsonl`` (every image's scores),
``results.md``,
``frontier.png`` and ``samples.png``; the images go to ``--samples`` (default ``OUT/samples``):
``<method>/<key>.png`` and its record, so a rerun samples only what is missing and a crash or SIGTERM
loses no finished image.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from customjax.cli import fail, parse_flags

FLAGS = flags.FLAGS
PROG = "customjax.evaluate"
ROOT = Path(__file__).resolve().parents[1]


# Every option and its default (the CLI's flags; api.evaluate's keyword arguments).
DEFAULTS = {
    "protocol": "shapeworld",
    "methods": None,
    "only": [],
    "samples": None,
    "out": None,
    "subjects": None,
    "base": None,
    "steps": None,
    "guidance": None,
    "batch": 8,
    "adapter_steps": None,
    "score_only": False,
    "fast": False,
    "progress": True,
    "prompts_per_subject": 4,
    "seeds": ["0", "1"],
    "pair_seeds": ["0"],
    "max_pairs": None,
    "prompts": None,
    "clip": None,
    "clip_tokenizer": None,
    "dino": None,
    "images_per_prompt": 4,
    "prompt_limit": None,
    "live_classes": ["cat", "dog"],
    "sample_masks": None,
}


def define_flags() -> None:
    from customjax.evaluation.protocols import PROTOCOLS

    flags.DEFINE_enum("protocol", DEFAULTS["protocol"], sorted(PROTOCOLS), "evaluation protocol "
                      "(customjax.evaluation.protocols)")
    flags.DEFINE_string("methods", DEFAULTS["methods"], "JSON list of methods (default for shapeworld: benchmarks/comparison/shapeworld.json; "
                        "with --fast: a plumbing list written under --out)")
    flags.DEFINE_list("only", DEFAULTS["only"], "evaluate only these method names")
    flags.DEFINE_string("samples", DEFAULTS["samples"], "the sample store (default OUT/samples): one PNG and record per image")
    flags.DEFINE_string("out", DEFAULTS["out"], "output folder (samples/, results.json, results.md, frontier.png, samples.png)")
    flags.DEFINE_string("subjects", DEFAULTS["subjects"], "subjects folder (shapeworld: concept folders of held-out subjects; "
                        "dreambench: DreamBench's dataset/ layout)")
    flags.DEFINE_string("base", DEFAULTS["base"], "base model folder for text-to-image methods (default: the ShapeWorld base)")
    flags.DEFINE_integer("steps", DEFAULTS["steps"], "text-to-image sampling steps (default 25 on ShapeWorld, 50 on DreamBench)")
    flags.DEFINE_float("guidance", DEFAULTS["guidance"], "text-to-image guidance (default 5.0 on ShapeWorld, 7.5 on DreamBench)")
    flags.DEFINE_integer("batch", DEFAULTS["batch"], "text-to-image batch")
    flags.DEFINE_integer("adapter_steps", DEFAULTS["adapter_steps"], "override the adapters' sampling steps (T_stop rescaled)")
    flags.DEFINE_bool("score_only", DEFAULTS["score_only"], "do not sample: score the images already stored")
    flags.DEFINE_bool("fast", DEFAULTS["fast"], "plumbing: 2 subjects, 1 prompt each, 1 pair, 4 steps (adapters too)")
    flags.DEFINE_bool("progress", DEFAULTS["progress"], "progress bars")
    # ShapeWorld
    flags.DEFINE_integer("prompts_per_subject", DEFAULTS["prompts_per_subject"], "shapeworld: held-out prompts per subject")
    flags.DEFINE_list("seeds", DEFAULTS["seeds"], "shapeworld: seeds of each single-subject prompt")
    flags.DEFINE_list("pair_seeds", DEFAULTS["pair_seeds"], "shapeworld: seeds of each two-subject prompt")
    flags.DEFINE_integer("max_pairs", DEFAULTS["max_pairs"], "shapeworld: at most this many ordered subject pairs")
    # DreamBench
    flags.DEFINE_string("prompts", DEFAULTS["prompts"], "dreambench: prompt list (default SUBJECTS/prompts_and_classes.txt)")
    flags.DEFINE_string("clip", DEFAULTS["clip"], "dreambench: CLIPModel folder for CLIP-T / CLIP-I")
    flags.DEFINE_string("clip_tokenizer", DEFAULTS["clip_tokenizer"], "dreambench: tokenizer folder when --clip has no tokenizer files")
    flags.DEFINE_string("dino", DEFAULTS["dino"], "dreambench: ViTModel folder for DINO-I (facebook/dino-vits16)")
    flags.DEFINE_integer("images_per_prompt", DEFAULTS["images_per_prompt"], "dreambench: images per subject and prompt")
    flags.DEFINE_integer("prompt_limit", DEFAULTS["prompt_limit"], "dreambench: only the first N prompts")
    flags.DEFINE_list("live_classes", DEFAULTS["live_classes"], "dreambench: classes that take the live-subject prompts")
    flags.DEFINE_string("sample_masks", DEFAULTS["sample_masks"], "dreambench: masks of the samples, DIR/<method>/<key>.png (segmented scores)")


# ---------------------------------------------------------------------------------------------------------


def fast_methods(out: Path, subjects: Path, base: Path) -> Path:
    """The ``--fast`` plumbing list: the base's rows, the rendered targets, and a one-word concept export per
    subject written here (random rows; single and two-subject concept paths). Adapters: ``--methods``."""
    from customjax.concepts.files import save_token_file
    from customjax.pipeline import load_stable_diffusion

    pipe, _ = load_stable_diffusion(base, abstract=True)
    width = pipe.text_encoders[0].config.hidden_size
    exports = out / "fast_exports"
    rng = np.random.default_rng(0)
    for d in sorted(p for p in subjects.iterdir() if p.is_dir()):
        e = exports / d.name
        e.mkdir(parents=True, exist_ok=True)
        save_token_file(e / "learned_embeds.safetensors", {"<s*>": 0.01 * rng.standard_normal((1, width))})
        cls = json.loads((d / "concept.json").read_text())["class"]
        (e / "concept.json").write_text(json.dumps({"method": "textual_inversion", "token": "<s*>", "phrase": "<s*>",
                                                    "class": cls, "token_file": "learned_embeds.safetensors"}))
    methods = [
        {"name": "named", "label": "base, appearance named in words", "kind": "text", "phrase": "named", "group": "reference"},
        {"name": "class", "label": "base, class word", "kind": "text", "phrase": "class", "group": "reference"},
        {"name": "rendered", "label": "rendered targets", "kind": "reference", "group": "reference"},
        {"name": "ti", "label": "word (random rows)", "kind": "concepts", "export": str(exports), "group": "fine-tuning",
         "train": {"seconds": 1.0, "concepts": 2}},
    ]
    path = out / "fast_methods.json"
    path.write_text(json.dumps(methods, indent=1))
    return path


def make_protocol(a, out: Path):
    from customjax.evaluation.protocols import load_protocol

    cls = load_protocol(a.protocol)
    if a.protocol == "shapeworld":
        subjects = Path(a.subjects) if a.subjects else None
        if a.fast and subjects is None:
            subjects = out / "fast_subjects"
            cls.write_subjects(subjects, 2)
        if subjects is None:
            subjects = ROOT / "runs" / "comparison" / "concepts"
        kw = dict(prompts_per_subject=1, seeds=(0,), pair_seeds=(0,), views=1, max_pairs=1) if a.fast else dict(
            prompts_per_subject=a.prompts_per_subject, seeds=[int(s) for s in a.seeds],
            pair_seeds=[int(s) for s in a.pair_seeds], max_pairs=a.max_pairs)
        return cls(subjects, **kw)
    if not a.subjects:
        raise ValueError("--protocol dreambench needs --subjects (a DreamBench-layout folder)")
    if not a.clip and not a.dino:
        raise ValueError("--protocol dreambench needs --clip and / or --dino (Hugging Face model folders)")
    return cls(a.subjects, prompts=a.prompts, clip=a.clip, clip_tokenizer=a.clip_tokenizer, dino=a.dino,
               images_per_prompt=a.images_per_prompt, prompt_limit=a.prompt_limit, live_classes=a.live_classes,
               sample_masks=a.sample_masks)


def evaluate(a, say=print) -> dict:
    """Samples what is missing, scores everything stored, writes the report; returns it."""
    from customjax.evaluation import report as rep
    from customjax.evaluation.methods import make_sampler, read_methods
    from customjax.evaluation.run import run_method, stop_on_sigterm, timing_summary
    from customjax.evaluation.store import SampleStore

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    proto = make_protocol(a, out)
    base = Path(a.base) if a.base else proto.default_base()
    steps = a.steps or (4 if a.fast else proto.steps)
    guidance = a.guidance or proto.guidance
    adapter_steps = 4 if a.fast and not a.adapter_steps else a.adapter_steps
    methods_file = Path(a.methods) if a.methods else (fast_methods(out, proto.folder, base) if a.fast
                                                      else ROOT / "benchmarks" / "comparison" / "shapeworld.json")
    methods = read_methods(methods_file, root=ROOT, only=a.only or None)
    store = SampleStore(Path(a.samples) if getattr(a, "samples", None) else out / "samples")
    base_model = None
    records = {}
    with stop_on_sigterm():
        for m in methods:
            if m.kind == "reference":
                continue
            known = store.folder(m.name) / "unsupported.json"      # job kinds this method cannot sample
            skip = json.loads(known.read_text()) if known.is_file() else {}
            jobs = [j for j in proto.jobs if j.info.get("kind") not in skip]
            if a.score_only or not store.missing(m.name, [j.key for j in jobs]):
                continue
            if m.kind in ("text", "concepts") and base_model is None:
                from customjax.pipeline import load_stable_diffusion
                base_model = load_stable_diffusion(base)
            say(f"{m.name}: sampling {len(store.missing(m.name, [j.key for j in jobs]))} image(s)")
            sampler = make_sampler(m, proto.subjects, base_model, steps, guidance, a.batch, adapter_steps)
            records[m.name] = run_method(store, m.name, sampler, jobs, progress=a.progress, say=say)
            known.write_text(json.dumps({**skip, **records[m.name]["unsupported"]}))
            del sampler
    # scores
    results, rows_by = {}, {}
    for m in methods:
        if m.kind == "reference":
            jobs = [j for j in proto.jobs if j.info["kind"] in proto.reference_kinds]
            images = proto.rendered(jobs)
            evals = None
        else:
            jobs = [j for j in proto.jobs if store.has(m.name, j.key)]
            images = np.stack([store.image(m.name, j.key) for j in jobs]) if jobs else np.zeros((0, 1, 1, 3), np.uint8)
            evs = sorted({store.record(m.name, j.key)["unet_evaluations"] for j in jobs})
            evals = evs[0] if len(evs) == 1 else (evs or None)
        rows = proto.score(images, jobs, base, m.name) if jobs else []
        rows_by[m.name] = rows
        unsup = {}
        f = store.folder(m.name) / "unsupported.json"
        if f.is_file():
            unsup = json.loads(f.read_text())
        kinds = {}
        for kind, *_ in proto.kinds:
            kr = [r for r in rows if r["kind"] == kind]
            if kr:
                kinds[kind] = rep.summarise(kr, proto.metrics)
        t = {}
        if m.kind != "reference":
            timed = store.timings(m.name)
            t = timing_summary([e for e in timed if e.get("subjects", 1) == 1])
            t["seconds_per_image_two"] = timing_summary([e for e in timed if e.get("subjects", 1) == 2])["seconds_per_image"]
        train, loop = m.train_seconds(), m.loop_seconds()
        n_concepts = (m.train or {}).get("concepts") or len(proto.subjects)
        basis = loop if loop is not None else train
        per_concept = None if basis is None else basis / n_concepts
        results[m.name] = dict(label=m.label, short=m.short or m.label, kind=m.kind, group=m.group, paper=m.paper, summary=kinds,
                               unsupported=unsup, unet_evaluations=evals, train_seconds=train, train_loop_seconds=loop,
                               train_seconds_per_concept=None if per_concept is None else round(per_concept, 1),
                               train_amortised=m.kind == "adapter", images=len(rows), **t)
    proto.shares(results, rows_by)
    from customjax.provenance import git_state
    rpt = dict(protocol=proto.name, settings=proto.settings(), steps=steps, guidance=guidance,
               adapter_steps=adapter_steps, base=str(base), methods_file=str(methods_file), fast=bool(a.fast),
               command=command_line(a), device=_device(), git=git_state(),
               seconds=round(time.time() - t_start, 1), methods=results)
    rpt["claims"] = proto.claims(rows_by, results)
    (out / "results.json").write_text(json.dumps(rpt, indent=1))
    with open(out / "rows.jsonl", "w") as f:              # every image's scores, one line each
        for name, rows in rows_by.items():
            for r in rows:
                f.write(json.dumps(dict(method=name, **{k: round(v, 5) if isinstance(v, float) else v
                                                          for k, v in r.items()})) + "\n")
    (out / "results.md").write_text(proto.markdown(rpt))
    proto.plots(rpt, out)
    proto.sheet(rpt, store, out / "samples.png")
    say(f"wrote {out / 'results.md'} ({rpt['seconds']:.0f} s)")
    return rpt


def command_line(a) -> str:
    """The command that repeats ``a`` (its options that differ from the defaults)."""
    def flag(k, v):
        if isinstance(v, bool):
            return f"--{k}" if v else f"--no{k}"
        return f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
    return " ".join(["python -m customjax.evaluate"] + [flag(k, getattr(a, k)) for k in DEFAULTS
                                                         if getattr(a, k, DEFAULTS[k]) != DEFAULTS[k]])


def options(**kw):
    """The options of :func:`evaluate` (:data:`DEFAULTS` with ``kw``; an unknown name is an error)."""
    from types import SimpleNamespace

    unknown = sorted(set(kw) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown evaluate option(s) {unknown}; options: {sorted(DEFAULTS)}")
    return SimpleNamespace(**{**DEFAULTS, **kw})


def _device() -> dict:
    import platform

    import jax
    d = jax.devices()[0]
    return dict(platform=d.platform, kind=d.device_kind, count=len(jax.devices()), cpus=os.cpu_count(),
                machine=platform.machine())


def main(argv) -> None:
    del argv
    if not FLAGS.out:
        fail(PROG, "give --out (the results folder)")
    try:
        evaluate(FLAGS)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(PROG, str(e).strip("'\""))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags(PROG, ()))
