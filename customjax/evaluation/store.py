"""The evaluation's sample store: ``ROOT/<method>/<job key>.png`` beside ``<job key>.json`` (its job and
sampling record). An image is written to a temporary name and renamed when complete, its record first,
so a crash or SIGTERM at any point loses no finished image and leaves no half-written one; a rerun
samples only the jobs whose PNG is missing (:meth:`SampleStore.missing`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

_KEY = re.compile(r"^[A-Za-z0-9_.=+-]+$")


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"sample key {key!r}: use letters, digits and _ . = + - only (it names a file)")
    return key


class SampleStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def folder(self, method: str) -> Path:
        return self.root / check_key(method)

    def path(self, method: str, key: str) -> Path:
        return self.folder(method) / f"{check_key(key)}.png"

    def has(self, method: str, key: str) -> bool:
        return self.path(method, key).is_file()

    def missing(self, method: str, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if not self.has(method, k)]

    def put(self, method: str, key: str, image: np.ndarray, record: dict) -> Path:
        """Writes ``image`` (uint8 (H, W, 3)) and ``record`` atomically (record first, then the image)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{method}/{key}: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        path = self.path(method, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = path.with_suffix(".json")
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, meta)
        tmp = path.with_name(path.stem + ".tmp.png")
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
        return path

    def image(self, method: str, key: str) -> np.ndarray:
        return np.asarray(Image.open(self.path(method, key)).convert("RGB"))

    def record(self, method: str, key: str) -> dict:
        return json.loads(self.path(method, key).with_suffix(".json").read_text())

    def log(self, method: str, entry: dict) -> None:
        """Appends one line to ``<method>/timing.jsonl`` (one per sampled batch)."""
        f = self.folder(method) / "timing.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def timings(self, method: str) -> list[dict]:
        f = self.folder(method) / "timing.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
