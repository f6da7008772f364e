"""Method configs (ml_collections), one file per method: ``--config configs/<method>.py:VARIANT[,PRESET...]``.
Importable as a package (``configs.common``); each method file lists ``REAL_VARIANTS``, the variants
that run at the papers' model sizes (traced at those sizes by tests/test_real_sizes.py)."""
