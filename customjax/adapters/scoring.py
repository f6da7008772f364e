"""RealCustom's adaptive scoring module (seed 003, Sec. 3.2, Eqs. 5-10).

Given the image features f_ci (B, n_i, c_i), the text features f_ct (B, n_t, c_t), the current
latents z_t (B, h, w, c) and sqrt(abar_t) (B,):

    A_text = softmax_n(f_ct W_a^t),  C_text = A_text^T f_ct              (Eqs. 5, 7)
    A_vis  = softmax_n(z_t W_a^v),   C_vis  = A_vis^T z_t                (Eqs. 6, 7)
    S_text = MLP_t([f_ci ; C_text]),  S_vis = MLP_v([f_ci ; C_vis])      (contexts replicated per token)
    S = (1 - sqrt(abar_t)) S_text + sqrt(abar_t) S_vis                   (Eq. 8)
    S = softmax_n(S);  f_ci = f_ci * (1 + S)                             (Eq. 9)
    keep the floor(gamma_num * n_i) tokens of highest S                  (Eq. 10; U[0.3, 1] in training)

Shapes stay static under ``jit``: every token is returned, with a boolean ``keep`` mask holding
exactly floor(gamma_num * n_i) True entries per example; the UNet takes it as
``ExtraTokens.token_mask`` (keys outside it are masked out of the visual cross-attention, which is
the same as attending to the selected subset). ``gamma_num`` may be a traced scalar or one value
per example.

``ScoringConfig.fusion`` gives the rows of Table 3: "schedule" (Eq. 8, the full model), "text"
(textual score only), "visual" (visual score only), "mean" ((textual + visual) / 2). A row that
uses one score has only that score-net's parameters. Row 2 ("w/o adaptive scoring") is no module at
all: pass the image features as they are, with no token mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from customjax.control.masks import resize_mask
from customjax.control.spec import ExtraTokens
from customjax.models.layers import activation

FUSIONS = ("schedule", "text", "visual", "mean")
GAMMA_TRAIN = (0.3, 1.0)      # Eq. 10: gamma_num ~ U[low, high] in training
GAMMA_INFERENCE = 0.8         # inference (Table 3, row 1)


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """fusion: how the two scores combine (Table 3), one of ``FUSIONS``.
    hidden: hidden width of each two-layer score-net (None: the image feature size c_i).
    activation: the score-nets' nonlinearity (a name from ``customjax.models.layers.ACTIVATIONS``)."""

    fusion: str = "schedule"
    hidden: int | None = None
    activation: str = "gelu"

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"ScoringConfig.fusion={self.fusion!r}; choose one of {FUSIONS}")
        if self.hidden is not None and self.hidden <= 0:
            raise ValueError(f"ScoringConfig.hidden={self.hidden!r} must be positive")
        activation(self.activation)

    @property
    def uses_text(self) -> bool:
        return self.fusion != "visual"

    @property
    def uses_visual(self) -> bool:
        return self.fusion != "text"


@flax.struct.dataclass
class ScoringOutput:
    """features: f_ci * (1 + S) (B, n_i, c_i), Eq. 9. keep: (B, n_i) bool, the Top-K tokens.
    scores: S after the softmax (B, n_i). text_scores / visual_scores: the score-nets' raw outputs
    (B, n_i), None for a score the fusion does not use."""

    features: jax.Array
    keep: jax.Array
    scores: jax.Array
    text_scores: jax.Array | None
    visual_scores: jax.Array | None


