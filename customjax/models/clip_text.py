"""CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

Also home of the pieces the vision towers in :mod:`customjax.models.vit` share: the pre-LayerNorm
transformer layer of CLIP and SigLIP, its self-attention and MLP, and the ``config.json`` reading
helpers. Module and parameter names follow transformers, so checkpoints load by the generic rule
of :mod:`customjax.weights.convert`.

SD-1.5 uses CLIP-L (``quick_gelu``, no projection, ``hidden_states[-1]`` after the final norm);
SDXL adds OpenCLIP bigG (``gelu``, ``text_projection``) and reads ``hidden_states[-2]``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from customjax.models.layers import ACTIVATIONS, activation, multihead_attention, split_heads
from customjax.weights.loaders import ModelSpec

log = logging.getLogger(__name__)

# Keys every transformers config.json may carry that say nothing about the forward pass
# (generic PretrainedConfig fields, generation defaults of older versions, training-only settings).
GENERIC_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "model_type",
    "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "num_labels",
    "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "gradient_checkpointing",
    # training only
    "dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "drop_path_rate", "initializer_range", "initializer_factor", "logit_scale_init_value",
})


def config_kwargs(cls: type, d: dict, *, what: str, ignore: frozenset | set = frozenset()) -> dict:
    """The entries of a ``config.json`` dict that are fields of dataclass ``cls``.

    Known-but-irrelevant keys (``GENERIC_CONFIG_KEYS``, ``ignore``) are dropped quietly; any other
    key is logged, since it may change the model in a way this implementation does not know about.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and k not in GENERIC_CONFIG_KEYS and k not in ignore)
    if unknown:
        log.warning("%s: config keys not used by this implementation: %s", what, unknown)
    return {k: v for k, v in d.items() if k in fields}


def tower_config(d: dict, *, tower: str, full: tuple[str, ...], single: tuple[str, ...],
                 what: str) -> tuple[dict, bool]:
    """(tower config dict, whether ``d`` is a full two-tower model config).

    ``tower`` is ``"text_config"`` or ``"vision_config"``; ``full`` and ``single`` list the
    accepted ``model_type`` values of the two-tower and the single-tower configs.
    """
    model_type = d.get("model_type")
    if model_type in full:
        sub = d.get(tower)
        if not isinstance(sub, dict):
            raise ValueError(f"{what}: model_type={model_type!r} config has no {tower!r} dict")
        return sub, True
    if model_type is None or model_type in single:
        return d, False
    raise ValueError(f"{what}: unsupported model_type={model_type!r} (expected one of {list(single + full)})")


def require(cond: bool, what: str, key: str, value: Any, why: str) -> None:
    """Raises the uniform ``ValueError`` for an unsupported config setting."""
    if not cond:
        raise ValueError(f"{what}: unsupported config {key}={value!r}: {why}")


def check_act(what: str, name: str) -> None:
    require(name in ACTIVATIONS, what, "hidden_act", name, f"known: {sorted(ACTIVATIONS)}")


def check_heads(what: str, hidden_size: int, heads: int) -> None:
    require(hidden_size % heads == 0, what, "num_attention_heads", heads,
            f"must divide hidden_size={hidden_size}")


