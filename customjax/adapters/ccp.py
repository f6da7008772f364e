"""RealCustom++'s cross-layer cross-scale projector, CCP (seed 004, Sec. III-C1, Eqs. 5-9).

With the deep features f_deep (B, n, c0) (last hidden states of SigLIP and DINOv2, channels
concatenated), the shallow features f_shallow (B, L*n, c0) (L intermediate layers, concatenated
along the tokens) and the high-resolution features f_high (B, 4n, c0) (the four 384px views of
the 768px image, concatenated along the tokens)::

    f_shallow' = MLP_s(Attn(Q = f_deep, K = V = f_shallow))     cross-layer, Eqs. 5-6
    f_high'    = MLP_h(Attn(Q = f_deep, K = V = f_high))        cross-scale, Eqs. 7-8
    f_ci       = [f_shallow' ; MLP(f_deep) + f_high']           combination, Eq. 9

Structure, after the public RealCustom++ ``ProjectorHighResMinAttn`` so that its checkpoint maps
one-to-one (see ``public_checkpoint``): each attention ("MinAttention") LayerNorms its queries
(``norm1``) and keys/values (``norm2``), projects them with bias-free ``to_q``/``to_k``/``to_v``
(c0 -> c0, heads of ``dim_head`` channels, softmax(QK^T/sqrt(d))V) and has no output projection;
each MLP is Linear(c0, 4 c0) - GELU - Linear(4 c0, c_out) - GELU - Linear(c_out, c_out) - LayerNorm.

Parameter names (Flax paths; the public key is the same with ``_N`` written ``.N``):
  cross-scale: ``min_attention/{norm1,norm2,to_q,to_k,to_v}``, ``projector_{0,2,4,5}``
  cross-layer: ``min_attention2/...``, ``projector2_{0,2,4,5}`` (the public shallow variant's names)
  deep:        ``projector_base`` (one Linear, ``deep_proj="linear"``, the public code) or
               ``projector_base_{0,2,4,5}`` (the MLP, ``deep_proj="mlp"``, Eq. 9 as written)
  optional:    ``scale_value/value``, a learned scalar on f_high' (public ``adaptive_scale``)

Switches: ``cross_layer`` / ``cross_scale`` turn the paths off (Table VIII rows: MLP only;
+ cross-layer; + cross-scale). ``combine`` picks how the parts join (Table IX); token order is
immaterial to the UNet's visual cross-attention (no positions on its keys):
  "layer_concat_scale_add"    [f_shallow' ; MLP(f_deep) + f_high']   (Eq. 9, the default)
  "layer_concat_scale_concat" [f_shallow' ; MLP(f_deep) ; f_high']
  "layer_add_scale_concat"    [MLP(f_deep) + f_shallow' ; f_high']
(Table IX's own row labels name the CCP row "cross-scale token concat + cross-layer element add",
the reverse of Eq. 9 and of the text beside it; Eq. 9 is the default here.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from customjax.models.layers import multihead_attention, split_heads

COMBINES = ("layer_concat_scale_add", "layer_concat_scale_concat", "layer_add_scale_concat")
DEEP_PROJ = ("mlp", "linear")


@dataclasses.dataclass(frozen=True)
class CCPConfig:
    """vision_dim: c0 (2176 = SigLIP-so400m 1152 + DINOv2-L 1024). out_dim: c_image, the UNet's
    cross-attention dimension (2048 for SDXL). dim_head: attention head width (heads = c0 / dim_head).
    mlp_ratio: hidden width of each MLP's first layer, in units of c0. norm_eps: the LayerNorms'
    epsilon (torch's default, as the public module)."""

    vision_dim: int = 2176
    out_dim: int = 2048
    dim_head: int = 64
    cross_layer: bool = True
    cross_scale: bool = True
    combine: str = "layer_concat_scale_add"
    deep_proj: str = "mlp"
    mlp_ratio: int = 4
    adaptive_scale: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"CCPConfig.combine={self.combine!r}; choose one of {COMBINES}")
        if self.deep_proj not in DEEP_PROJ:
            raise ValueError(f"CCPConfig.deep_proj={self.deep_proj!r}; choose one of {DEEP_PROJ}")
        if self.dim_head <= 0 or self.vision_dim % self.dim_head:
            raise ValueError(f"CCPConfig.vision_dim={self.vision_dim} must be a multiple of "
                             f"dim_head={self.dim_head}")

    @property
    def heads(self) -> int:
        return self.vision_dim // self.dim_head

    def num_tokens(self, n: int) -> int:
        """Output tokens for n deep tokens."""
        concat_layer = self.cross_layer and self.combine != "layer_add_scale_concat"
        concat_scale = self.cross_scale and self.combine != "layer_concat_scale_add"
        return n * (1 + concat_layer + concat_scale)


# The released RealCustom++ SDXL projector: the cross-scale path only, deep features through one
# Linear, f_ci = projector_base(f_deep) + projector(MinAttn(f_deep, f_high)).
PUBLIC_CCP = CCPConfig(cross_layer=False, cross_scale=True, deep_proj="linear")
# Table VIII rows.
TABLE_VIII = {
    "mlp": CCPConfig(cross_layer=False, cross_scale=False),
    "cross_layer": CCPConfig(cross_layer=True, cross_scale=False),
    "ccp": CCPConfig(),
}


