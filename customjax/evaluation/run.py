"""The evaluation's sampling loop: each method's missing jobs in batches, every finished image stored at
once (:class:`~customjax.evaluation.store.SampleStore`), a progress bar, per-batch timings."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Callable, Sequence

from customjax.evaluation.methods import Job, Unsupported
from customjax.evaluation.store import SampleStore


@contextlib.contextmanager
def stop_on_sigterm():
    """Turns SIGTERM into ``SystemExit(143)`` in the main thread while the block runs, so a preempted
    run stops between images (finished ones are already stored) instead of dying mid-write."""
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    except ValueError:                   # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def batches(jobs: Sequence[Job], group: Callable[[Job], object], size: int) -> list[list[Job]]:
    """``jobs`` grouped by ``group(job)`` (first-seen order), cut into batches of at most ``size``."""
    by: dict = {}
    for j in jobs:
        by.setdefault(group(j), []).append(j)
    return [g[i:i + size] for g in by.values() for i in range(0, len(g), size)]


def run_method(store: SampleStore, name: str, sampler, jobs: Sequence[Job], progress: bool = True,
               say: Callable[[str], None] = print) -> dict:
    """Samples the jobs of ``name`` that the store lacks; returns {"sampled", "unsupported": {job kind: reason}}
    (a batch the method cannot sample: :class:`~customjax.evaluation.methods.Unsupported`).
    A batch's images are stored as soon as it finishes; timings go to the store's ``timing.jsonl``."""
    from tqdm import tqdm

    todo = [j for j in jobs if not store.has(name, j.key)]
    unsupported: dict = {}
    first: set = set()
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=name, unit="img", disable=not progress,
              leave=False) as bar:
        for batch in batches(todo, sampler.group, sampler.batch):
            g = sampler.group(batch[0])
            shape = (len(batch[0].subjects), str(g) if isinstance(g, str) else "")
            t0 = time.time()
            sampler.load_seconds_last = 0.0
            try:
                images = sampler.sample(batch)
            except Unsupported as e:
                unsupported[str(batch[0].info.get("kind", g))] = str(e)
                bar.update(len(batch))
                continue
            load = float(getattr(sampler, "load_seconds_last", 0.0))     # a concept's weights read for this batch
            dt = time.time() - t0 - load
            evals = sampler.evals_per_image(batch[0])
            for j, im in zip(batch, images):
                store.put(name, j.key, im, dict(key=j.key, subjects=list(j.subjects), seed=j.seed,
                                                template=j.template, plain=j.plain, unet_evaluations=evals, **j.info))
            store.log(name, dict(n=len(batch), seconds=round(dt, 3), load_seconds=round(load, 3), first=shape not in first, subjects=len(batch[0].subjects),
                                 time=time.time()))
            first.add(shape)
            bar.update(len(batch))
    for kind, why in unsupported.items():
        say(f"{name}: {kind} jobs not sampled ({why})")
    return dict(sampled=len(todo), unsupported=unsupported)


def timing_summary(entries: Sequence[dict]) -> dict:
    """Seconds per image: the median over full batches (the largest ``n`` logged) that did not compile, so
    a short batch's padding is not the method's cost; ``compile_seconds``: the first batches' excess over
    that. None where no such batch was timed."""
    import numpy as np

    full = max((e["n"] for e in entries), default=0)
    steady = [e["seconds"] / e["n"] for e in entries if not e["first"] and e["n"] == full]
    per = float(np.median(steady)) if steady else None
    firsts = [e["seconds"] - (per or 0.0) * e["n"] for e in entries if e["first"]]
    return dict(seconds_per_image=None if per is None else round(per, 4),
                compile_seconds=round(float(np.sum(firsts)), 2) if firsts and per is not None else None,
                batches=len(entries))