# ----------------------------------------------------------------------------------------------
# Shared transformer pieces


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``/``k_proj``/``v_proj`` and an output
    projection named ``out_name`` (``out_proj`` for CLIP/SigLIP, ``o_proj`` for DINOv2)."""

    heads: int
    out_name: str = "out_proj"
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        d = x.shape[-1]
        q, k, v = (split_heads(nn.Dense(d, use_bias=self.qkv_bias, dtype=self.dtype, name=n)(x), self.heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        out = multihead_attention(q, k, v, mask=mask, is_causal=is_causal)
        return nn.Dense(d, dtype=self.dtype, name=self.out_name)(out)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``."""

    intermediate_size: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = activation(self.act)(nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer (``CLIPEncoderLayer``, ``SiglipEncoderLayer``)."""

    heads: int
    intermediate_size: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)
        x = x + SelfAttention(self.heads, dtype=self.dtype, name="self_attn")(norm("layer_norm1")(x), mask, is_causal)
        return x + MLP(self.intermediate_size, self.act, dtype=self.dtype, name="mlp")(norm("layer_norm2")(x))


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` (``encoder.layers.N``); returns every layer's output."""

    num_layers: int
    heads: int
    intermediate_size: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    def setup(self):
        self.layers = [EncoderLayer(self.heads, self.intermediate_size, self.act, self.eps, dtype=self.dtype)
                       for _ in range(self.num_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> list[jax.Array]:
        outs = []
        for layer in self.layers:
            x = layer(x, mask, is_causal)
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------------
# CLIP text


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` (defaults as there) plus ``with_projection``."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512
    with_projection: bool = False

    @classmethod
    def from_dict(cls, d: dict, with_projection: bool | None = None) -> "CLIPTextConfig":
        """From a ``CLIPTextModel[WithProjection]`` or full ``CLIPModel`` ``config.json``.

        ``with_projection=None`` decides from the folder: a ``CLIPModel`` or an ``architectures``
        entry ``CLIPTextModelWithProjection`` has ``text_projection``.
        """
        what = "CLIP text config"
        t, full = tower_config(d, tower="text_config", full=("clip",), single=("clip_text_model",), what=what)
        kw = config_kwargs(cls, t, what=what, ignore={"text_config_dict"})
        kw.pop("with_projection", None)
        if full:
            config_kwargs(cls, d, what="CLIP config", ignore={"text_config", "vision_config",
                                                                "text_config_dict", "vision_config_dict"})
            if "projection_dim" in d:
                kw["projection_dim"] = d["projection_dim"]
        if with_projection is None:
            with_projection = full or "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        cfg = cls(**kw, with_projection=bool(with_projection))
        check_act(what, cfg.hidden_act)
        check_heads(what, cfg.hidden_size, cfg.num_attention_heads)
        require(isinstance(cfg.eos_token_id, int), what, "eos_token_id", cfg.eos_token_id,
                "must be one integer (the pooled token is found by it)")
        return cfg


@struct.dataclass
class CLIPTextOutput:
    """``last_hidden_state`` (after ``final_layer_norm``); ``hidden_states``: embeddings output then
    every layer's output (as transformers: ``[-1]`` is before the final norm, SDXL uses ``[-2]``);
    ``pooler_output``: the final-normed state at the EOS token; ``text_embeds``: its projection
    (``None`` without ``text_projection``)."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings. ``replace``: ``(where (B, T) bool, embeds (B, D))``,
    the token embedding at ``where`` replaced by ``embeds`` (a learnt word: S*, CustomContrast's S+
    tokens), before the position embeddings are added; or, for several words, ``(where (B, T) int,
    embeds (B, J, D))`` with ``where`` = j + 1 at word j's tokens and 0 elsewhere."""

    vocab_size: int
    max_positions: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, replace: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        t = input_ids.shape[-1]
        if t > self.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings={self.max_positions}")
        tok = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        if replace is not None:
            where, embeds = replace
            if embeds.ndim == 3:    # several words: where (B, T) int, j + 1 at word j's tokens, 0 elsewhere
                idx = jnp.clip(where.astype(jnp.int32) - 1, 0, embeds.shape[1] - 1)
                sel = jnp.take_along_axis(embeds.astype(tok.dtype), idx[..., None], axis=1)
                tok = jnp.where((where > 0)[..., None], sel, tok)
            else:
                tok = jnp.where(where[..., None], embeds[:, None].astype(tok.dtype), tok)
        pos = nn.Embed(self.max_positions, self.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(t))
        return tok + pos


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled token per row, by transformers' rule: legacy configs with
    ``eos_token_id == 2`` take the largest id (EOS is the largest id in CLIP's vocabulary), others
    the first occurrence of ``eos_token_id``."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder and final LayerNorm (``text_model.*``)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 replace: tuple[jax.Array, jax.Array] | None = None):
        c = self.config
        x = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                               name="embeddings")(input_ids, replace)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        layers = Encoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, dtype=self.dtype, name="encoder")(x, mask, is_causal=True)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(layers[-1])
        pooled = jnp.take_along_axis(last, eos_positions(input_ids, c.eos_token_id)[:, None, None], axis=1)[:, 0]
        return last, (x, *layers), pooled


class CLIPTextModel(nn.Module):
    """CLIP text encoder; ``text_projection`` when ``config.with_projection``.

    ``input_ids`` (B, T) int; optional ``attention_mask`` (B, T), 1 = real token, combined with the
    causal mask as transformers does (SD pipelines pass none); optional ``replace`` = ``(where (B, T)
    bool, embeds (B, D))``: token embeddings replaced (:class:`CLIPTextEmbeddings`).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 replace: tuple[jax.Array, jax.Array] | None = None) -> CLIPTextOutput:
        last, hidden, pooled = CLIPTextTransformer(self.config, dtype=self.dtype, name="text_model")(
            input_ids, attention_mask, replace)
        embeds = None
        if self.config.with_projection:
            embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                              name="text_projection")(pooled)
        return CLIPTextOutput(last, hidden, pooled, embeds)


def tower_rename(prefix: str, top_level: tuple[str, ...]):
    """Checkpoint key -> ours: bare single-tower keys (as recent transformers saves
    ``CLIPTextModel``/``CLIPVisionModel``/``SiglipVisionModel``) gain the ``prefix`` that older
    saves and full two-tower checkpoints have."""
    def rename(key: str) -> str:
        if key.startswith(prefix + ".") or key.split(".")[0] in top_level:
            return key
        return f"{prefix}.{key}"
    return rename


def tower_skip(other: tuple[str, ...]):
    """Keys that are not parameters of one tower: ``position_ids`` buffers (older saves) and
    everything under the ``other`` top-level names (the other tower, logit scale/bias)."""
    def skip(key: str) -> bool:
        return key.endswith("position_ids") or key.split(".")[0] in other
    return skip


def clip_text_spec(with_projection: bool | None = None) -> ModelSpec:
    """ModelSpec for a ``CLIPTextModel``, ``CLIPTextModelWithProjection`` or full ``CLIPModel``
    folder; ``with_projection=None`` decides from the folder's config."""
    return ModelSpec(
        config_from_dict=functools.partial(CLIPTextConfig.from_dict, with_projection=with_projection),
        build=lambda cfg, dtype: CLIPTextModel(cfg, dtype=dtype),
        dummy_inputs=lambda cfg: (jnp.zeros((1, min(8, cfg.max_position_embeddings)), jnp.int32),),
        rename=tower_rename("text_model", ("text_projection",)),
        skip=tower_skip(("vision_model", "visual_projection", "logit_scale", "logit_bias")),
    )


CLIP_TEXT = clip_text_spec()
