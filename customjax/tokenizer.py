"""CLIP tokenization of prompts and the token positions of a word in a prompt.

Tokenizers load from a diffusers ``tokenizer/`` (or SDXL ``tokenizer_2/``) folder through
transformers' CLIP tokenizer (the fast, ``tokenizers``-backed one; no torch). Both SDXL
tokenizers share vocabulary and merges but pad differently: ``tokenizer/`` with
``<|endoftext|>``, ``tokenizer_2/`` (OpenCLIP bigG) with ``!`` (id 0). Word positions come from
character offsets, never from searching ids, so they do not depend on the pad token.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np
from transformers import CLIPTokenizerFast

# Larger than this means tokenizer_config.json did not set model_max_length (transformers then
# reports int(1e30)).
_MAX_SANE_LENGTH = 1 << 20


def load_tokenizer(path: str | pathlib.Path) -> CLIPTokenizerFast:
    """The CLIP tokenizer in a diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt`` or
    ``tokenizer.json``, with ``tokenizer_config.json`` setting ``model_max_length``)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
    if tokenizer.model_max_length > _MAX_SANE_LENGTH:
        raise ValueError(f"{path}: tokenizer_config.json does not set model_max_length (77 for CLIP)")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizerFast, prompts: str | Sequence[str]) -> np.ndarray:
    """Token ids ``(B, model_max_length)`` int32: BOS, the prompt, EOS, then pad tokens; prompts
    longer than that are truncated to keep the EOS (as the diffusers pipelines do)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="np"
    )["input_ids"]
    return ids.astype(np.int32)


def _word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of ``word`` in ``prompt`` as a whole word, case-insensitive; the words of a
    multi-word ``word`` may be separated by any whitespace."""
    parts = word.split()
    if not parts:
        raise ValueError(f"cannot look up the empty word {word!r} in prompt {prompt!r}")
    # [^\W_] is a letter or digit: the match may not continue a longer word on either side.
    pattern = r"(?<![^\W_])" + r"\s+".join(map(re.escape, parts)) + r"(?![^\W_])"
    return [m.span() for m in re.finditer(pattern, prompt, re.IGNORECASE)]


def span_token_positions(tokenizer: CLIPTokenizerFast, prompt: str, spans: Sequence[tuple[int, int]]
                         ) -> list[list[int]]:
    """For each character span of ``prompt``, the indices in ``tokenize(tokenizer, prompt)[0]`` (BOS
    at 0) of the tokens it overlaps; ``[]`` for a span that truncation cuts (even partly)."""
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    kept_end = max(end for _, end in offsets)  # special tokens have empty (0, 0) offsets
    return [[k for k, (ts, te) in enumerate(offsets) if te > ts and ts < e and s < te] if e <= kept_end else []
            for s, e in spans]


def word_token_positions(tokenizer: CLIPTokenizerFast, prompt: str, word: str) -> list[int]:
    """Indices in ``tokenize(tokenizer, prompt)[0]`` (BOS at 0) of the tokens of every whole-word
    occurrence of ``word`` in ``prompt``, ascending.

    An occurrence that truncation cuts (even partly) does not count; a ``ValueError`` naming the
    prompt and the word is raised when no occurrence is left.
    """
    spans = _word_spans(prompt, word)
    if not spans:
        raise ValueError(f"word {word!r} does not occur as a whole word in prompt {prompt!r}")
    kept = sorted({k for ks in span_token_positions(tokenizer, prompt, spans) for k in ks})
    if not kept:
        raise ValueError(
            f"word {word!r} occurs in prompt {prompt!r} only past the tokenizer's "
            f"{tokenizer.model_max_length}-token limit, where the prompt is truncated"
        )
    return kept


def word_token_mask(tokenizer: CLIPTokenizerFast, prompts: Sequence[str], words: str | Sequence[str]) -> np.ndarray:
    """Boolean ``(B, model_max_length)`` mask of ``word_token_positions`` for each prompt, with one
    word per prompt or one word for all."""
    words = [words] * len(prompts) if isinstance(words, str) else list(words)
    if len(words) != len(prompts):
        raise ValueError(f"got {len(words)} words for {len(prompts)} prompts")
    mask = np.zeros((len(prompts), tokenizer.model_max_length), bool)
    for b, (prompt, word) in enumerate(zip(prompts, words)):
        mask[b, word_token_positions(tokenizer, prompt, word)] = True
    return mask


def word_masks(tokenizer: CLIPTokenizerFast, prompts: Sequence[str], words: Sequence[Sequence[str]]) -> np.ndarray:
    """Boolean ``(B, J, model_max_length)`` masks: ``[b, j]`` is :func:`word_token_mask` of the j-th
    of the J target words of prompt b (every prompt with J words)."""
    if len(words) != len(prompts):
        raise ValueError(f"got word lists for {len(words)} prompts, and {len(prompts)} prompts")
    counts = {len(ws) for ws in words}
    if len(counts) > 1:
        raise ValueError(f"every prompt needs the same number of target words, got {sorted(counts)}")
    J = counts.pop() if counts else 0
    if J == 0:
        return np.zeros((len(prompts), 0, tokenizer.model_max_length), bool)
    return np.stack([word_token_mask(tokenizer, prompts, [ws[j] for ws in words]) for j in range(J)], axis=1)


# ----------------------------------------------------------------------------------------------
# A character-level CLIP tokenizer (tests, random pipelines, folders of configs alone)

VOCAB = 2 * 256 + 2   # bytes, bytes + "</w>", BOS, EOS


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in character for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_char_tokenizer(folder: str | os.PathLike, pad: str = "<|endoftext|>") -> None:
    """A character-level CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": VOCAB - 2, "<|endoftext|>": VOCAB - 1})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad)))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad)))
