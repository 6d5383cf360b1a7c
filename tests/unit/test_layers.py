"""Lower layers never import higher ones; guest and protocol code use the stdlib only;
no two modules import each other, even through others (imports under TYPE_CHECKING and
inside functions included); no module grows past ~400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "agent_vm"

# Layer of each subpackage/module; imports may only go to the same or a lower layer.
LAYERS = {
    "errors": 0,
    "timeutil": 0,
    "version": 0,
    "exitcodes": 0,
    "protocol": 0,
    "names": 0,
    "proxyd": 0,  # run by the proxy's own interpreter: stdlib, mitmproxy and dnslib only
    "secrets": 1,
    "logs": 1,
    "config": 1,
    "models": 1,
    "asyncutil": 1,
    "guest": 1,
    "host": 2,
    "image": 3,
    "core": 3,
    "communication": 3,
    "network": 3,
    "execution": 4,
    "monitoring": 4,
    "doctor": 5,
    "sandbox": 5,
    "cli": 5,
    "quick": 5,
    "api": 5,
    "__main__": 5,
    "__init__": 5,  # the package face: names every layer, imports them only on first use
}
STDLIB_ONLY = ("guest", "protocol", "errors", "timeutil", "version", "exitcodes")
MAX_LINES = 430  # "about 400": a module past it has more than one job


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SRC)) for p in FILES])
def test_imports_respect_layers(path: Path) -> None:
    rel = path.relative_to(SRC)
    own = rel.parts[0].removesuffix(".py")
    for name in imports(path):
        top = name.split(".")[0]
        if top == "agent_vm":
            target = part_of(name)
            if target == "__init__":
                continue
            assert LAYERS[target] <= LAYERS[own], f"{rel} (layer {own}) imports {name}"
        elif own in STDLIB_ONLY:
            assert top in sys.stdlib_module_names, f"{rel} must use the stdlib only: {name}"


def test_importing_the_package_imports_nothing_else() -> None:
    """``import agent_vm`` (done by everything, the guest's copy included) stays free:
    the public names are resolved on first use."""
    code = "import sys, agent_vm; print(sorted(m for m in sys.modules if 'agent_vm' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['agent_vm', 'agent_vm.version']"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}


def edges(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports: at the top, under TYPE_CHECKING, inside functions;
    ``from pkg import mod`` counts as ``pkg.mod``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                dotted = f"{module}.{alias.name}"
                found.add(dotted if dotted in MODULES else module)
    return {target for target in found if target in MODULES and target != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = {name: edges(name, path) for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SRC)) for p in FILES])
def test_modules_stay_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines: split it by job"


def test_the_public_names_resolve() -> None:
    import agent_vm

    for name in agent_vm.__all__:
        assert getattr(agent_vm, name) is not None, name
    with pytest.raises(AttributeError):
        _ = agent_vm.NoSuchThing
