"""The trainer's modules import each other without cycles (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO_ROOT


def package_imports(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports, read from the source of `root/package`."""
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                    base = ".".join([*parts, base] if base else parts)
                imported.add(base)
                # `from package import module` names a module, not an attribute.
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {name for name in imported if name in modules and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle is not None:
            return cycle
    return None


def test_the_trainer_has_no_import_cycle() -> None:
    graph = package_imports(REPO_ROOT, "trainer")
    assert {"trainer.cli", "trainer.fit", "trainer.export", "trainer.tuning"} <= set(graph)
    assert "trainer.fit" in graph["trainer.export"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "a.py").write_text("from pkg.b import helper\n", encoding="utf-8")
    (package / "b.py").write_text("def helper():\n    from . import c\n    return c\n", encoding="utf-8")
    (package / "c.py").write_text("import pkg.a\n", encoding="utf-8")
    (package / "d.py").write_text("from pkg import a\n", encoding="utf-8")

    graph = package_imports(tmp_path, "pkg")
    assert graph["pkg.d"] == {"pkg", "pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    graph["pkg.c"].clear()
    assert find_cycle(graph) is None
