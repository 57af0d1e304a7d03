"""The package's layering: no import circles, and low layers never import high ones.

The import graph is read from the source files with ``ast`` (every ``import`` statement, also those inside
functions and ``TYPE_CHECKING`` blocks: an import moved into a function still ties the two modules together), so
new modules are picked up without editing this file; only a new top-level module or package has to be given a
layer in :data:`LAYERS`.

Units are the top-level modules and packages of ``infinitystar`` (``config``, ``vae``, ``pipeline``, ...). A
*leaf* module, one that imports nothing from ``infinitystar`` (``fileio``, ``generation.schedules``, ...), cannot
close a circle, so any layer may import it; that is how ``config``, ``vae`` and ``transformer`` use the pure
schedule tables that live in ``generation``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "infinitystar"
PACKAGE = PACKAGE_DIR.name

# Lowest first. A unit may import (non-leaf) modules of its own unit and of units on strictly lower layers only;
# two units on one layer may not import each other. The __init__ docstrings say the same in words.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer) for layer in (
    {"fileio", "errors"},                          # atomic file writes; the CLI's error boundary: stdlib (+torch)
    {"hardware"},                                  # what the CPU computes natively: the default CPU precision
    {"config"},                                    # model/pipeline configs and presets
    {"vae", "transformer", "text", "media"},       # the models, the text encoders, image/video I/O
    {"checkpoints", "generation", "outputs"},      # weights on disk; the generation plan and loop; run records
    {"memory"},                                    # memory modes, offload, quantization, the memory model
    {"pipeline"},                                  # InfinityStarPipeline: loading, encode, call, decode
    {"train"},                                     # the trainers (they export pipelines)
    {"demo"},                                      # the demo model: weights, loader, judge, recipe
    {"web"},                                       # front door: the web page
    {"cli"},                                       # front door: the command line (``serve`` starts the web page)
))


def module_name(path: Path) -> str:
    """``infinitystar.vae.model`` for ``src/infinitystar/vae/model.py`` (a package's ``__init__``: the package)."""
    parts = (PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``importer``)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]  # a module's ``.`` is its package; a package's ``.`` is itself
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The ``infinitystar`` modules ``path`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    importer = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, importer, path.name == "__init__.py")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import infinitystar.vae.model`` binds the top package but depends on the named module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != importer:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def unit(module: str) -> str:
    """The top-level module or package of ``module`` (``infinitystar`` itself for the package's ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


GRAPH = import_graph()
LEAVES = {m for m, deps in GRAPH.items() if not deps}


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the module imports behind it, leaves and the package root excluded."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, deps in GRAPH.items():
        for dep in deps:
            if dep in LEAVES or unit(dep) == unit(module) or dep == PACKAGE:
                continue
            edges.setdefault((unit(module), unit(dep)), []).append(f"{module} -> {dep}")
    return edges


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"infinitystar.{name} has no layer: add it to LAYERS in tests/test_layering.py (and say "
                         "what it may import in its docstring)")


# ----------------------------------------------------------------------------------------------
# The graph reader itself, on known lines (so a broken parser cannot make the rules below pass vacuously)
# ----------------------------------------------------------------------------------------------


def test_graph_reads_the_tree():
    # Facts of the tree, chosen because each exercises one way of writing an import:
    assert "infinitystar.demo" in GRAPH["infinitystar.cli"]  # ``from infinitystar.demo import load_pipeline``
    assert "infinitystar.demo.evaluate" in GRAPH["infinitystar.cli"]  # ``from infinitystar.demo import evaluate``
    assert "infinitystar.transformer.rope" in GRAPH["infinitystar.transformer.model"]  # ``from .rope import``
    assert "infinitystar.config" in GRAPH["infinitystar.transformer.model"]  # ``from ..config import``
    assert "infinitystar.fileio" in LEAVES and "infinitystar.pipeline" not in LEAVES


def test_graph_reader_on_a_synthetic_tree(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..low import x\n    import infinitystar.sub.b\n")
    (pkg / "sub" / "b.py").write_text("from infinitystar import low\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE_DIR", pkg)
    graph = import_graph()
    assert graph == {
        PACKAGE: set(),
        f"{PACKAGE}.low": set(),
        f"{PACKAGE}.sub": {f"{PACKAGE}.sub.a"},
        f"{PACKAGE}.sub.a": {f"{PACKAGE}.low", f"{PACKAGE}.sub.b"},
        f"{PACKAGE}.sub.b": {f"{PACKAGE}.low"},
    }
    assert find_cycle(graph) is None
    assert find_cycle({**graph, f"{PACKAGE}.low": {f"{PACKAGE}.sub.b"}}) == [
        f"{PACKAGE}.low", f"{PACKAGE}.sub.b", f"{PACKAGE}.low"]


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------


def test_no_import_cycle_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for a, b in unit_edges():
        graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, ("import cycle between packages: " + " -> ".join(cycle) + "; via "
                           + "; ".join(e for a, b in zip(cycle, cycle[1:]) for e in unit_edges()[(a, b)]))


@pytest.mark.parametrize("name", sorted({unit(m) for m in GRAPH} - {PACKAGE}))
def test_every_unit_has_a_layer(name):
    layer_of(name)


def test_low_layers_do_not_import_high_ones():
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}): {', '.join(sorted(via))}"
             for (a, b), via in sorted(unit_edges().items())
             if a != PACKAGE and layer_of(b) >= layer_of(a)]
    assert not wrong, "\n".join(wrong)


def test_package_root_imports_nothing():
    # ``import infinitystar.config`` runs infinitystar/__init__.py first: it must stay free of imports so that
    # importing one low module never pulls in the whole package.
    assert GRAPH[PACKAGE] == set()
