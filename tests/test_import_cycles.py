"""No module of the package imports itself back, not even through an import written inside a
function: every ``import`` statement anywhere in a module counts, except those under
``if TYPE_CHECKING:``, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

import attention

PACKAGE_ROOT = Path(attention.__file__).parent


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``'s)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """The nodes of ``tree``, less the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the module ``pkg.sub``; ``from mod import f``, mod.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else source for alias in node.names]
        else:
            continue
        for target in targets:
            found.update(_run_by_importing(target, name, modules))
    return found


def _run_by_importing(target: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """What importing ``target`` runs: the module, and each package above it that the
    importer is not itself inside (its ``__init__`` runs first, with all it imports)."""
    parts = target.split(".")
    run = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {module for module in run
            if module in modules and module != importer
            and not (importer + ".").startswith(module + ".")}


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (first repeated last), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path)):
                return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "attention.translation.training" in graph and len(graph) > 50
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    """The check can fail: two modules that import each other, one of them only inside a
    function, form a cycle; an import under ``if TYPE_CHECKING:`` does not."""
    package = tmp_path / "attention"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import thing\n    return thing\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    from .d import D\n")
    (package / "d.py").write_text("from attention.c import something\n")
    graph = import_graph(package)
    assert graph["attention.b"] == {"attention.a"}
    assert find_cycle(graph) == ["attention.a", "attention.b", "attention.a"]
    assert graph["attention.c"] == set() and graph["attention.d"] == {"attention.c"}


def test_the_check_sees_a_cycle_through_a_package_init(tmp_path):
    """Importing ``pkg.sub.mod`` runs ``pkg/sub/__init__.py`` first: a cycle through what that
    ``__init__`` imports counts, while a module's own enclosing packages do not."""
    package = tmp_path / "attention"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import user\n")
    (package / "user.py").write_text("from .sub.plain import thing\n")
    (package / "sub" / "__init__.py").write_text("from .other import x\n")
    (package / "sub" / "plain.py").write_text("thing = 1\n")
    (package / "sub" / "other.py").write_text("from ..user import y\n")
    graph = import_graph(package)
    assert graph["attention.user"] == {"attention.sub", "attention.sub.plain"}
    assert find_cycle(graph) == ["attention.user", "attention.sub", "attention.sub.other",
                                 "attention.user"]


def test_the_application_packages_share_helpers_only_through_common():
    """``translation`` and ``bench`` take their shared helpers (errors, YAML, atomic writes,
    pictures, devices) from ``attention.common``, never from each other."""
    graph = import_graph()
    for importer, imported in (("attention.bench", "attention.translation"),
                               ("attention.translation", "attention.bench")):
        borrowed = sorted((name, target) for name, targets in graph.items()
                          if name.startswith(importer) for target in targets
                          if target.startswith(imported))
        assert borrowed == [], borrowed
    assert all(not target.startswith(("attention.translation", "attention.bench"))
               for name, targets in graph.items() if name.startswith("attention.common")
               for target in targets)
