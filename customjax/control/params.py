"""Parameter-tree plumbing for methods: attach new parameters to a loaded base, split the
trainable part off, duplicate K/V projections."""

from __future__ import annotations

from typing import Any, Callable

from flax import traverse_util


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree)


def attach(base: Any, full: Any) -> Any:
    """``full`` (e.g. a fresh init of the model with control enabled) with every leaf that exists in
    ``base`` (e.g. the loaded pretrained model) taken from ``base``. Every base leaf must exist in
    ``full`` with the same shape."""
    fb, ff = _flat(base), _flat(full)
    missing = [ "/".join(k) for k in fb if k not in ff]
    if missing:
        raise ValueError(f"base parameters absent from the controlled model: {missing[:10]}")
    bad = ["/".join(k) + f" {fb[k].shape} vs {ff[k].shape}" for k in fb if fb[k].shape != ff[k].shape]
    if bad:
        raise ValueError(f"base parameters whose shape changed under control: {bad[:10]}")
    return traverse_util.unflatten_dict({k: fb.get(k, v) for k, v in ff.items()})


def partition(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Any, Any]:
    """Splits into (frozen, trainable) trees by a predicate on the parameter path."""
    f = _flat(params)
    frozen = {k: v for k, v in f.items() if not trainable(k)}
    train = {k: v for k, v in f.items() if trainable(k)}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(train)


def merge(*trees: Any) -> Any:
    """Union of disjoint parameter trees (inverse of :func:`partition`)."""
    out: dict = {}
    for t in trees:
        for k, v in _flat(t).items():
            if k in out:
                raise ValueError(f"parameter {'/'.join(k)} present in two trees")
            out[k] = v
    return traverse_util.unflatten_dict(out)


def is_control_param(names: tuple[str, ...], extra_kv: tuple[str, ...] = (), lora: bool = True) -> bool:
    """True for the parameters that control adds: ``to_k_<name>``/``to_v_<name>`` and LoRA pairs."""
    kv = {f"to_{p}_{n}" for n in extra_kv for p in ("k", "v")}
    return any(n in kv or (lora and n in ("lora_down", "lora_up")) for n in names)


def duplicate_kv(params: Any, name: str) -> Any:
    """Initialises every ``to_k_<name>`` / ``to_v_<name>`` from the same layer's ``to_k`` / ``to_v``
    (Contrastive Inversion Eq. 3: K^a, V^a start as copies of K, V)."""
    f = _flat(params)
    out = dict(f)
    for k in f:
        for p in ("k", "v"):
            tag = f"to_{p}_{name}"
            if tag in k:
                i = k.index(tag)
                src = k[:i] + (f"to_{p}",) + k[i + 1:]
                if src not in f or f[src].shape != f[k].shape:
                    raise ValueError(f"cannot duplicate {'/'.join(src)} into {'/'.join(k)}")
                out[k] = f[src]
    return traverse_util.unflatten_dict(out)

