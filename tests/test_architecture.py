"""The package's layout rules (ARCHITECTURE in README.md): imports flow one way, no lazy
import of the package's own modules, modules readable in one sitting, functions short."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradnoise"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80  # code lines, docstring excluded


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(imported gradnoise module, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradnoise":
            for alias in node.names:  # `from gradnoise import plots` imports a module
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in MODULES else node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.split(".")[0] == "gradnoise"]
    return out


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (the top-level ``gradnoise`` re-exports all,
    and is left out)."""
    return {
        name: {m for m, _ in _imports(path) if m in MODULES and m not in ("gradnoise", name)}
        for name, path in MODULES.items()
        if name != "gradnoise"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that returns to its start, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_lazy_import_of_the_package():
    lazy = [f"{name}: {m}" for name, path in MODULES.items() for m, top in _imports(path) if not top]
    assert not lazy, f"imports inside functions hide the module order: {lazy}"


def test_modules_are_short():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]  # the docstring
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


def test_every_package_is_installed():
    """pyproject.toml lists every package folder of the distribution (the experiments and
    figures are mapped into ``gradnoise``): a new subpackage that is not listed would be
    missing from an installed copy."""
    import tomllib

    root = PACKAGE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"gradnoise": PACKAGE, **{k: root / v for k, v in config["package-dir"].items()}}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
