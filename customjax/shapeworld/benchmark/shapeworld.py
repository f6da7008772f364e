"""The ShapeWorld customization benchmark (issue 6): held-out subjects in new contexts, every
sampling setting of the papers' ablations, exact scores, a report. :func:`run_benchmark` samples
and scores every setting; the parts:

  * :mod:`customjax.shapeworld.benchmark.cases`: the held-out cases, their prompts and references;
  * :mod:`customjax.shapeworld.benchmark.settings`: the sampling settings and their config overrides;
  * :mod:`customjax.shapeworld.benchmark.generate`: model loading and batched sampling;
  * :mod:`customjax.shapeworld.benchmark.scoring`: the exact scores and CLIP-T / CLIP-I;
  * :mod:`customjax.shapeworld.benchmark.report`: JSON, markdown, plot and sample grid.
"""

from __future__ import annotations

import time
from typing import Sequence

from customjax.shapeworld.benchmark.cases import make_cases
from customjax.shapeworld.benchmark.generate import generate, load_model
from customjax.provenance import CompileCounter, git_state
from customjax.shapeworld.benchmark.scoring import (CONTROLLABILITY, METRICS, UNIT, clip_scorer, clip_scores, mask_scores,
                                         reference_embeddings, score)
from customjax.shapeworld.benchmark.settings import SETTING_NAMES, SETTINGS, model_settings, setting_config
from customjax.shapeworld import world as sw
from customjax.shapeworld.metrics import summarise

