"""The package's layers: every import inside dpn_jax/ points down (or sideways within a layer), and
no modules import each other in a cycle.

Each module is parsed with ``ast``: imports at any depth (inside functions too, the lazy ones)
and ``importlib.import_module("dpn_jax...")`` strings count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpn_jax"

# Bottom to top: a layer, the modules in it (a name covers its submodules), and who may import it.
# A layer may always import itself (sideways); "*" = every layer.
LAYERS: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "base": (("errors", "_version", "xla_flags", "native", "options", "atomic", "buckets",
              "faults"), {"*"}),
    "metrics": (("metrics",), {"data", "train", "serving", "analysis", "app"}),
    "data": (("data",), {"nn", "models", "train", "serving", "analysis", "app"}),
    "dpo": (("dpo",), {"nn", "models", "train", "serving", "analysis", "app"}),
    "nn": (("nn",), {"models", "train", "serving", "analysis", "app"}),
    "models": (("models",), {"train", "serving", "analysis", "app"}),
    "train": (("train",), {"serving", "analysis", "app"}),
    "serving": (("serving",), {"analysis", "app"}),
    "analysis": (("analysis",), {"app"}),
    "app": (("", "benchmark", "cli", "cli_data", "runner", "sweep_runner", "tuning", "tuning_report",
             "tune_spaces"), set()),
}


def module_name(path: Path) -> str:
    parts = ["dpn_jax", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The layer whose longest module name is ``module`` or a package above it."""
    rel = module.removeprefix("dpn_jax").removeprefix(".")
    best, best_len = None, -1
    for layer, (names, _) in LAYERS.items():
        for name in names:
            if (rel == name or rel.startswith(name + ".") or name == "") and len(name) > best_len:
                best, best_len = layer, len(name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _import_module_target(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("dpn_jax.x")`` (an f-string: its constant
    prefix up to the last dot, i.e. the package it imports from)."""
    f = node.func
    if not (isinstance(f, ast.Attribute) and f.attr == "import_module"
            or isinstance(f, ast.Name) and f.id == "import_module") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rpartition(".")[0] or None
    return None


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported dpn_jax module, line) for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno
        elif isinstance(node, ast.Call):
            target = _import_module_target(node)
            if target:
                yield target, node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported dpn_jax module: first line}."""
    modules = package_modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, line in imports_of(module, path, known):
            if target.split(".")[0] != "dpn_jax" or target == module:
                continue
            while target not in known:  # `import dpn_jax.x.attr`-like names: the module above
                target = target.rpartition(".")[0]
            edges.setdefault(target, line)
    return graph


def test_every_import_points_down_or_sideways() -> None:
    graph = import_graph()
    bad = []
    for module, edges in graph.items():
        src = layer_of(module)
        for target, line in edges.items():
            dst = layer_of(target)
            importers = LAYERS[dst][1]
            if src != dst and "*" not in importers and src not in importers:
                bad.append(f"{module}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "modules importing each other in a cycle: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_dpo_is_pure_jax() -> None:
    """``dpn_jax.dpo`` holds the DPO as functions of arrays: no Flax."""
    for module, path in package_modules().items():
        if layer_of(module) == "dpo":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [n for n in names if n.split(".")[0] == "flax"], module


def test_the_checker_sees_lazy_and_string_imports(tmp_path: Path) -> None:
    """The parser finds an import inside a function and an ``import_module`` string."""
    src = tmp_path / "m.py"
    src.write_text("import importlib\n\ndef f():\n    from dpn_jax.train import loop\n"
                   "    return importlib.import_module('dpn_jax.serving.bundle')\n"
                   "def g(n):\n    return importlib.import_module(f'dpn_jax.serving.{n}')\n")
    known = {"dpn_jax.train.loop", "dpn_jax.serving.bundle", "dpn_jax.serving"}
    found = {t for t, _ in imports_of("dpn_jax.data.m", src, known)}
    assert {"dpn_jax.train.loop", "dpn_jax.serving.bundle", "dpn_jax.serving"} <= found
    assert layer_of("dpn_jax.data.m") == "data" and layer_of("dpn_jax.cli") == "app"
    assert layer_of("dpn_jax") == "app" and layer_of("dpn_jax.nn.mlp") == "nn"
