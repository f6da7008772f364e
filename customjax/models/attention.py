"""The UNet's attention layer (diffusers ``Attention``: to_q, to_k, to_v, to_out.0) with the
control extension points of :mod:`customjax.control.spec` built in.

Cross-attention output (RealCustom Eq. 4 / RealCustom++ Eqs. 14, 17), before ``to_out``::

    Attn(Q, K_text, V_text) + sum_sets scale * sum_r mask_r * Attn(Q, K_set(tokens_r), V_set(tokens_r))

Self-attention and plain cross-attention take the fused ``jax.nn.dot_product_attention`` path
unless their probabilities are requested through ``Capture``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customjax.control.lora import LoRADense
from customjax.control.masks import resize_mask
from customjax.control.spec import Control, ControlConfig
from customjax.models.layers import attend, attention_probs, multihead_attention, split_heads


class Attention(nn.Module):
    heads: int
    dim_head: int
    out_dim: int
    is_cross: bool
    factor: int = 1                          # downsampling factor of this layer's feature map
    control: ControlConfig = ControlConfig()
    dtype: Any = jnp.float32

    def _dense(self, features: int, name: str, bias: bool) -> nn.Module:
        lora = self.control.lora
        on = lora is not None and name in lora.targets and (
            lora.cross_attention if self.is_cross else lora.self_attention)
        return LoRADense(features, use_bias=bias, rank=lora.rank if on else 0,
                         scale=lora.scale if on else 1.0, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, hw: tuple[int, int] = (0, 0),
                 control: Control | None = None) -> jax.Array:
        inner = self.heads * self.dim_head
        cap = self.control.capture
        context = x if context is None else context
        q = split_heads(self._dense(inner, "to_q", False)(x), self.heads)
        k = split_heads(self._dense(inner, "to_k", False)(context), self.heads)
        v = split_heads(self._dense(inner, "to_v", False)(context), self.heads)

        want_probs = self.factor in (cap.cross_probs if self.is_cross else cap.self_probs)
        text_mask = None if control is None or not self.is_cross else control.text
        if not self.is_cross and self.factor in cap.self_qk:
            self.sow("attention", "self_qk", (q, k))
        if want_probs or text_mask is not None:
            probs = attention_probs(q, k)
            if want_probs:
                self.sow("attention", "cross_probs" if self.is_cross else "self_probs", probs.mean(axis=1))
            if text_mask is not None:
                probs = probs * self._text_factor(text_mask, hw)[:, None].astype(probs.dtype)
            out = attend(probs, v)
        else:
            out = multihead_attention(q, k, v)

        if self.is_cross:
            for spec in self.control.extra_kv:
                kp = nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                              name=f"to_k_{spec.name}")
                vp = nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                              name=f"to_v_{spec.name}")
                given = None if control is None else control.extra.get(spec.name)
                if given is None:
                    if self.is_initializing():  # create the parameters
                        kp(jnp.zeros((1, 1, spec.dim), self.dtype)), vp(jnp.zeros((1, 1, spec.dim), self.dtype))
                    continue
                out = out + self._extra(q, kp, vp, given, hw, spec.name if self.factor in cap.extra_probs else None)
        return self._dense(self.out_dim, "to_out_0", True)(out)

    @staticmethod
    def _text_factor(text_mask, hw) -> jax.Array:
        """(B, T, N): 1 + sum_j tokens_j[n] (mask_j(q) - 1), the factor on each text probability."""
        m = resize_mask(text_mask.mask.astype(jnp.float32), hw)              # (B, J, h, w)
        B, J = m.shape[:2]
        return 1.0 + jnp.einsum("bjq,bjn->bqn", m.reshape(B, J, -1) - 1.0, text_mask.tokens.astype(jnp.float32))

    def _extra(self, q, kp, vp, given, hw, capture: str | None = None) -> jax.Array:
        """sum_r mask_r * Attn(Q, K(tokens_r), V(tokens_r)), times the scale."""
        B, T = q.shape[:2]
        toks = given.tokens
        R = toks.shape[1]
        toks = toks.reshape(B * R, *toks.shape[2:]).astype(self.dtype)
        k = split_heads(kp(toks), self.heads)
        v = split_heads(vp(toks), self.heads)
        qr = jnp.repeat(q, R, axis=0)
        keep = None
        if given.token_mask is not None:
            keep = given.token_mask.reshape(B * R, 1, 1, -1).astype(bool)
        if capture is not None:            # the visual maps themselves (Capture.extra_probs)
            probs = attention_probs(qr, k, mask=keep)
            self.sow("attention", f"extra_probs_{capture}", probs.mean(axis=1).reshape(B, R, T, -1))
            o = attend(probs, v).reshape(B, R, T, -1)
        else:
            o = multihead_attention(qr, k, v, mask=keep).reshape(B, R, T, -1)
        if keep is not None:  # a reference with no kept token contributes nothing
            o = o * jnp.any(keep, axis=-1).reshape(B, R, 1, 1).astype(o.dtype)
        if given.mask is not None:
            m = resize_mask(given.mask.astype(jnp.float32), hw).reshape(B, R, T, 1)
            o = o * m.astype(o.dtype)
        scale = jnp.broadcast_to(jnp.asarray(given.scale, o.dtype), (B,))
        return o.sum(axis=1) * scale[:, None, None]
