"""Dependencies point one way (shared/LAYOUT.md): read from the import graph of every module, lazy
imports inside functions included. Models and weights never import image-side adapters, guidance,
methods, sampling or data; data never imports methods; methods never import the training or sampling
entry points above them; there are no import cycles; configs import as a package, without
``sys.path`` edits. ``from package import module`` counts as importing the module (not the
package's ``__init__``)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for p in (ROOT / package).rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


MODULES = _modules("customjax")


def _imports(name: str, path: Path) -> set[str]:
    """The customjax modules ``name`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_pkg else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= subs if len(subs) == len(node.names) else subs | {base}
    out = set()
    for m in found:
        while m and m not in MODULES:
            m = m.rpartition(".")[0]
        if m.startswith("customjax") and m != name:
            out.add(m)
    return out


GRAPH = {n: _imports(n, p) for n, p in MODULES.items()}
# the registry imports its methods by name (one line a method)
from customjax.methods.registry import MODULES as _REGISTERED  # noqa: E402

GRAPH["customjax.methods.registry"] |= {f"customjax.methods.{n}" for n in _REGISTERED}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in GRAPH[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


RULES = [
    # (modules, may never reach)
    (("customjax.models", "customjax.weights"), ("customjax.adapters", "customjax.guidance", "customjax.methods",
                                                 "customjax.sampling", "customjax.data", "customjax.trainer",
                                                 "customjax.train", "customjax.sample")),
    (("customjax.data",), ("customjax.methods", "customjax.trainer", "customjax.sampling")),
    (("customjax.methods",), ("customjax.trainer", "customjax.train", "customjax.sample", "customjax.preview",
                              "customjax.export", "customjax.shapeworld.benchmark")),
    (("customjax.control", "customjax.guidance", "customjax.adapters"), ("customjax.methods",)),
    # learnt words and the formats of other tools sit below the methods that train them
    (("customjax.concepts.tokens", "customjax.concepts.clip", "customjax.concepts.files"),
     ("customjax.methods", "customjax.trainer", "customjax.sampling", "customjax.data", "customjax.finetune")),
]
# ShapeWorld (world, metrics, pretraining, benchmark, shipped base) is a lab beside the library: no module
# outside customjax.shapeworld reaches it (the loader finds its generated data through a registry).
CORE = tuple(sorted({n.split(".")[1] for n in MODULES if n.count(".") >= 1} - {"shapeworld"}))
RULES.append((tuple(f"customjax.{c}" for c in CORE), ("customjax.shapeworld",)))
# The one door: the evaluation's protocol registry names the ShapeWorld comparison by entry point (loaded on
# use); the edge is added here so the graph sees it, and only the CLI above it may reach the lab through it.
from customjax.evaluation.protocols import PROTOCOLS as _PROTOCOLS  # noqa: E402

GRAPH["customjax.evaluation.protocols"] |= {v.partition(":")[0] for v in _PROTOCOLS.values()}
DOOR = ("customjax.evaluation.protocols", "customjax.evaluate")
RULES[-1] = (RULES[-1][0], RULES[-1][1], DOOR)


@pytest.mark.parametrize("low,high,door", [(*r, ())[:3] for r in RULES], ids=[r[0][0].split(".")[1] if len(r[0]) < 4 else "core" for r in RULES])
def test_lower_layers_never_import_higher_ones(low, high, door):
    bad = {n: sorted(m for m in _reach(n) if _in(m, *high)) for n in GRAPH if _in(n, *low) and n not in door}
    assert not {n: m for n, m in bad.items() if m}


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):                                   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_the_graph_sees_lazy_imports():
    """A function-level import counts (the checks above would miss them otherwise), and the registry
    reaches every registered method module."""
    assert "customjax.weights.timm" in GRAPH["customjax.methods.common"]   # imported inside encoder()
    assert {"customjax.methods.realcustom", "customjax.methods.realcustompp"} <= GRAPH["customjax.methods.registry"]
    assert all(f"customjax.methods.{n}" in MODULES for n in _REGISTERED)


def test_configs_import_as_a_package_without_path_edits():
    import configs

    names = [m.name for m in pkgutil.iter_modules(configs.__path__)]
    assert {"common", "realcustom", "realcustompp"} <= set(names)
    for name in names:
        text = (ROOT / "configs" / f"{name}.py").read_text()
        assert "sys.path" not in text, name
        mod = importlib.import_module(f"configs.{name}")
        if hasattr(mod, "get_config") and name != "shapeworld_base":
            assert mod.get_config().method
