"""The training loader of a method config: the sources it names (or its precomputed latents) through
:func:`~customjax.data.loader.make_loader`, wrapped in a :class:`~customjax.data.loader.TrainLoader`."""

from __future__ import annotations

from customjax.data import curriculum
from customjax.data.loader import TrainLoader, _pair, make_loader, train_sources


def make_train_loader(config, reference_size: int | None = None, *, process_index: int | None = None,
                      process_count: int | None = None, needs: tuple[str, ...] = ()) -> TrainLoader:
    """The training :class:`TrainLoader` from a method config (``configs/common.py`` ``add_train``).

    Reads ``config.data`` (the sources of :func:`train_sources`, or ``latents``: a folder written by
    ``python -m customjax.data.precompute`` read instead of them (see ``make_loader(latents=True)``);
    ``recipe`` a :func:`curriculum.recipe` preset (Table X rows); ``workers``; optional ``min_size``,
    ``reference_size``, ``shuffle``, ``random_crop``, ``hflip``, ``subject_reference``), ``config.train`` (``batch`` global,
    ``image_size``, ``steps``) and ``config.seed``. ``needs``: the method's batch entries (with ``"mask"``
    the target's subject mask is read, as for ``objective.subject_weight > 0``). The reference side: ``config.data.reference_size``
    if set, else ``reference_size`` (the method's, :func:`customjax.methods.build.reference_size`).
    """
    d = config.data
    latents = bool(d.get("latents", ""))
    if latents:
        from customjax.data import precompute   # lazily: `python -m customjax.data.precompute` imports this module

        sources = precompute.latent_sources(d.latents, image_size=_pair(config.train.image_size))
    else:
        sources = train_sources(config)
    rec = curriculum.recipe(d.get("recipe", "curriculum"))
    reference_size = d.get("reference_size", None) or reference_size
    if not reference_size:
        raise ValueError("make_train_loader: give reference_size (the method's) or set config.data.reference_size")
    ds = make_loader(
        {k: v for k, v in sources.items() if k in rec.needs}, global_batch_size=int(config.train.batch),
        image_size=config.train.image_size, reference_size=int(reference_size), total_steps=int(config.train.steps),
        recipe=rec, seed=int(config.seed), num_workers=int(d.get("workers", 0)), process_index=process_index,
        process_count=process_count, shuffle=bool(d.get("shuffle", True)), min_size=int(d.get("min_size", 0)),
        random_crop=bool(d.get("random_crop", False)), hflip=bool(d.get("hflip", True)), latents=latents,
        subject_reference=bool(d.get("subject_reference", False)),
        with_mask="mask" in needs or float(config.get("objective", {}).get("subject_weight", 0.0)) > 0)
    return TrainLoader(ds)
