"""The library's structure, read from the source with `ast` (issue 20): no import circle between modules (counting
imports inside functions, so none can hide one), no private name imported across modules, dinolite never imports
scale/, and no file grows past about 500 lines unless it holds a single idea."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dinolite", "scale")
# Larger than ~500 lines but one idea each: the readable ViT, and the curation pipeline.
SINGLE_IDEA = {"dinolite/models.py", "dinolite/curation.py"}
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
# Callers held to public names: the library and the scripts that make the committed weights.
CALLERS = {**MODULES, **{str(p.relative_to(ROOT)): p for p in sorted((ROOT / "book" / "weights").glob("*.py"))}}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path):
    """(target module, imported name or None, line, inside a function) for every import of a project module."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, node.lineno, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from dinolite import hub`: the module dinolite.hub
                    yield submodule, None, node.lineno, id(node) in in_function
                else:
                    yield source, alias.name, node.lineno, id(node) in in_function


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _, _ in imports(module, path) if target in MODULES}
            for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_even_counting_imports_inside_functions():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_dinolite_never_imports_scale():
    bad = [f"{module}:{line} imports {target}" for module, path in MODULES.items() if module.startswith("dinolite")
           for target, _, line, _ in imports(module, path) if target.split(".")[0] == "scale"]
    assert not bad, bad


def _private_uses(caller: str, path: Path):
    """`from m import _x` and `m._x` where m is a project module (caller's own names excepted)."""
    module = caller if caller in MODULES else ""
    aliases = {}
    for target, name, line, _ in imports(module, path):
        if name and name.startswith("_") and target != module:
            yield f"{caller}:{line} imports {target}.{name}"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            source = _absolute(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != module):
            yield f"{caller}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"


def test_no_private_name_is_used_across_modules():
    bad = [use for caller, path in CALLERS.items() for use in _private_uses(caller, path)]
    assert not bad, bad


def test_the_private_name_check_sees_both_forms(tmp_path):
    path = tmp_path / "caller.py"
    path.write_text("from dinolite.train.data import _MODEL\nfrom dinolite import hub\nhub._private()\n")
    assert len(list(_private_uses("caller", path))) == 2


@pytest.mark.parametrize("module", sorted(MODULES))
def test_file_holds_about_500_lines_at_most(module):
    path = MODULES[module]
    relative = str(path.relative_to(ROOT))
    if relative not in SINGLE_IDEA:
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{relative}: split it by idea"
