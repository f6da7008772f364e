"""``UNet2DConditionModel`` configuration read from a diffusers ``unet/config.json``.

Covers SD-1.x (eps, conv projections), SD-2.x (v-prediction, linear projections, per-block head
counts) and SDXL (``text_time`` additional embeddings, several transformer layers per block).
Settings those models do not use raise an error naming the key; unknown keys are logged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)

# Keys whose value must be the given default (anything else changes the architecture in ways
# we do not implement), and keys that carry no architecture.
_MUST_BE = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "act_fn": "silu", "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "addition_embed_type_num_heads": 64,
}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout",
            "upcast_attention"}


def _per_block(value: Any, n: int, key: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config: {key} has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (768,) * 4
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    up_transformer_layers: tuple[tuple[int, ...], ...] | None = None   # reverse_transformer_layers_per_block
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None          # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def num_cross_layers(self) -> int:
        """Cross-attention layers in UNet order (down, mid, up): the length of a per-layer text input."""
        n = sum(l * t for b, l, t in zip(self.down_block_types, self.layers_per_block,
                                         self.transformer_layers) if b.startswith("CrossAttn"))
        n += self.transformer_layers[-1]
        up_layers = self.up_layers()
        for b, per_res in zip(self.up_block_types, up_layers):
            if b.startswith("CrossAttn"):
                n += sum(per_res)
        return n

    def cross_layer_blocks(self) -> tuple[int, ...]:
        """For each cross-attention layer in UNet order, the index of the transformer model (diffusers'
        ``Transformer2DModel``) holding it: SD-1.5 16 models of 1 layer, SDXL 11 models of 2 or 10 layers."""
        out, g = [], 0
        for b, n, t in zip(self.down_block_types, self.layers_per_block, self.transformer_layers):
            if b.startswith("CrossAttn"):
                for _ in range(n):
                    out, g = out + [g] * t, g + 1
        out, g = out + [g] * self.transformer_layers[-1], g + 1
        for b, per_res in zip(self.up_block_types, self.up_layers()):
            if b.startswith("CrossAttn"):
                for t in per_res:
                    out, g = out + [g] * t, g + 1
        return tuple(out)

    def up_layers(self) -> tuple[tuple[int, ...], ...]:
        """Transformer layers of each up block's resnet positions (layers_per_block + 1 each)."""
        rev_lpb = self.layers_per_block[::-1]
        if self.up_transformer_layers is not None:
            return tuple(tuple(x) for x in self.up_transformer_layers)
        return tuple((t,) * (l + 1) for t, l in zip(self.transformer_layers[::-1], rev_lpb))

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        for k, want in _MUST_BE.items():
            if k in d and d[k] != want:
                raise ValueError(f"unet config: unsupported {k}={d[k]!r} (only {want!r} is implemented)")
        known = set(_MUST_BE) | _IGNORED | {f.name for f in dataclasses.fields(cls)} | {
            "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "reverse_transformer_layers_per_block"}
        for k in sorted(set(d) - known):
            log.warning("unet config: unknown key %s=%r ignored", k, d[k])
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        n = len(down)
        for b in down:
            if b not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"unet config: unsupported down block type {b!r}")
        for b in up:
            if b not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"unet config: unsupported up block type {b!r}")
        if len(up) != n:
            raise ValueError(f"unet config: {n} down blocks but {len(up)} up blocks")
        # diffusers: num_attention_heads defaults to attention_head_dim (a historical misnomer: it
        # is the head count).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        aet = d.get("addition_embed_type")
        if aet not in (None, "text_time"):
            raise ValueError(f"unet config: unsupported addition_embed_type={aet!r}")
        rev = d.get("reverse_transformer_layers_per_block")
        cfg = cls(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
            sample_size=d.get("sample_size") or 64,
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=down, up_block_types=up,
            layers_per_block=_per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            heads=_per_block(heads, n, "attention_head_dim"),
            cross_attention_dim=_per_block(d.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            transformer_layers=_per_block(d.get("transformer_layers_per_block", 1), n,
                                          "transformer_layers_per_block"),
            up_transformer_layers=tuple(tuple(r) for r in rev) if rev is not None else None,
            norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
            use_linear_projection=d.get("use_linear_projection", False),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
            conv_in_kernel=d.get("conv_in_kernel", 3), conv_out_kernel=d.get("conv_out_kernel", 3),
            addition_embed_type=aet, addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
        )
        if len(set(cfg.cross_attention_dim)) != 1:
            raise ValueError(f"unet config: per-block cross_attention_dim {cfg.cross_attention_dim} "
                             "is not supported")
        if aet == "text_time" and not (cfg.addition_time_embed_dim and cfg.projection_class_embeddings_input_dim):
            raise ValueError("unet config: text_time needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        return cfg

    def replace(self, **kw) -> "UNetConfig":
        return dataclasses.replace(self, **kw)
