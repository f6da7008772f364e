"""Benchmarks whose logic is importable (the command-line wrappers live in ``benchmarks/``).

The ShapeWorld customization benchmark (``benchmarks/shapeworld_custom.py``):
  * :mod:`.shapeworld`: :func:`~.shapeworld.run_benchmark`, sampling and scoring every setting;
  * :mod:`.cases`: the held-out cases (prompts, references, ground-truth scenes);
  * :mod:`.settings`: the sampling settings (the papers' ablations) and their config overrides;
  * :mod:`.generate`: model loading and batched sampling of the cases;
  * :mod:`.scoring`: exact controllability / similarity scores and CLIP-T / CLIP-I;
  * :mod:`.report`: ``results.json``, markdown tables, the frontier plot and the sample grid.

Every benchmark (also ``benchmarks/dual_branch.py``, ``benchmarks/train_step.py``) records its git
commit and dirty flag with :func:`.provenance.git_state`.
"""
