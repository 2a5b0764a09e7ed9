"""The package's structure, read from its source with ``ast`` (nothing is imported).

- No module takes a private name (``_name``) from another module: what another module needs is
  public in its own module, with a docstring.
- No import cycle between modules, function-level imports included.
- Every module sits in a sub-package, except the shared vocabulary and the ``python -m`` shims.
- A function-level import says why it is not at the top (a comment on its line or the line above).
- ``quant/`` imports nothing of nvfp4bench above it, and ``models/`` never imports the swap.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nvfp4bench"
TOP_LEVEL = {"__init__", "__main__", "config", "cell", "results", "atomic", "env", "options",
             "locks",
             "bench", "verify_te", "gpu_check"}  # shared vocabulary and python -m shims
SHIMS = {"bench", "verify_te", "gpu_check", "__main__"}
SHIM_MAX_LINES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    module: str        # the importing module
    target: str        # the module whose names are taken (a module of MODULES)
    names: tuple[str, ...]
    line: int
    in_function: bool


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = _package_of(module).split(".")
                    base = base[:len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] == "nvfp4bench":
                    for alias in child.names:
                        sub = f"{source}.{alias.name}"
                        if sub in MODULES:  # from pkg import submodule
                            found.append(Import(module, sub, (), child.lineno, in_function))
                        else:
                            found.append(Import(module, source, (alias.name,), child.lineno,
                                                in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "nvfp4bench":
                        found.append(Import(module, alias.name, (), child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _attribute_uses(module: str) -> list[tuple[str, str, int]]:
    """(target module, private attribute, line) for ``alias._name`` where alias is a module of
    the package imported into ``module`` under that name."""
    tree = ast.parse(MODULES[module].read_text())
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nvfp4bench"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
    return [(aliases[node.value.id], node.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and _private(node.attr)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_walk_sees_the_package():
    assert "nvfp4bench.quant.nvfp4" in MODULES and len(MODULES) > 40
    assert any(imp.target == "nvfp4bench.quant.nvfp4" for imp in IMPORTS)


def test_no_private_name_crosses_a_module():
    crossings = [f"{MODULES[i.module].relative_to(PACKAGE.parent)}:{i.line} takes {name} from "
                 f"{i.target}" for i in IMPORTS for name in i.names
                 if _private(name) and i.target != i.module]
    crossings += [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} uses {target}.{attr}"
                  for m in MODULES for target, attr, line in _attribute_uses(m) if target != m]
    assert crossings == []


def _cycles() -> list[list[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def test_no_import_cycle():
    assert _cycles() == []


def test_every_module_sits_in_a_sub_package():
    loose = [m for m, path in MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"
             and m.split(".")[1] not in TOP_LEVEL]
    assert loose == []


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_entry_shims_are_thin(shim):
    lines = MODULES[f"nvfp4bench.{shim}"].read_text().splitlines()
    assert len(lines) <= SHIM_MAX_LINES


def test_function_level_imports_say_why():
    silent = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        silent.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert sorted(set(silent)) == []


def test_quant_is_the_bottom_layer():
    upward = [f"{i.module} -> {i.target}" for i in IMPORTS
              if i.module.startswith("nvfp4bench.quant")
              and not i.target.startswith("nvfp4bench.quant")]
    assert upward == []
    swaps = [f"{i.module} -> {i.target}" for i in IMPORTS if i.module.startswith("nvfp4bench.models")
             and i.target.startswith("nvfp4bench.quant") and i.target != "nvfp4bench.quant.matmul"]
    assert swaps == []