@flax.struct.dataclass
class CCPOutput:
    """tokens: f_ci (B, T, c_out), T = ``config.num_tokens(n)``. deep: MLP(f_deep) (B, n, c_out).
    shallow: f_shallow' (Eq. 6) or None. high: f_high' (Eq. 8, times ``scale_value`` if any) or None."""

    tokens: jax.Array
    deep: jax.Array
    shallow: jax.Array | None
    high: jax.Array | None


class MinAttention(nn.Module):
    """Eqs. 5 / 7: softmax(Q K^T / sqrt(d)) V with Q = to_q(norm1(queries)),
    K, V = to_k / to_v(norm2(context)); bias-free projections, no output projection."""

    heads: int
    dim_head: int
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
        inner = self.heads * self.dim_head
        dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
        q = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm1")(queries)
        kv = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm2")(context)
        q = split_heads(dense("to_q")(q), self.heads)
        k = split_heads(dense("to_k")(kv), self.heads)
        v = split_heads(dense("to_v")(kv), self.heads)
        return multihead_attention(q, k, v)


class _Scalar(nn.Module):
    """One learned scalar ``value`` (the public ``CustomParameter``)."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("value", nn.initializers.constant(self.init_value), ())


class CrossLayerCrossScaleProjector(nn.Module):
    """CCP (Eqs. 5-9); ``__call__(deep, shallow=None, high=None) -> CCPOutput``."""

    config: CCPConfig = CCPConfig()
    dtype: Any = jnp.float32

    def _mlp(self, prefix: str, x: jax.Array) -> jax.Array:
        """Linear(c0, r c0) - GELU - Linear(., c_out) - GELU - Linear(c_out, c_out) - LayerNorm,
        layers named ``{prefix}_{0,2,4,5}`` (the torch ``nn.Sequential`` indices)."""
        c = self.config
        gelu = lambda y: jax.nn.gelu(y, approximate=False)
        x = gelu(nn.Dense(c.mlp_ratio * c.vision_dim, dtype=self.dtype, name=f"{prefix}_0")(x))
        x = gelu(nn.Dense(c.out_dim, dtype=self.dtype, name=f"{prefix}_2")(x))
        x = nn.Dense(c.out_dim, dtype=self.dtype, name=f"{prefix}_4")(x)
        return nn.LayerNorm(epsilon=c.norm_eps, dtype=self.dtype, name=f"{prefix}_5")(x)

    def _attend(self, name: str, deep: jax.Array, context: jax.Array) -> jax.Array:
        c = self.config
        return MinAttention(c.heads, c.dim_head, c.norm_eps, self.dtype, name=name)(deep, context)

    @nn.compact
    def __call__(self, deep: jax.Array, shallow: jax.Array | None = None,
                 high: jax.Array | None = None) -> CCPOutput:
        """deep (B, n, c0); shallow (B, L*n, c0), needed when ``cross_layer``; high (B, 4n, c0),
        needed when ``cross_scale``. Features of a path that is off are ignored."""
        c = self.config
        _check("deep", deep, c.vision_dim)
        B = deep.shape[0]
        deep = deep.astype(self.dtype)
        if c.deep_proj == "linear":
            d = nn.Dense(c.out_dim, dtype=self.dtype, name="projector_base")(deep)
        else:
            d = self._mlp("projector_base", deep)

        s = h = None
        if c.cross_layer:
            if shallow is None:
                raise ValueError("CCPConfig.cross_layer=True needs the shallow features (B, L*n, c0)")
            _check("shallow", shallow, c.vision_dim, B)
            s = self._mlp("projector2", self._attend("min_attention2", deep, shallow.astype(self.dtype)))
        if c.cross_scale:
            if high is None:
                raise ValueError("CCPConfig.cross_scale=True needs the high-resolution features (B, 4n, c0)")
            _check("high", high, c.vision_dim, B)
            h = self._mlp("projector", self._attend("min_attention", deep, high.astype(self.dtype)))
            if c.adaptive_scale:
                h = h * _Scalar(name="scale_value")().astype(h.dtype)

        main, before, after = d, [], []
        if h is not None:
            if c.combine == "layer_concat_scale_add":
                main = main + h
            else:
                after.append(h)
        if s is not None:
            if c.combine == "layer_add_scale_concat":
                main = main + s
            else:
                before.append(s)
        tokens = jnp.concatenate([*before, main, *after], axis=1) if before or after else main
        return CCPOutput(tokens, d, s, h)


def _check(what: str, x: jax.Array, dim: int, batch: int | None = None) -> None:
    if x.ndim != 3 or x.shape[-1] != dim or (batch is not None and x.shape[0] != batch):
        b = "B" if batch is None else f"B={batch}"
        raise ValueError(f"CCP {what} features must be ({b}, tokens, {dim}), got {x.shape}")
