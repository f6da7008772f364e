"""The evaluated methods behind one sampling interface.

A method list is JSON (``--methods FILE``): a list of objects, each with ``name`` (a file-safe key),
``label`` and ``kind``:

  * ``"adapter"``: ``config`` (a config spec, e.g. ``configs/realcustompp.py:shapeworld``) and
    ``checkpoint`` (its export); sampled with the config's own sampler settings and one reference image
    per subject; ``two_overrides``: config overrides for two-subject prompts (default: one reference per
    target word, ``{"guidance": {"references": "many2many"}}``; ``overrides`` likewise, nested as
    :func:`customjax.api.load_config` takes them);
  * ``"concepts"``: ``export``, a ``customjax.finetune`` export folder: one sub-folder per subject (named
    as the subject) or one joint export (``concept.json`` with ``"concepts"``: CLIF); sampled with
    text-to-image and each subject's learnt phrase. Two subjects in one prompt need a joint export or
    per-concept exports that hold only words (Textual Inversion); a per-concept UNet (DreamBooth, Custom
    Diffusion, Contrastive Inversion's K / V) cannot be combined: :class:`Unsupported`;
  * ``"text"``: the base with a phrase per subject that the protocol names (``phrase``: ``"class"``, the
    class word; ``"named"``, the subject's appearance in words where the protocol has it);
  * ``"reference"``: a row the protocol computes without sampling (ShapeWorld: the rendered targets).

``train``: ``{"record": JSON file with "seconds"}`` or ``{"seconds": N}`` (wall time), optionally
``"metrics"`` (the run's ``metrics.jsonl``: the training loop's own time), and ``"concepts"``: how many
concepts that run learnt (fine-tuning: device time per concept = seconds / concepts; an adapter's cost
is amortised over the subjects evaluated). Relative paths are relative to the method file's folder's
repository root (the current directory by default).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KINDS = ("adapter", "concepts", "text", "reference")


class Unsupported(Exception):
    """The method cannot sample this kind of job (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """One evaluated subject: ``id`` (its concept folder / export sub-folder name), class word,
    ``reference`` (uint8 (H, W, 3): the one image an adapter is given), ``views`` (uint8 images: what
    CLIP-I / DINO-I compare with), ``described`` (the appearance named in words, or None)."""

    id: str
    cls: str
    reference: np.ndarray
    views: tuple[np.ndarray, ...]
    described: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One image: ``template`` has ``{0}`` (``{1}``) where each subject's phrase goes (an adapter's is its
    class word, a concept's its learnt phrase); ``plain``: the prompt with class words (CLIP-T's text)."""

    key: str
    subjects: tuple[str, ...]
    seed: int
    template: str
    plain: str
    info: dict = dataclasses.field(default_factory=dict)

    def prompt(self, phrases: Sequence[str]) -> str:
        return self.template.format(*phrases)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    kind: str
    config: str = ""
    checkpoint: str = ""
    export: str = ""
    phrase: str = "class"
    overrides: dict = dataclasses.field(default_factory=dict)
    two_overrides: dict = dataclasses.field(default_factory=lambda: {"guidance": {"references": "many2many"}})
    train: dict = dataclasses.field(default_factory=dict)
    paper: str = ""
    group: str = ""
    short: str = ""          # the label under a sample sheet's tile (default: label)

    def loop_seconds(self) -> float | None:
        """The training loop's own seconds from ``train.metrics`` (a ``metrics.jsonl``: the fine-tuner's
        per-record ``seconds``, or the adapter trainer's ``steps_per_s`` over each record's steps): no
        data generation, model loading or export."""
        path = (self.train or {}).get("metrics")
        if not path:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"method {self.name}: train.metrics {path} does not exist")
        total, last = 0.0, 0
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if "seconds" in r and "stage" in r:
                total += float(r["seconds"])
            elif r.get("steps_per_s") and "step" in r and "status" not in r:
                total += (int(r["step"]) - last) / float(r["steps_per_s"])
                last = int(r["step"])
        return round(total, 1)

    def train_seconds(self) -> float | None:
        t = self.train or {}
        if "seconds" in t:
            return float(t["seconds"])
        if "record" in t:
            path = Path(t["record"])
            if not path.is_file():
                raise FileNotFoundError(f"method {self.name}: train.record {path} does not exist")
            return float(json.loads(path.read_text())["seconds"])
        return None


_FIELDS = {f.name for f in dataclasses.fields(MethodSpec)}


def read_methods(path: str | Path, root: str | Path | None = None, only: Sequence[str] | None = None) -> list[MethodSpec]:
    """The method list in ``path`` (see the module docstring); paths are made absolute against ``root``
    (default: the current directory). ``only``: keep these names (an unknown one is an error)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON method list ({e})") from e
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of methods")
    root = Path(root or ".").resolve()
    out = []
    for i, d in enumerate(raw):
        label = d.get("name", "?") if isinstance(d, dict) else repr(d)
        where = f"{path} entry {i} ({label})"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; fields: {sorted(_FIELDS)}")
        for k in ("name", "label", "kind"):
            if not d.get(k):
                raise ValueError(f"{where}: missing {k!r}")
        if d["kind"] not in KINDS:
            raise ValueError(f"{where}: kind {d['kind']!r}, expected one of {KINDS}")
        if not re.match(r"^[A-Za-z0-9_.+-]+$", d["name"]):
            raise ValueError(f"{where}: name {d['name']!r} must be file-safe (letters, digits, _ . + -)")
        need = {"adapter": ("config",), "concepts": ("export",)}.get(d["kind"], ())
        for k in need:
            if not d.get(k):
                raise ValueError(f"{where}: kind {d['kind']!r} needs {k!r}")
        d = dict(d)
        for k in ("checkpoint", "export"):
            if d.get(k):
                d[k] = str(root / d[k])
        if d.get("config") and not Path(d["config"].split(":")[0]).is_absolute():
            d["config"] = str(root / d["config"])
        if isinstance(d.get("train"), dict):
            d["train"] = {k: str(root / v) if k in ("record", "metrics") else v for k, v in d["train"].items()}
        out.append(MethodSpec(**d))
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: method name(s) {dup} appear more than once")
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"{path}: no method(s) {missing}; the file has {names}")
        out = [m for m in out if m.name in only]
    return out