def weighted_pool(x: jax.Array, logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Eqs. 5-7: softmax over the tokens of ``logits`` (B, N), then the weighted sum of ``x``
    (B, N, C) -> (B, C). ``mask`` (B, N) bool leaves tokens out (e.g. text padding)."""
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    a = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bn,bnc->bc", a, x.astype(jnp.float32))


def num_kept(gamma_num: jax.Array | float, n: int, batch: int) -> jax.Array:
    """floor(gamma_num * n) per example (int32, (batch,)), clipped to [0, n].

    Evaluated in float32 with a 1e-6 relative allowance, so that a decimal ratio whose float32
    product falls just short of an integer (0.7 * 10 = 6.9999995) keeps the count it names."""
    g = jnp.broadcast_to(jnp.asarray(gamma_num, jnp.float32), (batch,))
    k = jnp.floor(g * n * (1.0 + 1e-6)).astype(jnp.int32)
    return jnp.clip(k, 0, n)


def top_k_mask(scores: jax.Array, k: jax.Array) -> jax.Array:
    """(B, N) bool with exactly ``k[b]`` True entries per row: the highest scores, ties going to
    the lower token index. ``k`` (B,) may be traced; shapes stay static."""
    order = jnp.argsort(-scores.astype(jnp.float32), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < jnp.asarray(k)[:, None]


def sample_gamma(key: jax.Array, batch: int, low: float = GAMMA_TRAIN[0], high: float = GAMMA_TRAIN[1]) -> jax.Array:
    """Eq. 10: gamma_num ~ U[low, high], one per example (B,)."""
    return jax.random.uniform(key, (batch,), jnp.float32, low, high)


class ScoreNet(nn.Module):
    """A lightweight two-layer MLP (``fc1`` -> activation -> ``fc2``) scoring each image token
    concatenated with a context vector replicated over the tokens; -> (B, n)."""

    hidden: int
    act: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, context: jax.Array) -> jax.Array:
        ctx = jnp.broadcast_to(context[:, None, :], (*tokens.shape[:2], context.shape[-1]))
        x = jnp.concatenate([tokens.astype(self.dtype), ctx.astype(self.dtype)], axis=-1)
        x = activation(self.act)(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(1, dtype=self.dtype, name="fc2")(x)[..., 0].astype(jnp.float32)


class AdaptiveScoring(nn.Module):
    """RealCustom's adaptive scoring module (Eqs. 5-10); parameters:
    ``text_pool`` (W_a^t, c_t -> 1), ``visual_pool`` (W_a^v, c -> 1), ``text_score`` and
    ``visual_score`` (two-layer MLPs), each present only when the fusion uses it."""

    config: ScoringConfig = ScoringConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_features: jax.Array, text_features: jax.Array, latents: jax.Array,
                 sqrt_alpha_bar: jax.Array | float, gamma_num: jax.Array | float = GAMMA_INFERENCE, *,
                 mask: jax.Array | None = None, text_mask: jax.Array | None = None) -> ScoringOutput:
        """image_features (B, n_i, c_i); text_features (B, n_t, c_t); latents z_t (B, h, w, c);
        sqrt_alpha_bar () or (B,); gamma_num () or (B,), the Top-K ratio.

        mask: optional (B, H, W) guidance mask (Sec. 3.3): z_t is multiplied by it (resized to
        (h, w) when it differs) before the visual context is pooled. text_mask: optional (B, n_t)
        bool of the text tokens to pool over (default: all, as the paper)."""
        c = self.config
        B, n_i, c_i = image_features.shape
        if text_features.ndim != 3 or text_features.shape[0] != B:
            raise ValueError(f"text_features must be (B={B}, n_t, c_t), got {text_features.shape}")
        if latents.ndim != 4 or latents.shape[0] != B:
            raise ValueError(f"latents z_t must be NHWC (B={B}, h, w, c), got {latents.shape}")
        hidden = c.hidden or c_i
        dense1 = lambda name: nn.Dense(1, use_bias=False, dtype=self.dtype, name=name)

        s_text = s_vis = None
        if c.uses_text:
            logits = dense1("text_pool")(text_features.astype(self.dtype))[..., 0]
            ctx = weighted_pool(text_features, logits, text_mask)                          # (B, c_t)
            s_text = ScoreNet(hidden, c.activation, self.dtype, name="text_score")(image_features, ctx)
        if c.uses_visual:
            z = latents
            if mask is not None:
                if mask.ndim != 3 or mask.shape[0] != B:
                    raise ValueError(f"mask must be (B={B}, H, W), got {mask.shape}")
                m = resize_mask(mask.astype(jnp.float32), latents.shape[1:3])
                z = z * m[..., None].astype(z.dtype)
            z = z.reshape(B, -1, z.shape[-1])                                              # (B, n_z, c)
            logits = dense1("visual_pool")(z.astype(self.dtype))[..., 0]
            ctx = weighted_pool(z, logits)                                                 # (B, c)
            s_vis = ScoreNet(hidden, c.activation, self.dtype, name="visual_score")(image_features, ctx)

        if c.fusion == "schedule":                                                         # Eq. 8
            w = jnp.broadcast_to(jnp.asarray(sqrt_alpha_bar, jnp.float32), (B,))[:, None]
            s = (1.0 - w) * s_text + w * s_vis
        elif c.fusion == "mean":
            s = 0.5 * (s_text + s_vis)
        else:
            s = s_text if s_vis is None else s_vis
        s = jax.nn.softmax(s, axis=-1)                                                     # S = Softmax(S)
        features = image_features * (1.0 + s[..., None]).astype(image_features.dtype)      # Eq. 9
        keep = top_k_mask(s, num_kept(gamma_num, n_i, B))                                  # Eq. 10
        return ScoringOutput(features, keep, s, s_text, s_vis)


def to_extra_tokens(out: ScoringOutput, mask: jax.Array | None = None,
                    scale: jax.Array | float = 1.0) -> ExtraTokens:
    """The UNet's per-call visual tokens from one reference: tokens (B, 1, n_i, c_i) with the
    Top-K ``keep`` as ``token_mask`` (B, 1, n_i); ``mask`` (B, h, w) is the optional output mask."""
    return ExtraTokens(out.features[:, None], None if mask is None else mask[:, None], scale, out.keep[:, None])
