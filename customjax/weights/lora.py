"""LoRA weights of the UNet under the PEFT / diffusers names (Hu et al. 2021):
``unet.<module>.lora_A.weight`` (r, in) and ``unet.<module>.lora_B.weight`` (out, r), the file
``pytorch_lora_weights.safetensors`` that diffusers' ``load_lora_weights`` reads.

Ours (:class:`customjax.control.lora.LoRADense`): y = x W + scale * (x D) U with D = ``lora_down``
(in, r), U = ``lora_up`` (r, out). The export folds ``scale`` into B, so the file needs no alpha:
A = D^T, B = scale U^T, and W + A^T B^T = W + scale D U is the merged kernel.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from customjax.weights.convert import torch_key

LORA_FILE = "pytorch_lora_weights.safetensors"
PAIR = ("lora_down", "lora_up")


def _pairs(unet_params: Any) -> dict[tuple, tuple]:
    """{module path: (down (in, r), up (r, out))} of every LoRA pair in ``unet_params``."""
    flat = traverse_util.flatten_dict(unet_params)
    mods = sorted({k[:-2] for k in flat if len(k) >= 3 and k[-2] == "lora_down"})
    out = {}
    for m in mods:
        try:
            out[m] = (np.asarray(flat[m + ("lora_down", "kernel")], np.float32), np.asarray(flat[m + ("lora_up", "kernel")], np.float32))
        except KeyError as e:
            raise ValueError(f"LoRA of {'/'.join(m)}: no {e.args[0][-2]} kernel") from None
    return out


def lora_state(unet_params: Any, scale: float) -> dict[str, np.ndarray]:
    """Every LoRA pair of ``unet_params`` under the PEFT / diffusers names (``scale`` folded into B)."""
    out = {}
    for m, (down, up) in _pairs(unet_params).items():
        name = "unet." + torch_key("/".join(m))
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(down.T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(scale * up.T)
    if not out:
        raise ValueError("the UNet parameters hold no LoRA (lora_down / lora_up)")
    return out


def fold_lora(unet_params: Any, scale: float) -> dict:
    """``unet_params`` with each LoRA pair merged into its kernel (W + scale D U) and removed: the
    parameters of the plain UNet, sampling exactly what the LoRA UNet samples."""
    pairs = _pairs(unet_params)
    flat = {k: v for k, v in traverse_util.flatten_dict(unet_params).items() if not (len(k) >= 2 and k[-2] in PAIR)}
    for m, (down, up) in pairs.items():
        flat[m + ("kernel",)] = np.asarray(flat[m + ("kernel",)], np.float32) + scale * down @ up
    return traverse_util.unflatten_dict(flat)


def load_lora(state: Mapping[str, Any], unet_params: Any, name: str, scale: float = 1.0) -> dict:
    """``unet_params`` (a new tree) with the LoRA of a PEFT / diffusers file ``state`` (file ``name``)
    merged into the kernels, times ``scale``. Strict: every key must be a ``unet.<module>.lora_A`` /
    ``lora_B`` pair of a module the UNet has, with matching shapes; ``.alpha`` entries (kohya style)
    set the pair's scale alpha / r. Anything else is an error naming the key."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(unet_params).items()}
    by_torch = {torch_key(p.rsplit("/", 1)[0]): p.rsplit("/", 1)[0] for p in flat if p.endswith("/kernel")}
    mods: dict[str, dict] = {}
    problems = []
    for key, v in state.items():
        if not key.startswith("unet."):
            problems.append(f"{key!r}: not a UNet LoRA key (unet.<module>.lora_A.weight / lora_B.weight)")
            continue
        body = key[len("unet."):]
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".alpha", "alpha")):
            if body.endswith(suffix):
                mods.setdefault(body[:-len(suffix)], {})[slot] = np.asarray(v, np.float32)
                break
        else:
            problems.append(f"{key!r}: not a lora_A / lora_B / alpha key")
    new = dict(flat)
    for mod, ab in sorted(mods.items()):
        path = by_torch.get(mod)
        if path is None:
            problems.append(f"{mod!r}: the UNet has no such module")
            continue
        if "A" not in ab or "B" not in ab:
            problems.append(f"{mod!r}: lora_A and lora_B must both be there")
            continue
        A, B, W = ab["A"], ab["B"], np.asarray(flat[path + "/kernel"], np.float32)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != W.shape[0] or B.shape[0] != W.shape[1] or A.shape[0] != B.shape[1]:
            problems.append(f"{mod!r}: lora_A {A.shape}, lora_B {B.shape} do not fit the kernel (in {W.shape[0]}, "
                            f"out {W.shape[1]})")
            continue
        s = scale * (float(ab["alpha"]) / A.shape[0] if "alpha" in ab else 1.0)
        new[path + "/kernel"] = W + s * (A.T @ B.T)
    if problems:
        raise ValueError(f"{name}: LoRA weights do not fit the UNet:\n  " + "\n  ".join(problems[:20]))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in new.items()})
