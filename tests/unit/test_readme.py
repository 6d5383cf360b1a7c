"""The README's Python examples type-check against the package as it is (mypy strict).

Examples that stop matching the API are the first thing a new user meets; this keeps
them true. They use only the names ``agent_vm`` exports at its top level.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 3


def test_examples_import_only_the_public_face() -> None:
    for block in python_blocks():
        for line in block.splitlines():
            if line.startswith(("from agent_vm", "import agent_vm")):
                assert line.startswith("from agent_vm import "), line


def test_examples_type_check(tmp_path: Path) -> None:
    files = []
    for number, block in enumerate(python_blocks()):
        path = tmp_path / f"readme_example_{number}.py"
        path.write_text(block)
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
