"""The picture of the code holds: the core never imports rendering, packages and files import each other without
cycles, and each rule that has one room is stated there only.

Imports are read from the source (``ast``), inside functions too, so a lazy import counts the same
as one at the top; imports under ``if TYPE_CHECKING:`` never run and do not count. Between files,
only the imports that run when a module is imported (outside functions) count: those must not
form a cycle, which would leave one of the modules half-initialised for the other.
"""

from __future__ import annotations

import ast
import collections
import re
import sys
from pathlib import Path

import pytest

import convlens

ROOT = Path(convlens.__file__).parent
CORE = ("heatmaps", "inside", "metrics", "models", "capture", "targets", "concepts", "atlas", "evaluation", "train")
EDGES_OUT = ("render", "report", "cli", "serve")
#: The documented exceptions, core APIs whose promised result is a picture drawn by render:
#: ``Explanation.overlay`` (a one-line call), the atlas's dataset examples (each unit's map over its top images,
#: and the figures ``write_examples`` and ``dissect`` save) and ``train``'s evaluation figures (curves, confusion, ROC).
ALLOWED = {("heatmaps/engine.py", "render"), ("atlas/examples.py", "render"), ("train/evaluate.py", "render")}
#: Rules with one room: what, the source text that states it, the one file that may hold it.
ONE_ROOM = [
    ("the progress callback type", re.compile(r"^Progress\s*=", re.M), "progress.py"),
    ("the Jinja environment", re.compile(r"jinja2\.Environment\("), "report/templating.py"),
    ("the input's geometry", re.compile(r"^def (crop_box|mask_for_model|mask_at_input)\(", re.M),
     "models/transforms.py"),
    ("the check that a layer ran", re.compile(r"did not run in the forward pass"), "capture.py"),
    ("the check that a layer is spatial", re.compile(r"has no spatial output \(shape"), "capture.py"),
]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__version__" else "convlens"


def _under_type_checking(node: ast.AST) -> bool:
    """Whether ``node`` is ``if TYPE_CHECKING:`` (its body never runs)."""
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _under_type_checking(child):
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


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def _load_time_imports(tree: ast.Module):
    """The import statements that run when the module is imported: not those in functions or under TYPE_CHECKING."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _under_type_checking(node):
            stack.extend(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _imported_files(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The convlens modules ``node`` runs: the one named, a submodule imported by name, and their packages'
    ``__init__``, except the packages ``module`` itself is in (those are already being imported)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        source = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
        source = ".".join(part for part in (source, node.module) if part)
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
    own = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 2)}
    found = {".".join(name.split(".")[:k]) for name in names for k in range(1, name.count(".") + 2)}
    return {name for name in found if name in modules and name not in own}


def file_import_graph() -> dict[str, set[str]]:
    """convlens module -> the convlens modules its import runs at once (:func:`_load_time_imports`)."""
    paths = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        nodes = _load_time_imports(ast.parse(path.read_text()))
        graph[module] = set().union(*(_imported_files(module, path.name == "__init__.py", node, set(paths))
                                      for node in nodes))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]`` (depth-first search), or None when there is none."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt):], nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


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


def test_files_import_each_other_without_cycles():
    cycle = find_cycle(file_import_graph())
    assert cycle is None, "file-level import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles_and_resolves_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    modules = {"convlens", "convlens.report", "convlens.report.context", "convlens.models",
               "convlens.models.transforms"}
    (node,) = ast.parse("from ..models.transforms import crop_box").body
    assert _imported_files("convlens.report.context", False, node, modules) == {"convlens.models",
                                                                                "convlens.models.transforms"}
    (node,) = ast.parse("from . import context").body
    assert _imported_files("convlens.report", True, node, modules) == {"convlens.report.context"}
    lazy = ast.parse("def f():\n    import convlens.models\nif TYPE_CHECKING:\n    import convlens.report\n")
    assert list(_load_time_imports(lazy)) == []


@pytest.mark.parametrize("what,pattern,home", ONE_ROOM, ids=[what for what, _, _ in ONE_ROOM])
def test_each_rule_has_one_room(what, pattern, home):
    found = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.py") if pattern.search(path.read_text()))
    assert found == [home], f"{what} belongs in {home} only"


def test_the_progress_module_needs_only_the_standard_library():
    """Every part reports progress through it, and the CLI shows it, before torch is imported (if ever)."""
    tree = ast.parse((ROOT / "progress.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - {"__future__", "tqdm"} <= sys.stdlib_module_names