# ---------------------------------------------------------------------------------------------------------
# Samplers: ``sample(jobs) -> uint8 (n, H, W, 3)``; ``group(job)``: jobs of one group share a batch.


class AdapterSampler:
    """An adapter export through :class:`customjax.api.Customizer` (its config's sampler, guidance and
    batch); two-subject jobs through a second Customizer on the same model with ``two_overrides``."""

    def __init__(self, spec: MethodSpec, subjects: dict[str, Subject], steps: int | None = None):
        from customjax.api import Customizer, load_config

        self.spec, self.subjects = spec, subjects
        cfg = with_steps(load_config(spec.config, **spec.overrides), steps)
        self.one = Customizer.from_config(cfg, spec.checkpoint or None)
        self._two = None
        self.batch = max(int(self.one.config.sample.batch), 1)

    def two(self):
        if self._two is None:
            from customjax.api import Customizer
            cfg = self.one.config.copy_and_resolve_references()
            for k, v in self.spec.two_overrides.items():
                if k not in cfg or not isinstance(v, dict):
                    raise ValueError(f"method {self.spec.name}: two_overrides key {k!r} must be a config section "
                                     f"with a dict of its keys (sections: {sorted(cfg.keys())})")
                for sub, x in v.items():
                    if sub not in cfg[k]:
                        raise KeyError(f"method {self.spec.name}: unknown config key {k}.{sub} in two_overrides")
                    cfg[k][sub] = x
            self._two = Customizer(cfg, self.one.built, self.one.checkpoint)
        return self._two

    def group(self, job: Job) -> Any:
        return len(job.subjects)

    def evals_per_image(self, job: Job) -> int:
        from customjax.sampling.dual_branch import unet_evaluations
        c = self.one if len(job.subjects) == 1 else self.two()
        return unet_evaluations(c.guidance, c.config.sample.steps)

    def sample(self, jobs: Sequence[Job]) -> np.ndarray:
        from customjax.images import to_uint8

        cust = self.one if len(jobs[0].subjects) == 1 else self.two()
        subs = [[self.subjects[s] for s in j.subjects] for j in jobs]
        prompts = [j.prompt([s.cls for s in ss]) for j, ss in zip(jobs, subs)]
        try:
            cases = cust.check(prompts, [[s.reference for s in ss] for ss in subs], [[s.cls for s in ss] for ss in subs])
        except Exception as e:       # a prompt or reference this method's sampler refuses
            raise Unsupported(f"{self.spec.name}: {e}") from e
        for c, j in zip(cases, jobs):
            c["seeds"] = [int(j.seed)]
        return to_uint8(np.asarray(cust.sample_cases(cases).images))


