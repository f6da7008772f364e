"""A CLIP-style BPE tokenizer trained on a caption corpus with the ``tokenizers`` library and saved
as ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``), so that
:func:`customjax.tokenizer.load_tokenizer` (transformers' ``CLIPTokenizerFast``) reads it exactly
as it reads Stable Diffusion's tokenizer folder.

CLIP's layout is kept: ids 0-255 are the byte alphabet, 256-511 the same with the end-of-word
suffix ``</w>``, then the learned merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (also the
pad token, as in SD-1.5), so any text tokenizes, and the world's words are single tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from customjax.tokenizer import _bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(captions: Iterable[str], folder: str | os.PathLike, *, max_merges: int = 2000,
                    model_max_length: int = 32) -> Path:
    """Learns up to ``max_merges`` BPE merges on the lower-cased, whitespace-split ``captions``
    and writes the CLIP tokenizer files into ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) * 2 + max_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=2)
    tok.train_from_iterator(captions, trainer)
    learned = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + len(alphabet) for i, c in enumerate(alphabet)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=model_max_length, **special), indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder

