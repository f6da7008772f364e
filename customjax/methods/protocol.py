"""The method protocol: what a customization method declares, and what the one trainer, the one
sampler, export, previews and the benchmark read from it (docs/adding_a_method.md).

A method is one module holding one :class:`Method` instance, registered by name in
:mod:`customjax.methods.registry`. It declares

  * its image side (:meth:`Method.image_side`): the reference encoder(s) and the trainable
    adapter module, their parameters by name (``params["image"]``), and the extra K/V set
    (``to_k_<kv>`` / ``to_v_<kv>``) it adds to every cross-attention layer;
  * its trainable parts (:meth:`Method.is_trainable`): a predicate on parameter paths;
  * its data needs (:attr:`Method.needs`): the batch entries its objective reads;
  * its loss terms (:meth:`Method.condition`): the visual condition of a training batch plus any
    auxiliary losses, each logged by name beside the diffusion loss;
  * its sampler conditioning: the reference tokens (:meth:`Method.reference_tokens`), the tokens
    of the unconditional branch (:meth:`Method.null_tokens`), the per-step visual function
    (:meth:`Method.visual`) and whether a target word's mask narrows it (:attr:`Method.masked`);
    the guidance formula that combines the branches is named in the config
    (``guidance.cfg``: ``"one_scale"`` or ``"two_scale"``, :mod:`customjax.sampling.dual_branch`);
  * its export names (:meth:`Method.state_dict` / :meth:`Method.load_state_dict`), and other
    checkpoint formats it reads (:meth:`Method.load_checkpoint`, e.g. a released file).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from customjax.control.params import is_control_param
from customjax.control.spec import Capture, ExtraKV, LoRA

# The sampler's per-step image side: visual(adapter_params, feats (B, R, N, D), text_ctx, z_masked,
# sqrt_abar, t) -> (tokens (B, R, N', D), token_mask (B, R, N') | None).
VisualFn = Callable[..., tuple[jax.Array, jax.Array | None]]
# The sampler's per-step S+ text tokens: text_tokens(adapter_params, feats (B, R, N, D), t) -> (B, R, n, D_in),
# each the placeholder's input embedding in one cross-attention layer (CustomContrast Eq. 5), or, when the
# callable has a ``layers`` tuple, in the layers i with layers[i] == k for token k.
TextTokensFn = Callable[[Any, Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """What :meth:`Method.image_side` returns: ``modules`` (static Flax modules and settings the
    method's functions read; hashable), ``params`` (their parameters by name, encoders and adapter),
    ``extra_kv`` (the UNet's extra K/V set)."""

    modules: Any
    params: dict
    extra_kv: ExtraKV | None         # None: the method adds no K/V set (per-concept fine-tuning)
    lora: LoRA | None = None         # low-rank adapters on the UNet's attention (CLIF's shared LoRA)


@dataclasses.dataclass(frozen=True)
class Condition:
    """A training batch's visual condition: ``tokens`` (B, R, N, D) for the extra K/V set,
    ``token_mask`` (B, R, N) | None, and ``losses``: auxiliary loss terms by name (scalars, already
    weighted), added to the diffusion loss and logged as ``loss/<name>``. ``scale`` (B,): the visual
    scale per example; None = the objective's (0 where the image condition is dropped, else 1), set
    it when the method drops the image its own way (IP-Adapter: a zero image embedding). ``text``: a
    text context per cross-attention layer (L, B, 77, D) in UNet order, in place of the caption's
    (CustomContrast's S+ space, Eq. 5; :func:`customjax.pipeline.encode_splus`), or one context (B, 77, D)
    for every layer (a caption with learnt words); examples whose text is dropped get the empty
    prompt's context. None: the caption's context everywhere."""

    tokens: jax.Array
    token_mask: jax.Array | None = None
    losses: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    scale: jax.Array | None = None
    text: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """What the objective hands a method at one training step: the noisy latents ``z_t``, the text
    context ``ctx`` (after condition dropout), ``sqrt_abar`` (B,), the timesteps ``t`` (B,) and
    ``drop_image`` / ``drop_text`` (B,) bool, the examples whose image / text condition is dropped.
    In :meth:`Method.attention_losses`, ``ctx`` is the context the UNet read (per layer where the
    condition gave one)."""

    z_t: jax.Array
    ctx: jax.Array
    sqrt_abar: jax.Array
    t: jax.Array
    drop_image: jax.Array
    drop_text: jax.Array | None = None


class Method:
    """Base class of a method; a subclass overrides what differs. Instances are compared by
    identity (they are static arguments of jitted functions)."""

    name: str = ""
    paper: str = ""                      # where its equations come from (shown in errors and docs)
    adapter: str = ""                    # the trainable image-side module's key in params["image"]
    needs: tuple[str, ...] = ("reference",)   # batch entries the objective reads besides target and caption
    masked: bool = True                  # sampling narrows the visual condition by a target word's mask
    kv_name: str = "vision"              # the UNet's extra K/V set: to_k_<kv_name> / to_v_<kv_name>
    location: bool = False               # sampling masks from the generation branch's own attention (CustomContrast)
    per_concept: bool = False            # optimised per concept (customjax.finetune), sampled by text-to-image
    joint: bool = False                  # per-concept method whose concepts train together in one model (CLIF)

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # -- construction --------------------------------------------------------------------------
    def image_side(self, config, pipe, keys: tuple[jax.Array, ...]) -> ImageSide:
        """The reference encoder(s), the adapter (initialised) and the extra K/V set for ``config``
        on the base pipeline ``pipe``; ``keys``: three PRNG keys."""
        raise NotImplementedError

    def init_image(self, modules, image_params: dict, base_params: dict, pipe) -> dict:
        """The image-side parameters once the base's are loaded (default: as :meth:`image_side` made
        them); per-concept methods start their learnt words from the base's token embeddings."""
        return image_params

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        """Whether the parameter at ``path`` trains: under ``params["image"][adapter]`` (path
        starting with ``adapter``) or a UNet path of the extra K/V set (``to_k_<kv>`` / ``to_v_<kv>``)."""
        return path[0] == self.adapter or is_control_param(path, extra_kv=(self.kv_name,), lora=False)

    def init_extra_kv(self, unet_params: Any) -> Any:
        """The UNet parameters with the extra K/V set initialised (default: as drawn by the build,
        N(0, init_std^2)); shapes only in abstract builds."""
        return unet_params

    def reference_size(self, config) -> int:
        """The side (px) the reference images are resized to before :meth:`reference_tokens`."""
        return int(config.encoders.image_size)

    # -- training ------------------------------------------------------------------------------
    def objective(self, built, config):
        """A training loss ``loss(trainable, frozen, batch, key) -> (loss, metrics with "loss")`` in place
        of the diffusion objective (CLIF's stage 1, Eq. 5), or None: the diffusion objective."""
        return None

    def condition(self, modules, frozen: dict, trainable: dict, batch: dict, x: TrainInputs, key: jax.Array,
                  config) -> Condition:
        """The visual condition (and auxiliary losses) of a training batch; ``frozen`` /
        ``trainable``: the image-side parameters by name (each in one of the two); ``config``:
        the :class:`~customjax.methods.objective.ObjectiveConfig`."""
        raise NotImplementedError

    def host_inputs(self, batch: Mapping[str, Any], tokenizers) -> dict:
        """Entries the objective reads that the host makes from a loader batch (numpy), e.g. the
        placeholder's token mask; errors name the caption at fault."""
        return {}

    def capture(self, modules) -> Capture:
        """The attention a training step captures for :meth:`attention_losses` (none by default)."""
        return Capture()

    def attention_losses(self, modules, state: dict, batch: dict, x: TrainInputs, config) -> dict:
        """Loss terms (already weighted) from the captured attention ``state`` of the training step."""
        return {}

    # -- sampling ------------------------------------------------------------------------------
    def reference_tokens(self, modules, params: dict, images: jax.Array) -> jax.Array:
        """Reference tokens (B, N, D) of images (B, S, S, 3) in [0, 1], S = :meth:`reference_size`."""
        raise NotImplementedError

    def null_tokens(self, modules, params: dict, images: jax.Array) -> jax.Array:
        """The unconditional branch's tokens when ``guidance.uncond_image = "zero"`` (the released
        RealCustom++ code, IP-Adapter): by default the tokens of an all-zero image."""
        return self.reference_tokens(modules, params, jnp.zeros_like(images))

    def visual(self, modules, config) -> VisualFn:
        """The sampler's per-step image side; default: the reference tokens at every step."""
        return constant_visual

    def text_tokens(self, modules, config) -> TextTokensFn | None:
        """The sampler's per-step S+ tokens, which replace each target word in every cross-attention
        layer's text (CustomContrast), or None: the prompt's own text."""
        return None

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, trainable: dict) -> dict:
        """The trainable tree as named tensors (PyTorch names and layouts): ``unet.<torch key>``
        and ``<adapter>.<torch key>`` unless a method exports the names other tools read."""
        from customjax.weights.convert import to_torch_state
        return to_torch_state(trainable)

    def load_state_dict(self, state: Mapping[str, Any], target: dict, name: str) -> dict:
        """The inverse of :meth:`state_dict`, strictly against ``target`` (the trainable tree)."""
        from customjax.weights.convert import convert
        return convert(dict(state), target, name=name)

    def load_checkpoint(self, built, path, target: dict) -> dict | None:
        """A trainable tree shaped as ``target`` from a checkpoint in another format (a released
        file), or None when the method reads no other format."""
        return None

    def save_released(self, path, trainable: dict):
        """Writes ``trainable`` in the released code's format (``export --public``)."""
        raise ValueError(f"{self.name} has no released checkpoint format to export to")


def constant_visual(adapter_params: Any, feats: jax.Array, text_ctx: jax.Array, z: jax.Array,
                    sqrt_abar: jax.Array, t: jax.Array | None = None) -> tuple[jax.Array, None]:
    """The same reference tokens at every step (RealCustom++, IP-Adapter)."""
    return feats, None


def jit_method(fn):
    """``jax.jit`` of a method's ``fn(self, modules, params, images)`` with ``self`` and ``modules`` static."""
    return functools.partial(jax.jit, static_argnums=(0, 1))(fn)