def run_benchmark(cfg, *, checkpoint: str | None, apply_variant, settings: Sequence[str] = SETTING_NAMES,
                  rc_cfg=None, rc_checkpoint: str | None = None, cases: int = 20, prompts_per_subject: int = 2,
                  pairs: int = 10, case_seed: int = 0, seeds: Sequence[int] = (0, 1), batch: int | None = None,
                  progress: bool = True, models: Sequence[tuple[str, object, str | None]] = ()) -> tuple[dict, dict]:
    """Samples and scores every setting: (the report, JSON-ready; the images, cases and per-setting image
    indices for :func:`customjax.shapeworld.benchmark.report.write_report`). ``apply_variant``: the config's
    (``configs/common.py``, :func:`~customjax.shapeworld.benchmark.settings.config_apply_variant`).
    ``models``: further trained models ``(name, config, checkpoint)``, each sampled as its config gives
    (:func:`~customjax.shapeworld.benchmark.settings.model_settings`)."""
    import jax
    from tqdm import tqdm

    from customjax.base_model import first_tokenizer
    from customjax.methods.build import guidance_config
    from customjax.parallel import data_mesh
    from customjax.sampling.cases import check_case
    from customjax.sampling.dual_branch import unet_evaluations

    t_start = time.time()
    # each setting samples one method: the main config's, or the second config's (--realcustom_config)
    configs = {cfg.method: cfg}
    if rc_cfg is not None:
        if rc_cfg.method in configs:
            raise ValueError(f"--realcustom_config builds {rc_cfg.method!r}, as --config does; give another method")
        configs[rc_cfg.method] = rc_cfg
    size = cfg.sample.height
    if cfg.sample.width != size:
        raise ValueError("the benchmark needs square images (sample.height == sample.width)")
    unknown = [s for s in settings if s not in SETTING_NAMES]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTING_NAMES)}")
    chosen = [s for s in SETTINGS if s.name in settings]
    notes = [f"{s.name}: skipped (no config of method {s.method!r})" for s in chosen if s.method not in configs]
    chosen = [s for s in chosen if s.method in configs]
    if rc_cfg is not None and (rc_cfg.sample.height, rc_cfg.model.path) != (size, cfg.model.path):
        raise ValueError("--realcustom_config must use the same base model and image size as --config")
    further, extra = tuple(models), {}
    for name, mcfg, _ in further:
        if name in configs or name in SETTING_NAMES or name in extra:
            raise ValueError(f"--model {name}: the name is taken (a method or a setting); choose another")
        if (mcfg.sample.height, mcfg.model.path) != (size, cfg.model.path):
            raise ValueError(f"--model {name}: it must use the same base model and image size as --config")
        configs[name] = mcfg
        extra.update({s.name: s for s in model_settings(name, mcfg)})
    chosen += list(extra.values())
    two_subject = [s.name for s in chosen if s.subjects == 2]
    single, two = make_cases(cases, case_seed, size, prompts_per_subject=prompts_per_subject,
                             pairs=pairs if two_subject else 0)
    if two_subject and not two:
        notes.append(f"{', '.join(two_subject)}: skipped (no two-subject cases: --pairs 0)")
        chosen = [s for s in chosen if s.subjects == 1]

    # Resolve every setting; identical (method, sampler config, mask, subjects) are sampled once.
    plan, first = [], {}
    for s in chosen:
        if s.name in extra:      # a further model: its config as trained and given (its presets are no ablation)
            c = configs[s.method].copy_and_resolve_references()
            c.guidance.update(dict(s.guidance))
            c.sample.record_masks = False
        else:
            c = setting_config(configs[s.method], s, apply_variant)
        gcfg = guidance_config(c)
        key = (s.method, gcfg, float(s.init_mask), s.subjects, s.described, s.layout)
        plan.append((s, c, gcfg, first.setdefault(key, s.name)))
    # Every case must suit every setting's sampler (target words survive tokenization, one reference
    # per word), before anything loads or compiles. The RealCustom model shares the base (tokenizer).
    tokenizer = first_tokenizer(cfg)
    for s, c, gcfg, _ in plan:
        for case in (two if s.subjects == 2 else single):
            check_case(dict(prompt=case.described_prompt if s.described else case.prompt, words=list(case.words),
                            references=[f"{case.name}_ref{j}" for j in range(len(case.references))]),
                       tokenizer, gcfg.references, f"case {case.name} ({s.name})")

    # the ceiling: the rendered target scenes, scored like the samples; their subjects' own masks as masks
    def truth(case):
        image, masks = sw.render(case.scene, size)
        return {**score(image, case), **mask_scores(masks[:len(case.subjects)].astype("float32"), case)}
    ground_truth = {str(k): summarise([truth(c) for c in pool], UNIT) for k, pool in ((1, single), (2, two)) if pool}
    mesh = data_mesh()
    ndev = mesh.shape["data"]
    checkpoints = {cfg.method: checkpoint, **({} if rc_cfg is None else {rc_cfg.method: rc_checkpoint}),
                   **{name: ck for name, _, ck in further}}
    models = {m: load_model(configs[m], checkpoints[m], mesh) for m in dict.fromkeys(s.method for s, *_ in plan)}
    scorer, clip_note = clip_scorer(cfg)
    notes.append(clip_note)
    ref_embeds = {} if scorer is None else {c.name: reference_embeddings(scorer, c, size) for c in single + two}
    total = sum(len(two if s.subjects == 2 else single) * len(seeds) for s, _, _, same in plan if same == s.name)

    results, images, index, entries = {}, {}, {}, {}
    with tqdm(total=total, desc="benchmark", unit="img", disable=not progress) as bar:
        for s, c, gcfg, same in plan:
            pool = two if s.subjects == 2 else single
            entry = dict(name=s.name, group=s.group, label=s.label, method=s.method, ablations=list(s.ablations),
                         overrides=dict(s.guidance), init_mask=s.init_mask, subjects=s.subjects,
                         described=s.described, layout=s.layout,
                         guidance=c.guidance.to_dict(),
                         unet_evaluations_per_image=unet_evaluations(gcfg, c.sample.steps),
                         same_as=None if same == s.name else same)
            if same != s.name:
                entries[s.name] = {**entry, **{k: entries[same][k] for k in ("summary", "seconds", "compiled")}}
                results[s.name], images[s.name], index[s.name] = results[same], images[same], index[same]
                continue
            bar.set_postfix_str(s.name)
            jobs = [(case, seed) for case in pool for seed in seeds]
            bsz = min(batch or c.sample.batch, len(jobs))
            bsz += -bsz % ndev
            t0 = time.time()
            with CompileCounter("dual_branch_sample") as compiles:
                imgs, masks = generate(models[s.method], gcfg, jobs, s.init_mask, bsz, mesh, size, bar.update,
                                       described=s.described, layout=s.layout)
            seconds = time.time() - t0
            recs = [dict(setting=s.name, case=case.name, seed=int(seed), **score(im, case), mask_mean=float(mk.mean()),
                         **(mask_scores(mk, case) if s.own_masks else {}))
                    for (case, seed), im, mk in zip(jobs, imgs, masks)]
            if scorer is not None:
                ct, ci = clip_scores(scorer, imgs, [case.prompt for case, _ in jobs],
                                     [ref_embeds[case.name] for case, _ in jobs])
                for r, a, b in zip(recs, ct, ci):
                    r.update(clip_t=float(a), clip_i=float(b))
            summary = summarise([{k: r[k] for k in METRICS if k in r} for r in recs], UNIT)
            entries[s.name] = {**entry, "summary": summary, "seconds": round(seconds, 2),
                               "compiled": compiles.count > 0}
            results[s.name], images[s.name] = recs, imgs
            index[s.name] = {}
            for i, (case, _) in enumerate(jobs):
                index[s.name].setdefault(case.name, i)   # the case's first seed
    dev = jax.devices()[0]
    report = dict(
        benchmark="shapeworld_custom", config=cfg.to_dict(), checkpoint=checkpoint,
        realcustom_config=None if rc_cfg is None else rc_cfg.to_dict(), realcustom_checkpoint=rc_checkpoint,
        models=[dict(name=n, config=c.to_dict(), checkpoint=ck) for n, c, ck in further],
        device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count()), **git_state(),
        jax=jax.__version__, steps=cfg.sample.steps, sampler=cfg.sample.sampler, image_size=size,
        seeds=[int(s) for s in seeds], case_seed=case_seed, prompts_per_subject=prompts_per_subject,
        definition=CONTROLLABILITY, notes=notes, ground_truth=ground_truth, seconds=round(time.time() - t_start, 1),
        settings=list(entries.values()), cases=[c.to_dict() for c in single + two],
        images=[r for e in entries.values() if e["same_as"] is None for r in results[e["name"]]])
    return report, dict(images=images, index=index, single=single, two=two, seeds=list(seeds))
