"""Preview cases of the training run (no compilation here; tests/test_train_run.py runs the preview
sampler in a tiny training run): subject words guessed from captions, cases from the first batch
and from a sample-CLI JSONL file."""

import json
from pathlib import Path

import numpy as np
import pytest

import train_probe
from customjax.base_model import first_tokenizer
from customjax.preview import cases_from_batch, cases_from_file, subject_word

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("caption,word", [
    ("a red circle on a blue background", "circle"),
    ("an orange hexagon on a white background", "hexagon"),
    ("a photo of a dog on the grass", "dog"),
    ("A close-up picture of the old teddy bear, sitting on a bench", "bear"),
    ("cat", "cat"),
    ("on the table", "table"),
    ("", None),
])
def test_subject_word(caption, word):
    assert subject_word(caption) == word


def test_cases_from_batch_and_file(tmp_path):
    tok = first_tokenizer(train_probe.tiny_config())
    batch = {"caption": np.array(["a red circle on a blue background", "", "a photo of a dog on grass"]),
             "reference": np.random.default_rng(0).uniform(0, 1, (3, 56, 56, 3)).astype(np.float32)}
    c = cases_from_batch(batch, tok, count=3, ref_size=28, seed=5)
    assert c.prompts == [batch["caption"][0], batch["caption"][2]] and c.words == [["circle"], ["dog"]]
    assert c.references.shape == (2, 1, 28, 28, 3) and c.seeds == [5, 6]

    lines = [json.loads(l) for l in (ROOT / "examples/cases.jsonl").read_text().splitlines() if l.strip()]
    for l in lines:
        l["references"] = [str(ROOT / r) for r in l["references"]]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(l) for l in lines))
    c = cases_from_file(str(cases), tok, "many2many", count=3, ref_size=56)
    one_word = [l for l in lines if len(l["words"]) == 1][:3]   # cases with another word count are left out
    assert c.prompts == [l["prompt"] for l in one_word] and c.seeds == [l["seeds"][0] for l in one_word]
    assert c.references.shape == (len(one_word), 1, 56, 56, 3) and 0 <= c.references.min() and c.references.max() <= 1
    from customjax.sampling.cases import CaseError

    cases.write_text(json.dumps({"prompt": "a cat", "words": ["toy"], "references": lines[0]["references"]}))
    with pytest.raises(CaseError, match="'toy'"):
        cases_from_file(str(cases), tok, "many2many", count=3, ref_size=56)
    with pytest.raises(CaseError, match="no such file"):       # read as the sample CLI does
        cases_from_file(str(tmp_path / "none.jsonl"), tok, "many2many", count=3, ref_size=56)
    cases.write_text("{not json\n")
    with pytest.raises(CaseError, match=f"{cases}:1: not JSON"):
        cases_from_file(str(cases), tok, "many2many", count=3, ref_size=56)
