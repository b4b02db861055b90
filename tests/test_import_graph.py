"""The import graph of the project's packages (`ldm`, `sgm`, `cldm`), read from the source with `ast`: no cycles,
no private names taken from another module, and no project imports hidden inside functions.

Every import statement counts, at any depth (module level, class bodies, functions), except those under
`if TYPE_CHECKING:`. `from pkg import name` counts as importing the submodule `pkg.name` when there is one, else as
importing `pkg`; a package's `__init__` re-exporting a submodule counts as the package importing it. Each test lists
every violation of its rule at once, with file and line.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ldm", "sgm", "cldm")


@dataclass(frozen=True)
class ImportSite:
    """One imported project module (or an import that names none), as a statement of `module` states it."""

    module: str  # the importing module
    path: Path
    line: int
    target: str | None  # the project module imported; None when the statement names no module that exists
    statement: str  # the dotted name as written, for messages
    names: tuple[str, ...]  # for `from X import a, b`: the names taken from `target` itself (not submodules)
    in_function: bool


def discover_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of `packages` under `root` (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(statement, inside a function) for every import statement outside `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, in_function))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def _absolute_base(module: str, is_package: bool, statement: ast.ImportFrom) -> str:
    """The absolute dotted name `from <...> import` refers to, resolving relative imports."""
    if statement.level == 0:
        return statement.module or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]  # a package's __init__ is relative to the package itself
    anchor = anchor[:len(anchor) - (statement.level - 1)] if statement.level > 1 else anchor
    return ".".join(anchor + ([statement.module] if statement.module else []))


def import_sites(modules: dict[str, Path], packages: tuple[str, ...]) -> list[ImportSite]:
    """Every import of a project module by a project module."""
    sites = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for statement, in_function in _import_statements(tree):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if alias.name.split(".")[0] in packages:
                        target = alias.name if alias.name in modules else None
                        sites.append(ImportSite(module, path, statement.lineno, target, alias.name, (), in_function))
                continue
            base = _absolute_base(module, is_package, statement)
            if base.split(".")[0] not in packages:
                continue
            plain_names = []
            for alias in statement.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    sites.append(ImportSite(module, path, statement.lineno, submodule, submodule, (), in_function))
                else:
                    plain_names.append(alias.name)
            if plain_names:
                target = base if base in modules else None
                sites.append(ImportSite(module, path, statement.lineno, target, base, tuple(plain_names),
                                        in_function))
    return sites


def _where(site: ImportSite) -> str:
    return f"{site.path.relative_to(ROOT) if site.path.is_relative_to(ROOT) else site.path}:{site.line}"


def find_cycles(sites: list[ImportSite]) -> list[list[ImportSite]]:
    """One cycle (as the import sites along it) per strongly connected component of the module graph that has one."""
    edges: dict[str, dict[str, ImportSite]] = {}
    for site in sites:
        if site.target is not None:
            edges.setdefault(site.module, {}).setdefault(site.target, site)
    components = _strongly_connected(edges)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in edges.get(start, {}):
            continue
        cycles.append(_cycle_through(start, component, edges))
    return sorted(cycles, key=lambda cycle: cycle[0].module)


def _strongly_connected(edges: dict[str, dict[str, ImportSite]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (the graph may be deep)."""
    nodes = sorted(set(edges) | {target for targets in edges.values() for target in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _cycle_through(start: str, component: set[str], edges: dict[str, dict[str, ImportSite]]) -> list[ImportSite]:
    """The shortest path of import sites from `start` back to itself inside `component` (breadth first)."""
    previous: dict[str, ImportSite] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, site in sorted(edges.get(node, {}).items()):
                if target not in component or target in previous:
                    continue
                previous[target] = site
                if target == start:
                    path = [site]
                    while path[0].module != start:
                        path.insert(0, previous[path[0].module])
                    return path
                following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its component")  # a component always has one


def private_imports(sites: list[ImportSite]) -> list[ImportSite]:
    """`from other.module import _name` (not dunder names) between different project modules."""
    return [site for site in sites if site.target != site.module and any(
        name.startswith("_") and not (name.startswith("__") and name.endswith("__")) for name in site.names)]


def function_level_imports(sites: list[ImportSite]) -> list[ImportSite]:
    return [site for site in sites if site.in_function]


def unresolved_imports(sites: list[ImportSite]) -> list[ImportSite]:
    return [site for site in sites if site.target is None]


@pytest.fixture(scope="module")
def project_sites() -> list[ImportSite]:
    return import_sites(discover_modules(ROOT, PACKAGES), PACKAGES)


def test_no_import_cycles(project_sites):
    cycles = find_cycles(project_sites)
    lines = [" -> ".join([cycle[0].module] + [site.target for site in cycle]) + "\n    via "
             + ", ".join(f"{_where(site)} ({site.module} imports {site.target})" for site in cycle)
             for cycle in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def test_no_private_names_from_other_modules(project_sites):
    found = private_imports(project_sites)
    lines = [f"{_where(site)}: {site.module} imports "
             f"{', '.join(n for n in site.names if n.startswith('_'))} from {site.target}" for site in found]
    assert not found, (f"{len(found)} import(s) of private names (make them public or move them where they "
                       "belong):\n" + "\n".join(lines))


def test_project_imports_at_module_level(project_sites):
    found = function_level_imports(project_sites)
    lines = [f"{_where(site)}: {site.module} imports {site.statement} inside a function" for site in found]
    assert not found, (f"{len(found)} function-level import(s) of project modules (move them to the top; third-party "
                       "optional dependencies may stay lazy):\n" + "\n".join(lines))


def test_every_project_import_names_a_module(project_sites):
    found = unresolved_imports(project_sites)
    lines = [f"{_where(site)}: {site.module} imports {site.statement}, which is no module here" for site in found]
    assert not found, f"{len(found)} import(s) of project modules that do not exist:\n" + "\n".join(lines)


# --- the checker itself, on a made-up package ----------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_on_a_made_up_package(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import thing\n",  # re-export: pkg imports pkg.a
        "pkg/a.py": "from . import b\nfrom .sub.c import _hidden, __version__\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nimport numpy\nif TYPE_CHECKING:\n    from pkg.a import thing\n"
                     "else:\n    from pkg import sub\n\ndef f():\n    import scipy\n    from pkg.sub import c\n"),
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a\nfrom .. import b as _b\nfrom pkg.nothing import x\n",
    })
    modules = discover_modules(tmp_path, ("pkg",))
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]
    sites = import_sites(modules, ("pkg",))
    edges = {(site.module, site.target) for site in sites}
    assert edges == {("pkg", "pkg.a"), ("pkg.a", "pkg.b"), ("pkg.a", "pkg.sub.c"), ("pkg.b", "pkg.sub"),
                     ("pkg.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a"), ("pkg.sub.c", "pkg.b"), ("pkg.sub.c", None)}
    cycles = find_cycles(sites)
    assert len(cycles) == 1  # pkg.a, pkg.b and pkg.sub.c form one component
    assert [site.module for site in cycles[0]] == ["pkg.a", "pkg.sub.c"]
    assert [(s.module, s.names) for s in private_imports(sites)] == [("pkg.a", ("_hidden", "__version__"))]
    assert [(s.module, s.target) for s in function_level_imports(sites)] == [("pkg.b", "pkg.sub.c")]
    assert [s.statement for s in unresolved_imports(sites)] == ["pkg.nothing"]
