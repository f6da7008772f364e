"""customjax.tokenizer on a tiny CLIP BPE vocabulary written by the tests (no downloads)."""

import json
import string

import numpy as np
import pytest
from transformers import CLIPTokenizer

from customjax.tokenizer import load_tokenizer, tokenize, word_token_mask, word_token_positions

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's layout: single characters, the same with the end-of-word mark, merged tokens, specials.
CHARS = list("!'.,") + list(string.ascii_lowercase)
MERGES = ["t o", "to y</w>", "t e", "te d", "ted d", "tedd y", "tedd y</w>"]
MERGES += ["b e", "be a", "bea r</w>", "r e", "re d</w>"]


def write_vocab(folder):
    vocab = {c: i for i, c in enumerate(CHARS)}  # "!" is id 0, as in CLIP
    for tok in [c + "</w>" for c in CHARS] + [m.replace(" ", "") for m in MERGES] + [BOS, EOS]:
        vocab[tok] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """SD / SDXL ``tokenizer/`` (saved by transformers) and SDXL ``tokenizer_2/`` (the files of
    the published folder: vocab, merges and configs, padding with "!")."""
    root = tmp_path_factory.mktemp("model")
    write_vocab(root / "raw")
    raw = CLIPTokenizer(str(root / "raw" / "vocab.json"), str(root / "raw" / "merges.txt"), model_max_length=77)
    raw.save_pretrained(root / "tokenizer")
    write_vocab(root / "tokenizer_2")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"}
    (root / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (root / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def clip(folders):
    return load_tokenizer(folders / "tokenizer")


@pytest.fixture(scope="module")
def bigg(folders):
    return load_tokenizer(folders / "tokenizer_2")


def tokens_at(tok, prompt, positions):
    return tok.convert_ids_to_tokens(tokenize(tok, prompt)[0, positions].tolist())


def test_tokenize_pads_and_truncates(clip, bigg):
    eos = clip.convert_tokens_to_ids(EOS)
    for tok, pad in ((clip, eos), (bigg, 0)):
        ids = tokenize(tok, ["a toy", "a " * 100])
        assert ids.shape == (2, 77) and ids.dtype == np.int32
        assert tok.convert_ids_to_tokens(ids[0, :4].tolist()) == [BOS, "a</w>", "toy</w>", EOS]
        assert (ids[0, 4:] == pad).all()
        assert ids[1, 0] == clip.convert_tokens_to_ids(BOS) and ids[1, 76] == eos
        assert tok.convert_ids_to_tokens(ids[1, 1:76].tolist()) == ["a</w>"] * 75
    assert tokenize(clip, "a toy").shape == (1, 77)


def test_sdxl_tokenizers_differ_only_in_padding(clip, bigg):
    a, b = tokenize(clip, "a red teddybear"), tokenize(bigg, "a red teddybear")
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert (a[:, 6:] == clip.convert_tokens_to_ids(EOS)).all() and (b[:, 6:] == 0).all()
    assert clip.pad_token_id != bigg.pad_token_id == 0


def test_single_and_multi_token_words(clip):
    assert word_token_positions(clip, "a toy on a bear", "toy") == [2]
    assert tokens_at(clip, "a toy on a bear", [2]) == ["toy</w>"]
    assert word_token_positions(clip, "a teddybear", "teddybear") == [2, 3]
    assert tokens_at(clip, "a teddybear", [2, 3]) == ["teddy", "bear</w>"]
    assert word_token_positions(clip, "a red  teddy\tbear", "teddy bear") == [3, 4]
    assert tokens_at(clip, "a red  teddy\tbear", [3, 4]) == ["teddy</w>", "bear</w>"]


def test_every_occurrence_case_insensitive_whole_words(clip):
    prompt = "A Toy, a TOY and a teddybear's bear."
    positions = word_token_positions(clip, prompt, "toy")
    assert positions == word_token_positions(clip, prompt, "TOY") == [2, 5]
    # "bear" inside "teddybear" is not the word bear; "teddybear's" is the word teddybear
    bear = word_token_positions(clip, prompt, "bear")
    assert len(bear) == 1 and tokens_at(clip, prompt, bear) == ["bear</w>"] and bear[0] > 10
    assert tokens_at(clip, prompt, word_token_positions(clip, prompt, "teddybear")) == ["teddy", "bear</w>"]


def test_missing_word_raises(clip):
    with pytest.raises(ValueError, match=r"word 'toy' does not occur .* prompt 'a toys box'"):
        word_token_positions(clip, "a toys box", "toy")
    with pytest.raises(ValueError, match="word 'bear'.*'a teddybear'"):
        word_token_positions(clip, "a teddybear", "bear")
    with pytest.raises(ValueError, match="empty word"):
        word_token_positions(clip, "a toy", " ")


def test_truncation(clip):
    # BOS + 73 "a" puts teddy at 74 and bear at 75, the last position before the EOS
    assert word_token_positions(clip, "a " * 73 + "teddybear", "teddybear") == [74, 75]
    # one more "a" and "bear" is cut: the occurrence no longer counts
    with pytest.raises(ValueError, match=r"word 'teddybear' occurs in prompt .* past .* 77-token limit"):
        word_token_positions(clip, "a " * 74 + "teddybear", "teddybear")
    assert word_token_positions(clip, "toy " + "a " * 80 + "toy", "toy") == [1]


def test_positions_agree_across_pad_tokens(clip, bigg):
    """The "!" that pads tokenizer_2 is a special token there; a "!" in the prompt must shift
    nothing, and padding must never be taken for the word."""
    prompts = ["wow! a toy!", "a red teddybear! red toy"]
    words = ["toy", "red"]
    for prompt, word in zip(prompts, words):
        assert word_token_positions(clip, prompt, word) == word_token_positions(bigg, prompt, word)
    mask = word_token_mask(bigg, prompts, words)
    np.testing.assert_array_equal(mask, word_token_mask(clip, prompts, words))
    assert mask.shape == (2, 77) and mask.dtype == bool
    assert np.flatnonzero(mask[0]).tolist() == [6] and np.flatnonzero(mask[1]).tolist() == [2, 6]
    assert tokens_at(bigg, prompts[0], [6]) == ["toy</w>"]
    assert tokens_at(bigg, prompts[1], [2, 6]) == ["red</w>", "red</w>"]


def test_word_token_mask_broadcasts_one_word(clip):
    mask = word_token_mask(clip, ["a toy", "toy toy"], "toy")
    assert np.flatnonzero(mask[0]).tolist() == [2] and np.flatnonzero(mask[1]).tolist() == [1, 2]
    with pytest.raises(ValueError, match="got 1 words for 2 prompts"):
        word_token_mask(clip, ["a toy", "a toy"], ["toy"])


def test_load_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    write_vocab(tmp_path / "no_length")
    with pytest.raises(ValueError, match="no_length: tokenizer_config.json does not set model_max_length"):
        load_tokenizer(tmp_path / "no_length")
