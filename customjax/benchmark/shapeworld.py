"""The ShapeWorld customization benchmark (issue 6): held-out subjects in new contexts, every
sampling setting of the papers' ablations, exact scores, a report. :func:`run_benchmark` samples
and scores every setting; the parts:

  * :mod:`customjax.benchmark.cases`: the held-out cases, their prompts and references;
  * :mod:`customjax.benchmark.settings`: the sampling settings and their config overrides;
  * :mod:`customjax.benchmark.generate`: model loading and batched sampling;
  * :mod:`customjax.benchmark.scoring`: the exact scores and CLIP-T / CLIP-I;
  * :mod:`customjax.benchmark.report`: JSON, markdown, plot and sample grid.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

from customjax.benchmark.cases import make_cases
from customjax.benchmark.generate import generate, load_model
from customjax.benchmark.scoring import CONTROLLABILITY, METRICS, clip_scorer, clip_scores, score
from customjax.benchmark.settings import SETTING_NAMES, SETTINGS, setting_config
from customjax.data import shapeworld as sw
from customjax.metrics.shapeworld import summarise


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(commit=commit, dirty=dirty)


def run_benchmark(cfg, *, checkpoint: str | None, ablations: Mapping, settings: Sequence[str] = SETTING_NAMES,
                  rc_cfg=None, rc_checkpoint: str | None = None, cases: int = 20, prompts_per_subject: int = 2,
                  pairs: int = 10, case_seed: int = 0, seeds: Sequence[int] = (0, 1), batch: int | None = None,
                  progress: bool = True) -> tuple[dict, dict]:
    """Samples and scores every setting: (the report, JSON-ready; the images and cases for
    :func:`customjax.benchmark.report.write_report`)."""
    import jax
    from tqdm import tqdm

    from customjax.methods.build import guidance_config
    from customjax.parallel import data_mesh
    from customjax.sampling.dual_branch import dual_branch_sample, unet_evaluations
    from customjax.tokenizer import word_token_positions

    t_start = time.time()
    if cfg.method != "realcustompp":
        raise ValueError(f"--config must be a RealCustom++ config (method {cfg.method!r})")
    if rc_cfg is not None and rc_cfg.method != "realcustom":
        raise ValueError(f"--realcustom_config must be a RealCustom config (method {rc_cfg.method!r})")
    size = cfg.sample.height
    if cfg.sample.width != size:
        raise ValueError("the benchmark needs square images (sample.height == sample.width)")
    unknown = [s for s in settings if s not in SETTING_NAMES]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTING_NAMES)}")
    chosen = [s for s in SETTINGS if s.name in settings]
    notes = []
    if rc_cfg is None and any(s.method == "realcustom" for s in chosen):
        notes.append("realcustom: skipped (no --realcustom_config)")
        chosen = [s for s in chosen if s.method != "realcustom"]
    if rc_cfg is not None and (rc_cfg.sample.height, rc_cfg.model.path) != (size, cfg.model.path):
        raise ValueError("--realcustom_config must use the same base model and image size as --config")
    single, two = make_cases(cases, case_seed, size, prompts_per_subject=prompts_per_subject,
                             pairs=pairs if any(s.subjects == 2 for s in chosen) else 0)
    if not two:
        chosen = [s for s in chosen if s.subjects == 1]

    # the ceiling: the rendered target scenes, scored like the samples
    ground_truth = {str(k): summarise([{m: v for m, v in score(sw.render(c.scene, size)[0], c).items()
                                        if v is not None} for c in pool])
                    for k, pool in ((1, single), (2, two)) if pool}
    mesh = data_mesh()
    ndev = mesh.shape["data"]
    models = {"realcustompp": load_model(cfg, checkpoint, mesh)}
    if any(s.method == "realcustom" for s in chosen):
        models["realcustom"] = load_model(rc_cfg, rc_checkpoint, mesh)
    for m in models.values():   # every target word must survive tokenization, before anything compiles
        for case in single + two:
            for w in case.words:
                word_token_positions(m.built.pipe.tokenizers[0], case.prompt, w)
    scorer, clip_note = clip_scorer(cfg)
    notes.append(clip_note)

    # Resolve every setting; identical (method, sampler config, mask, subjects) are sampled once.
    plan, first = [], {}
    for s in chosen:
        base = cfg if s.method == "realcustompp" else rc_cfg
        c = setting_config(base, s, ablations)
        gcfg = guidance_config(c)
        key = (s.method, gcfg, float(s.init_mask), s.subjects)
        plan.append((s, c, gcfg, first.setdefault(key, s.name)))
    total = sum(len(two if s.subjects == 2 else single) * len(seeds) for s, _, _, same in plan if same == s.name)

    results, images, entries = {}, {}, []
    with tqdm(total=total, desc="benchmark", unit="img", disable=not progress) as bar:
        for s, c, gcfg, same in plan:
            pool = two if s.subjects == 2 else single
            entry = dict(name=s.name, group=s.group, label=s.label, method=s.method, ablations=list(s.ablations),
                         overrides=dict(s.guidance), init_mask=s.init_mask, subjects=s.subjects,
                         guidance=c.guidance.to_dict(),
                         unet_evaluations_per_image=unet_evaluations(gcfg, c.sample.steps),
                         same_as=None if same == s.name else same)
            if same != s.name:
                entries.append({**entry, **{k: v for k, v in next(e for e in entries if e["name"] == same).items()
                                            if k in ("summary", "seconds", "compiled")}})
                results[s.name], images[s.name] = results[same], images[same]
                continue
            bar.set_postfix_str(s.name)
            jobs = [(case, seed) for case in pool for seed in seeds]
            bsz = min(batch or c.sample.batch, len(jobs))
            bsz += -bsz % ndev
            cache0 = dual_branch_sample._cache_size()
            t0 = time.time()
            imgs, masks = generate(models[s.method], gcfg, jobs, s.init_mask, bsz, mesh, size, bar.update)
            seconds = time.time() - t0
            recs = []
            for (case, seed), im, mk in zip(jobs, imgs, masks):
                recs.append(dict(setting=s.name, case=case.name, seed=int(seed), **score(im, case),
                                 mask_mean=float(mk.mean())))
            if scorer is not None:
                ct, ci = clip_scores(scorer, imgs, [case for case, _ in jobs], size)
                for r, a, b in zip(recs, ct, ci):
                    r.update(clip_t=float(a), clip_i=float(b))
            summary = summarise([{k: r[k] for k in METRICS if r.get(k) is not None} for r in recs])
            entries.append({**entry, "summary": summary, "seconds": round(seconds, 2),
                            "compiled": dual_branch_sample._cache_size() > cache0})
            results[s.name], images[s.name] = recs, imgs
    dev = jax.devices()[0]
    report = dict(
        benchmark="shapeworld_custom", config=cfg.to_dict(), checkpoint=checkpoint,
        realcustom_config=None if rc_cfg is None else rc_cfg.to_dict(), realcustom_checkpoint=rc_checkpoint,
        device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count()), **_git(),
        jax=jax.__version__, steps=cfg.sample.steps, sampler=cfg.sample.sampler, image_size=size,
        seeds=[int(s) for s in seeds], case_seed=case_seed, prompts_per_subject=prompts_per_subject,
        definition=CONTROLLABILITY, notes=notes, ground_truth=ground_truth, seconds=round(time.time() - t_start, 1),
        settings=entries, cases=[c.to_dict() for c in single + two], images=[r for s in entries if s["same_as"] is None
                                                            for r in results[s["name"]]])
    return report, dict(images=images, single=single, two=two, seeds=list(seeds))
