"""LoRA: y = x W + b + scale * (x A) B, A: (in, r), B: (r, out), B zero-initialised."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class LoRADense(nn.Module):
    """A Dense layer with the base parameters under the usual names (so base checkpoints load)
    and the low-rank pair in ``lora_down`` / ``lora_up``; ``rank == 0`` is a plain Dense."""

    features: int
    use_bias: bool = True
    rank: int = 0
    scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        if self.rank:
            down = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=nn.initializers.normal(1.0 / self.rank), name="lora_down")
            up = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros, name="lora_up")
            y = y + self.scale * up(down(x))
        return y
