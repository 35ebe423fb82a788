"""Imports inside src/vidseek point one way (DESIGN.md "Data flow"): no module reaches itself.

Static check over every module's source: module-level and function-level `import` / `from …
import` statements (relative ones resolved against the importing module's package) become edges
between vidseek modules; any strongly connected component with more than one module is a cycle.
`from package import name` counts as an edge to the submodule `package.name` when that is a
module, else to the package. Importing a submodule does not count as importing its parent
packages (Python runs their `__init__`, but that is the package's own choice of re-exports).
"""
from __future__ import annotations

import ast
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vidseek"


def module_files(root: Path = SOURCE_ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every .py under src/vidseek (packages as their __init__)."""
    modules: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """vidseek modules that `module` imports anywhere in its source (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # The longest known prefix: `import vidseek.a.b.c` where c is a function → vidseek.a.b.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in known else source)
    return found


def import_graph(root: Path = SOURCE_ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative, so deep graphs need no recursion limit)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def describe_cycle(component: list[str], graph: dict[str, set[str]]) -> str:
    """The component's members with the edges that stay inside it."""
    members = set(component)
    edges = [f"{a} → {b}" for a in component for b in sorted(graph[a] & members)]
    return f"{{{', '.join(component)}}}: " + "; ".join(edges)


def test_the_graph_builder_sees_relative_function_level_and_from_package_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .low import helper\n")
    (package / "sub" / "low.py").write_text("def helper():\n    from vidseek import top\n")
    (package / "top.py").write_text("import os\nfrom vidseek.sub import low\nfrom .sub.low import helper\n")
    (package / "other.py").write_text("import vidseek.sub.low.helper\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "vidseek": set(),
        "vidseek.sub": {"vidseek.sub.low"},
        "vidseek.sub.low": {"vidseek.top"},
        "vidseek.top": {"vidseek.sub.low"},
        "vidseek.other": {"vidseek.sub.low"},
    }
    cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
    assert cycles == [["vidseek.sub.low", "vidseek.top"]]
    assert describe_cycle(cycles[0], graph) == ("{vidseek.sub.low, vidseek.top}: "
                                                "vidseek.sub.low → vidseek.top; vidseek.top → vidseek.sub.low")


def test_no_two_vidseek_modules_import_each_other():
    graph = import_graph()
    assert "vidseek.cli" in graph and "vidseek.index.dense" in graph["vidseek.search.searcher"] | {"vidseek.index.dense"}
    cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, graph) for c in cycles)
