"""The picture of the code holds: the core never imports rendering, and packages import each other without cycles.

Imports are read from the source (``ast``), inside functions too, so a lazy import counts the same
as one at the top; imports under ``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import convlens

ROOT = Path(convlens.__file__).parent
CORE = ("heatmaps", "inside", "metrics", "models", "capture", "targets", "concepts")
EDGES_OUT = ("render", "report", "cli")
#: The one documented exception: ``Explanation.overlay`` is a one-line call into render.
ALLOWED = {("heatmaps/engine.py", "render")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__version__" else "convlens"


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_edges() -> list[tuple[str, str, str]]:
    """``(importing file, its package, imported package)`` for every convlens import between packages."""
    edges = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("convlens")]
            elif isinstance(node, ast.ImportFrom) and node.level:
                anchor = ".".join(base[: len(base) - node.level + 1])
                targets = ([f"{anchor}.{node.module}"] if node.module
                           else [f"{anchor}.{alias.name}" for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("convlens"):
                targets = [node.module]
            else:
                continue
            for target in targets:
                if _package(module) != _package(target):
                    edges.append((str(path.relative_to(ROOT)), _package(module), _package(target)))
    return edges


def test_the_core_imports_no_rendering_report_or_cli():
    wrong = [(file, target) for file, package, target in import_edges()
             if package in CORE and target in EDGES_OUT and (file, target) not in ALLOWED]
    assert wrong == []


def test_packages_import_each_other_without_cycles():
    graph = collections.defaultdict(set)
    for _, package, target in import_edges():
        graph[package].add(target)
    graph["convlens"].discard("convlens")

    def cycle_from(start: str) -> list[str] | None:
        path, seen = [start], set()

        def visit(node: str) -> list[str] | None:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(nxt)
                    found = visit(nxt)
                    if found:
                        return found
                    path.pop()
            return None

        return visit(start)

    cycles = [cycle for cycle in map(cycle_from, list(graph)) if cycle]
    assert cycles == []


def test_the_walker_sees_lazy_imports():
    edges = {(file, target) for file, _, target in import_edges()}
    assert ("heatmaps/engine.py", "render") in edges  # imported inside Explanation.overlay