class TextSampler:
    """Text-to-image on a (possibly concept-loaded) base: CFG DDIM, batches padded to one shape."""

    def __init__(self, pipe, params, steps: int, guidance: float, batch: int = 8, sampler: str = "ddim"):
        self.pipe, self.params, self.steps, self.guidance, self.batch, self.kind = pipe, params, steps, guidance, batch, sampler

    def evals_per_image(self, job: Job | None = None) -> int:
        return self.steps * (1 if self.guidance == 1.0 else 2)

    def images(self, pipe, params, prompts: list[str], seeds: list[int]) -> np.ndarray:
        from customjax.images import to_uint8
        from customjax.sampling.common import seed_latents
        from customjax.sampling.t2i import txt2img

        f = pipe.vae_scale
        size = pipe.unet.config.sample_size * f
        lat = seed_latents([int(s) for s in seeds], (size // f, size // f, pipe.unet.config.in_channels))
        n = len(prompts)
        prompts = list(prompts) + [prompts[-1]] * (self.batch - n)
        lat = np.concatenate([lat, np.repeat(lat[-1:], self.batch - n, 0)])
        out = txt2img(pipe, params, prompts, None, steps=self.steps, guidance=self.guidance, sampler=self.kind,
                      height=size, width=size, latents=lat)
        return to_uint8(np.asarray(out)[:n])


class PhraseSampler(TextSampler):
    """The base with a phrase per subject chosen by the protocol (``spec.phrase``)."""

    def __init__(self, spec: MethodSpec, subjects: dict[str, Subject], pipe, params, **kw):
        super().__init__(pipe, params, **kw)
        self.spec, self.subjects = spec, subjects
        if spec.phrase not in ("class", "named"):
            raise ValueError(f"method {spec.name}: phrase {spec.phrase!r}, expected 'class' or 'named'")

    def group(self, job: Job) -> Any:
        return 0

    def phrase(self, s: Subject) -> str:
        if self.spec.phrase == "class":
            return s.cls
        if s.described is None:
            raise Unsupported(f"{self.spec.name}: subject {s.id} has no appearance in words")
        return s.described

    def sample(self, jobs: Sequence[Job]) -> np.ndarray:
        prompts = [j.prompt([self.phrase(self.subjects[s]) for s in j.subjects]) for j in jobs]
        return self.images(self.pipe, self.params, prompts, [j.seed for j in jobs])


class ConceptSampler(TextSampler):
    """Fine-tuned concepts (``spec.export``): per-concept sub-folders or one joint export."""

    def __init__(self, spec: MethodSpec, subjects: dict[str, Subject], pipe, params, **kw):
        from customjax.concepts.export import read_concept_meta

        super().__init__(pipe, params, **kw)
        self.spec, self.subjects = spec, subjects
        root = Path(spec.export)
        if not root.is_dir():
            raise FileNotFoundError(f"method {spec.name}: export folder {root} does not exist")
        self.joint = (root / "concept.json").is_file() and "concepts" in read_concept_meta(root)
        have = set(read_concept_meta(root)["concepts"]) if self.joint else {p.name for p in root.iterdir()
                                                                            if (p / "concept.json").is_file()}
        missing = sorted(set(subjects) - have)
        if missing:
            raise FileNotFoundError(f"method {spec.name}: {root} has no concept for subject(s) {missing} "
                                    f"(it has {sorted(have)})")
        self._loaded: dict = {}

    def group(self, job: Job) -> Any:
        """One group (one loaded model) per concept; every several-subject prompt of per-concept words in one
        group (all the words under their own placeholders in one table); a joint export is one group."""
        if self.joint:
            return "joint"
        return "words" if len(job.subjects) > 1 else job.subjects

    def _load(self, key):
        if key not in self._loaded:
            t0 = time.time()
            self._loaded.clear()                        # one model in memory at a time (DreamBooth: a UNet each)
            self._loaded[key] = self._make(key)
            self.load_seconds_last = time.time() - t0   # not sampling time (the run loop logs it apart)
        return self._loaded[key]

    def _make(self, key):
        """(pipe, params, {subject: phrase}) for a group key. Concepts of one export share a widened pipeline
        (one per learnt word, one for two words together), so the sampler compiles once, not per concept."""
        from customjax.concepts.export import concept_params, load_concept, read_concept_meta
        root = Path(self.spec.export)
        if self.joint:
            pipe, params, meta = load_concept(self.pipe, self.params, root)
            return pipe, params, {n: c["phrase"] for n, c in meta["concepts"].items()}
        if key == "words":
            return self._words_together(sorted(self.subjects))
        if len(key) == 1:
            token = read_concept_meta(root / key[0])["token"]
            pipe = self._wide(("one", token), lambda: self._widen([token]))
            params, meta = concept_params(pipe, self.params, root / key[0])
            return pipe, params, {key[0]: meta["phrase"]}
        return self._words_together(key)

    def _wide(self, key, make):
        if not hasattr(self, "_pipes"):
            self._pipes = {}
        if key not in self._pipes:
            self._pipes[key] = make()
        return self._pipes[key]

    def _widen(self, tokens: list[str]):
        """The base pipeline reading ``tokens`` as new words (rows after the vocabulary)."""
        import copy

        from customjax.concepts.tokens import add_placeholders, wider_pipe

        tok = copy.deepcopy(self.pipe.tokenizers[0])
        vocab = self.pipe.text_encoders[0].config.vocab_size
        if len(tok) != vocab or add_placeholders(tok, tokens) != list(range(vocab, vocab + len(tokens))):
            raise ValueError(f"{self.spec.name}: cannot add {tokens} after the base's {vocab} tokens")
        return dataclasses.replace(wider_pipe(self.pipe, len(tokens)), tokenizers=(tok,) + tuple(self.pipe.tokenizers[1:]))

    def _words_together(self, ids):
        """Per-concept exports that hold only a word each: every concept's word under its own placeholder
        (``<w0>``, ``<w1>``, ...), all in one table, so any two of them share a prompt and a batch."""
        from customjax.concepts.export import read_concept_meta
        from customjax.concepts.files import load_token_file
        from customjax.concepts.tokens import with_table

        root = Path(self.spec.export)
        metas = [read_concept_meta(root / i) for i in ids]
        for i, m in zip(ids, metas):
            if m.get("model") or m.get("kv_file") or not m.get("token_file"):
                what = "UNet" if m.get("model") else "cross-attention K / V" if m.get("kv_file") else "weights"
                raise Unsupported(f"{self.spec.name}: its concepts were fine-tuned one at a time, each with its own "
                                  f"{what} (e.g. {i}); two of them cannot be sampled in one image (a joint export can)")
        tokens = [f"<w{k}>" for k in range(len(ids))]
        pipe = self._wide(("words", len(ids)), lambda: self._widen(tokens))
        rows, phrases = [], {}
        for i, m, tok in zip(ids, metas, tokens):
            words = load_token_file(root / i / m["token_file"])
            if list(words) != [m["token"]]:
                raise Unsupported(f"{self.spec.name}: concept {i} has {len(words)} learnt words; only one-word concepts "
                                  "are combined")
            rows.append(np.asarray(words[m["token"]])[0])
            phrases[i] = m["phrase"].replace(m["token"], tok)
        vocab = self.pipe.text_encoders[0].config.vocab_size
        return pipe, with_table(self.params, np.stack(rows), vocab), phrases

    def sample(self, jobs: Sequence[Job]) -> np.ndarray:
        pipe, params, phrases = self._load(self.group(jobs[0]))
        prompts = [j.prompt([phrases[s] for s in j.subjects]) for j in jobs]
        return self.images(pipe, params, prompts, [j.seed for j in jobs])


def with_steps(cfg, steps: int | None):
    """``cfg`` with ``steps`` sampling steps, T_stop rescaled in proportion (None: unchanged)."""
    if not steps or steps == cfg.sample.steps:
        return cfg
    c = cfg.copy_and_resolve_references()
    if c.guidance.get("t_stop"):
        c.guidance.t_stop = max(1, round(c.guidance.t_stop * steps / c.sample.steps))
    c.sample.steps = steps
    return c


def make_sampler(spec: MethodSpec, subjects: dict[str, Subject], base: tuple | None, steps: int, guidance: float,
                 batch: int = 8, adapter_steps: int | None = None):
    """The sampler of ``spec`` (``base``: (pipe, params) of the base model, for text-to-image kinds;
    ``adapter_steps``: override an adapter config's sampling steps, e.g. for a quick run)."""
    t0 = time.time()
    if spec.kind == "adapter":
        s = AdapterSampler(spec, subjects, adapter_steps)
    elif spec.kind == "concepts":
        s = ConceptSampler(spec, subjects, *base, steps=steps, guidance=guidance, batch=batch)
    elif spec.kind == "text":
        s = PhraseSampler(spec, subjects, *base, steps=steps, guidance=guidance, batch=batch)
    else:
        raise ValueError(f"method {spec.name}: kind {spec.kind!r} is not sampled")
    s.load_seconds = round(time.time() - t0, 2)
    return s
