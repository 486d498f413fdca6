"""The shape of kvwire's import graph, checked: no cycles, no library module leaning on
kvwire.testing, no private name reaching across modules, and a protocol core without I/O.

Today's violations are listed below, one line each with the redesign stage that removes
it; a new one fails here, and so does an allowlisted one that is gone (shrink the list).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kvwire"
IO_MODULES = {"socket", "selectors", "threading", "ssl", "asyncio", "ucxx", "kvwire.transport", "kvwire.sender",
              "kvwire.receiver"}

# Import cycles (each as its sorted modules) -> the stage that breaks it.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}
# (importer, imported) pairs of a library module using kvwire.testing -> stage.
ALLOWED_TESTING: dict[tuple[str, str], str] = {}
# (module, "other.module._name") private names used across modules -> stage.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}
# Cycles between the library's folders and top-level modules (kvwire.X), each sorted -> stage.
ALLOWED_FOLDER_CYCLES: dict[tuple[str, ...], str] = {}
LONG_MODULE_LINES = 420  # a library module longer than this says why at its top ("Why it is long:")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(name: str) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import in ``name``, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, node)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((child, None) if child in MODULES else (base, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in imports(name) if target in MODULES and target != name} for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(tuple(sorted(component)))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles():
    found = set(cycles(graph()))
    assert found - set(ALLOWED_CYCLES) == set(), "new import cycles"
    assert set(ALLOWED_CYCLES) - found == set(), "allowlisted cycles that are gone: remove them from the list"


def test_no_import_cycles_between_folders():
    """kvwire.cuda.ops importing kvwire.device, which imports kvwire.cuda.checksum, is a
    loop between two parts of the library even where no module imports itself back."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {unit(name): set() for name in MODULES}
    for name, targets in graph().items():
        edges[unit(name)].update(unit(t) for t in targets if unit(t) != unit(name))
    found = set(cycles(edges))
    assert found - set(ALLOWED_FOLDER_CYCLES) == set(), "new import cycles between folders"
    assert set(ALLOWED_FOLDER_CYCLES) - found == set(), "allowlisted cycles that are gone: remove them from the list"


def test_long_library_modules_say_why():
    long_and_silent = []
    for name, path in MODULES.items():
        source = path.read_text()
        reason = "Why it is long:" in (ast.get_docstring(ast.parse(source)) or "")
        if source.count("\n") > LONG_MODULE_LINES and not reason:
            long_and_silent.append(name)
    assert long_and_silent == []


def test_library_modules_do_not_import_kvwire_testing():
    found = {(name, target) for name in MODULES if not name.startswith("kvwire.testing")
             for target, _ in imports(name) if target.startswith("kvwire.testing")}
    assert found - set(ALLOWED_TESTING) == set()
    assert set(ALLOWED_TESTING) - found == set(), "allowlisted imports that are gone: remove them from the list"


def private_uses(name: str) -> set[str]:
    """Private names of other kvwire modules that ``name`` imports or reads as ``module._name``."""
    tree = ast.parse(MODULES[name].read_text())
    used = {f"{target}.{taken}" for target, taken in imports(name)
            if taken and taken.startswith("_") and not taken.startswith("__") and target.startswith("kvwire")
            and target != name}
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(name, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            used.add(f"{aliases[node.value.id]}.{node.attr}")
    return used


def test_no_private_name_crosses_a_module():
    found = {(name, used) for name in MODULES for used in private_uses(name)}
    assert found - set(ALLOWED_PRIVATE) == set()
    assert set(ALLOWED_PRIVATE) - found == set(), "allowlisted uses that are gone: remove them from the list"


def test_bytes_and_decisions_do_not_depend_on_transports():
    """kvwire/wire (bytes) and kvwire/protocol (decisions) know no backend: the drivers
    (sender, receiver, handshake) bring a connection to them."""
    for name in MODULES:
        if name.startswith(("kvwire.wire", "kvwire.protocol")):
            assert not [t for t, _ in imports(name) if t.startswith("kvwire.transport")], name


def test_the_protocol_core_does_no_io():
    core = [name for name in MODULES if name.startswith("kvwire.protocol")]
    assert core, "kvwire/protocol is missing"
    for name in core:
        for target, _ in imports(name):
            assert not any(target == io or target.startswith(io + ".") for io in IO_MODULES), (name, target)


# -- the serving layer and the tests ---------------------------------------------------------

PROJECT = ROOT.parent
SERVING = {".".join(path.relative_to(PROJECT).with_suffix("").parts[:-1] if path.name == "__init__.py"
                    else path.relative_to(PROJECT).with_suffix("").parts): path
           for path in (PROJECT / "serving").rglob("*.py")}
TESTS = sorted((PROJECT / "tests").rglob("*.py"))


def serving_graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in SERVING.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{node.module}" if node.module else parent
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in SERVING else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges[name] = {t for t in targets if t in SERVING and t != name}
    return edges


def test_serving_has_no_import_cycles_and_the_library_never_imports_it():
    assert cycles(serving_graph()) == []
    found = {name for name in MODULES for target, _ in imports(name) if target.split(".")[0] == "serving"}
    assert found == set(), "kvwire must not depend on its serving layer"


def test_tests_take_shared_helpers_from_support_not_from_conftest_or_each_other():
    """conftest.py holds fixtures, support.py what tests share; a test module importing another
    ties their fates (and runs its module-level code twice under two names)."""
    found = []
    for path in TESTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                last = (node.module or "").rpartition(".")[2]
                if last == "conftest" or last.startswith("test_"):
                    found.append(f"{path.relative_to(PROJECT)}: from {'.' * node.level}{node.module}")
    assert found == []


def test_no_test_patches_a_private_name():
    """Faults go through kvwire.testing (the relay) or public seams (a clock, options), not by
    replacing a module's private parts, which break silently when the code moves."""
    found = []
    for path in TESTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            patching = (isinstance(func, ast.Attribute) and func.attr in ("setattr", "setitem")) or (
                isinstance(func, ast.Name) and func.id == "setattr")
            name = node.args[1] if len(node.args) > 1 else None
            if patching and isinstance(name, ast.Constant) and isinstance(name.value, str) \
                    and name.value.startswith("_") and not name.value.startswith("__"):
                found.append(f"{path.relative_to(PROJECT)}:{node.lineno} patches {name.value}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_") \
                            and not target.attr.startswith("__") and not (
                                isinstance(target.value, ast.Name) and target.value.id == "self"):
                        found.append(f"{path.relative_to(PROJECT)}:{node.lineno} assigns {target.attr}")
    assert found == []
