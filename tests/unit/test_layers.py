"""Lower layers never import higher ones; guest and protocol code use the stdlib only."""

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
    "protocol": 0,
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
    "monitor_cli": 5,
    "terminal": 5,
    "api": 5,
    "__main__": 5,
    "__init__": 5,  # the package face: names every layer, imports them only on first use
}
STDLIB_ONLY = ("guest", "protocol", "errors", "timeutil")


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
    assert out.stdout.strip() == "['agent_vm']"


def test_the_public_names_resolve() -> None:
    import agent_vm

    for name in agent_vm.__all__:
        assert getattr(agent_vm, name) is not None, name
    with pytest.raises(AttributeError):
        _ = agent_vm.NoSuchThing
