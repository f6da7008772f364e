"""Benchmarks whose logic is importable (the command-line wrappers live in ``benchmarks/``).

:mod:`.shapeworld`: the ShapeWorld customization benchmark (cases, settings, scoring, report).
"""
