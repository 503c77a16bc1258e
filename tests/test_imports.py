"""The package's import graph: no cycles, layers that only import downwards, top-level imports.

Parsed with ``ast`` (nothing is imported), so the test is fast and sees function-local imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facerecon"

#: modules whose function-local facerecon imports are still to be hoisted (owned by ongoing
#: rewrites at the time of writing); do not add to this list: import at the top instead
LOCAL_IMPORTS_LEFT = {"facerecon.evaluation.aflw2000", "facerecon.stages.aggregate", "facerecon.aggregation.albums",
                      "facerecon.aggregation.identity", "facerecon.export.meshio"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, node: ast.AST, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The facerecon modules an import statement names (``from pkg import submodule`` included)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    found = []
    for alias in node.names:
        name = f"{base}.{alias.name}"
        found.append(name if name in modules else base)
    return [m for m in found if m in modules]


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    """(module -> facerecon modules it imports anywhere, module -> lines of function-local imports)."""
    modules = _modules()
    graph, local = {}, {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        graph[module] = set()
        for node in ast.walk(tree):
            names = _imported(module, node, path.name == "__init__.py", modules)
            graph[module].update(n for n in names if n != module)
            if names and id(node) not in top:
                local.setdefault(module, []).append(node.lineno)
    return graph, local


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_among_facerecon_modules():
    graph, _ = import_graph()
    assert len(graph) > 50  # the parser found the package
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_lower_layers_do_not_import_higher_ones():
    graph, _ = import_graph()
    higher = ("facerecon.fitting", "facerecon.stages", "facerecon.training", "facerecon.evaluation",
              "facerecon.cli", "facerecon.aggregation")
    for module, imported in graph.items():
        if module.startswith("facerecon.facemodel"):
            assert not [m for m in imported if m.startswith(higher)], module
        if module.startswith("facerecon.render"):  # self-contained
            assert all(m.startswith("facerecon.render") for m in imported), module
        if module.startswith("facerecon.fitting"):
            assert not [m for m in imported if m.startswith(higher[1:])], module


def test_function_local_imports_only_where_they_keep_the_cli_fast():
    _, local = import_graph()
    outside_cli = {m for m in local if not m.startswith("facerecon.cli")}
    assert outside_cli <= LOCAL_IMPORTS_LEFT, sorted(outside_cli - LOCAL_IMPORTS_LEFT)


def test_the_stage_layer_registers_the_default_model_fetcher():
    """facemodel.resolve fetches the default model through the stages' fetch_and_install_ict (it
    calibrates with the fitter) without importing the stages itself."""
    import facerecon.stages  # noqa: F401 - registers the fetcher
    from facerecon.facemodel import resolve
    from facerecon.stages.model_install import fetch_and_install_ict

    assert resolve.default_fetcher is fetch_and_install_ict
