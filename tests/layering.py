"""The layering rule, read from the sources: `server → jaxserve → models → pallas_kernels`.

Every `.py` file of the four packages is parsed with `ast` (nothing is imported) and each import
in it, at module level or inside a function, is resolved to the project modules it runs:
- `import a.b.c` runs `a.b.c` (a package counts as its `__init__.py`);
- `from a.b import c` runs `a.b.c` when that is a module, else `a.b` (c is a name in it);
- relative imports (`from . import x`, `from ..y import z`) resolve against the file's package;
- `importlib.import_module("a.b")` with a literal name counts as `import a.b`.
Parent packages a submodule import also initialises are not counted: by the time a submodule runs
its package is already being imported, so such an edge would make every package look cyclic.

Two kinds of violation: an import of a package ranked above the importer's, and an import cycle
between project modules (a strongly connected component of the import graph).

    python -m tests.layering          # prints the violations, exits 1 if there are any
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sys

# Higher imports lower, never the reverse.
RANKS = {"pallas_kernels": 0, "models": 1, "jaxserve": 2, "server": 3}
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # project module it runs
    path: pathlib.Path
    line: int
    text: str  # the statement as written

    def where(self, root: pathlib.Path | None = None) -> str:
        path = self.path.relative_to(root) if root is not None else self.path
        return f"{path}:{self.line}"


def module_files(root: pathlib.Path, packages=tuple(RANKS)) -> dict[str, pathlib.Path]:
    """Module name -> source file, for every `.py` under the given packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _package_of(module: str, path: pathlib.Path) -> str:
    """The package relative imports in this file start from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: pathlib.Path, level: int, name: str | None) -> str:
    base = _package_of(module, path).split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owning_module(name: str, modules) -> str | None:
    """The project module `name` runs: itself, or the closest enclosing one that exists."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: pathlib.Path, modules) -> list[Import]:
    """Every import statement in the file, resolved to the project modules it runs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def add(target: str, node: ast.AST) -> None:
        resolved = _owning_module(target, modules)
        if resolved is not None and resolved != module:
            imp = Import(module, resolved, path, node.lineno, ast.unparse(node))
            if imp not in found:  # `from p import a, b` names p twice when neither is a module
                found.append(imp)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, path, node.level, node.module) if node.level
                    else node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                add(submodule if submodule in modules else base, node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node)
    return found


def all_imports(root: pathlib.Path = ROOT, packages=tuple(RANKS)) -> list[Import]:
    modules = module_files(root, packages)
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def upward_imports(imports: list[Import], ranks=RANKS) -> list[Import]:
    """Imports of a package ranked above the importer's."""
    rank = lambda module: ranks[module.split(".")[0]]  # noqa: E731
    return [imp for imp in imports if rank(imp.imported) > rank(imp.importer)]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The modules of each import cycle (strongly connected components of more than one module,
    Tarjan's algorithm), each sorted, in a stable order."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:  # iterative: deep graphs must not hit the recursion limit
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_edges(cycle: list[str], imports: list[Import]) -> list[Import]:
    """The imports that stay inside one cycle (where to cut it)."""
    members = set(cycle)
    return [imp for imp in imports if imp.importer in members and imp.imported in members]


def upward_report(imports: list[Import], root: pathlib.Path = ROOT) -> list[str]:
    """One line per upward import: file:line, the statement, importer -> imported."""
    return [f"{imp.where(root)}: {imp.text}  ({imp.importer} -> {imp.imported})"
            for imp in upward_imports(imports)]


def cycle_report(imports: list[Import], root: pathlib.Path = ROOT) -> list[str]:
    """One paragraph per cycle: its modules, then the imports between them (file:line)."""
    return [f"{', '.join(cycle)}:\n" + "\n".join(f"    {imp.where(root)}: {imp.text}"
                                               for imp in cycle_edges(cycle, imports))
            for cycle in import_cycles(imports)]


if __name__ == "__main__":
    found = all_imports()
    problems = ([f"upward import: {line}" for line in upward_report(found)]
                + [f"import cycle: {paragraph}" for paragraph in cycle_report(found)])
    print("\n".join(problems) or "layering holds")
    sys.exit(1 if problems else 0)
