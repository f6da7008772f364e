"""What methods plug into the UNet's attention: static switches and per-call inputs.

Static (hashable, part of the module, so changing them recompiles):
  * :class:`ExtraKV` - an extra key/value token set beside the text in cross-attention, with its own
    bias-free projections ``to_k_<name>`` / ``to_v_<name>`` (RealCustom Eq. 4, RealCustom++ Eq. 14;
    with ``name="vision"`` they are the public RealCustom++ ``to_k_vision`` / ``to_v_vision``).
    A duplicated K/V path (Contrastive Inversion Eq. 3, K^a / V^a over the auxiliary tokens) is the
    same mechanism: an extra set initialised from ``to_k`` / ``to_v`` (see ``params.duplicate_kv``).
  * :class:`LoRA` - low-rank adapters on attention projections.
  * :class:`Capture` - which attention quantities to return, by feature-map downsampling factor
    relative to the latent (1 = full latent resolution, 2, 4, 8).

Per call (a pytree passed to ``UNet.__call__``): :class:`Control` with, per extra set, the tokens
of R references ``(B, R, N, D)``, an optional output mask ``(B, R, h, w)`` at latent resolution
(resized to each layer) and a scale ``()`` or ``(B,)``; optionally a :class:`TextMask` on text tokens. Per-layer text conditioning (CustomContrast's
S+ space) is ``encoder_hidden_states`` of shape ``(L, B, N, D)``, one sequence per cross-attention
layer in UNet order.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax


@dataclasses.dataclass(frozen=True)
class ExtraKV:
    name: str                 # parameter names to_k_<name>, to_v_<name>
    dim: int                  # feature size of the extra tokens


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float | None = None          # scale alpha / rank; None means 1.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out_0")
    self_attention: bool = True
    cross_attention: bool = True

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Capture:
    """Sown into the ``"attention"`` collection (``apply(..., mutable=["attention"])``).

    cross_probs: text cross-attention probabilities, head-averaged, ``(B, h*w, N_text)``.
    self_probs: self-attention probabilities, head-averaged, ``(B, h*w, h*w)`` (memory grows as
      (h*w)^2: for small maps or for checking the fast path).
    self_qk: the self-attention queries and keys ``(B, h*w, heads, d)``: with them, M_self @ v for any
      vector v is one fused attention whose values are v, without the h*w x h*w map.
    extra_probs: each extra K/V set's attention probabilities, head-averaged, ``(B, R, h*w, N)`` per
      reference (CustomContrast's visual cross-attention maps, Sec. 3.4), sown as ``extra_probs_<name>``.
    """

    cross_probs: tuple[int, ...] = ()
    self_probs: tuple[int, ...] = ()
    self_qk: tuple[int, ...] = ()
    extra_probs: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    extra_kv: tuple[ExtraKV, ...] = ()
    lora: LoRA | None = None
    capture: Capture = Capture()


@flax.struct.dataclass
class ExtraTokens:
    tokens: jax.Array                   # (B, R, N, D)
    mask: jax.Array | None = None       # (B, R, h, w) output mask at latent resolution; None = everywhere
    scale: jax.Array | float = 1.0      # () or (B,)
    token_mask: jax.Array | None = None  # (B, R, N) bool: tokens the queries may attend to (a
                                         # static-shape Top-K selection, RealCustom Eq. 9-10)


@flax.struct.dataclass
class TextMask:
    """Spatial masks on text tokens' attention (CustomContrast Sec. 3.4: the location mask injected
    into the placeholder's cross-attention maps): the probability of token n at position q is
    multiplied by ``mask[j](q)`` where ``tokens[j, n]``, without renormalising."""

    tokens: jax.Array                   # (B, J, N) bool: subject j's tokens
    mask: jax.Array                     # (B, J, h, w) at latent resolution (resized to each layer)


@flax.struct.dataclass
class Control:
    extra: dict[str, ExtraTokens] = flax.struct.field(default_factory=dict)
    text: TextMask | None = None
