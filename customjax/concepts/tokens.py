"""Learnt words: placeholder tokens added to a CLIP tokenizer, whose input embeddings live outside
the frozen text encoder's table (Textual Inversion's S*, Contrastive Inversion's S* and A_i*).

A placeholder gets the id ``vocab + k`` (transformers' ``add_tokens``); the text encoder reads row k
of a separate table ``rows`` (K, D) at such ids (:func:`encode_with_rows`), so the rows can train
while the encoder stays frozen, and a loaded token file only appends rows (:mod:`customjax.concepts.files`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np



def base_vocab(tokenizer) -> int:
    """The tokenizer's vocabulary before any added placeholder (its base ``vocab_size``)."""
    return int(tokenizer.vocab_size)


def add_placeholders(tokenizer, names: Sequence[str]) -> list[int]:
    """Adds ``names`` to ``tokenizer`` as whole tokens (in place; adding one again is a no-op) and
    returns their ids. A name the base vocabulary already splits into its own word is refused: its
    meaning would leak into the learnt word."""
    vocab = tokenizer.get_vocab()
    for n in names:
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"placeholder token {n!r}: one non-empty word without spaces, e.g. '<s*>'")
        if n in vocab and vocab[n] < base_vocab(tokenizer) or f"{n}</w>" in vocab:
            raise ValueError(f"placeholder token {n!r} is already a word of the tokenizer; pick a new one, e.g. '<{n}>'")
    tokenizer.add_tokens(list(names))
    ids = tokenizer.convert_tokens_to_ids(list(names))
    return [int(i) for i in ids]


def init_rows(tokenizer, table: np.ndarray, words: Sequence[str]) -> np.ndarray:
    """(K, D): each row the mean input embedding of ``words[k]``'s tokens in the base ``table``
    (Textual Inversion's initializer token); an empty word draws from the table's row statistics."""
    rows = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"] if w else []
        ids = [i for i in ids if i < table.shape[0]]
        if w and not ids:
            raise ValueError(f"initializer word {w!r} has no token in the base vocabulary")
        rows.append(table[ids].mean(0) if ids else table.mean(0))
    return np.stack(rows).astype(np.float32)


def row_index(ids: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(ids with placeholders set to 0, where (B, T) int: k + 1 at the placeholder of id vocab + k,
    0 elsewhere): the ``replace`` argument of the CLIP text encoder."""
    where = jnp.where(ids >= vocab, ids - vocab + 1, 0)
    return jnp.where(ids >= vocab, 0, ids), where


def encode_with_rows(encoder, params: dict, ids: tuple, rows: jax.Array, vocab: int):
    """The text encoder's output for ``ids`` (a tuple holding one (B, T) array: SD-1.x / 2.x) with
    the placeholders' input embeddings from ``rows`` (K, D); returns (context (B, T, D), the whole
    output). Gradients reach ``rows``; the encoder is frozen."""
    safe, where = row_index(ids[0], vocab)
    embeds = jnp.broadcast_to(rows[None], (safe.shape[0],) + rows.shape)
    out = encoder.apply({"params": params}, safe, replace=(where, embeds))
    return out.last_hidden_state, out


def with_rows(pipe, params: dict, rows) -> tuple[Any, dict]:
    """(pipeline, params) whose text encoder's table has ``rows`` (K, D) appended, so the tokenizer's
    placeholder ids vocab + k read row k: the form a text-to-image sampler reads. The new pipeline
    depends on K alone (make it once with :func:`wider_pipe`, then swap tables with :func:`with_table`)."""
    vocab = pipe.text_encoders[0].config.vocab_size
    return wider_pipe(pipe, int(np.shape(rows)[0])), with_table(params, rows, vocab)


def wider_pipe(pipe, k: int):
    """``pipe`` with a text encoder whose table has ``k`` more rows."""
    import dataclasses

    enc = pipe.text_encoders[0]
    bigger = enc.clone(config=dataclasses.replace(enc.config, vocab_size=enc.config.vocab_size + k))
    return dataclasses.replace(pipe, text_encoders=(bigger,) + tuple(pipe.text_encoders[1:]))


def with_table(params: dict, rows, vocab: int) -> dict:
    """``params`` with the text encoder's first ``vocab`` table rows followed by ``rows``."""
    te = params["text_encoders"][0]
    emb = te["text_model"]["embeddings"]
    table = jnp.concatenate([jnp.asarray(emb["token_embedding"]["embedding"])[:vocab], jnp.asarray(rows)], 0)
    te = dict(te, text_model=dict(te["text_model"], embeddings=dict(emb, token_embedding={"embedding": table})))
    return dict(params, text_encoders=(te,) + tuple(params["text_encoders"][1:]))
