"""A secret reaches the command's environment and nothing else agent-vm writes."""

from __future__ import annotations

import os
import secrets as token
import subprocess
import sys
import time
from pathlib import Path

from agent_vm.config import Settings
from agent_vm.image.store import Image

CLI = [sys.executable, "-m", "agent_vm"]


def files_holding(value: bytes, roots: list[Path], since: float) -> list[str]:
    """Regular files below ``roots`` changed since ``since`` that contain ``value``."""
    found = []
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else []:
            try:
                info = path.lstat()
                if not path.is_file() or path.is_symlink() or info.st_mtime < since - 1:
                    continue
                with path.open("rb") as handle:
                    tail = b""
                    while chunk := handle.read(1 << 20):
                        if value in tail + chunk:
                            found.append(str(path))
                            break
                        tail = chunk[-len(value) :]
            except OSError:
                continue
    return found


def command_lines_holding(value: bytes) -> list[str]:
    hits = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if value in (proc / "cmdline").read_bytes():
                    hits.append(proc.name)
            except OSError:
                continue
    return hits


def test_a_secret_is_in_the_command_only(image: Image, settings: Settings) -> None:
    value = f"agentvm-secret-{token.token_hex(12)}"
    started = time.time()
    proc = subprocess.Popen(
        [
            *CLI, "--log-level", "debug", "run", "--network", "isolated",
            "--secret", "AGENTVM_TEST_TOKEN", "--",
            "sh", "-c", 'echo "len=${#AGENTVM_TEST_TOKEN}"; sleep 4; printenv AGENTVM_TEST_TOKEN',
        ],
        env={**os.environ, "AGENTVM_TEST_TOKEN": value},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == f"len={len(value)}\n".encode()
    # while the sandbox runs: no command line, domain XML, log or state file holds it
    roots = [
        settings.state_dir, settings.ram_dir, Path("/run/agent-vm"),
        Path("/run/libvirt/qemu"), Path("/var/log/libvirt/qemu"), Path("/etc/libvirt/qemu"),
    ]  # fmt: skip
    assert command_lines_holding(value.encode()) == []
    assert files_holding(value.encode(), roots, started) == []
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == f"{value}\n".encode()  # the command's own output is the caller's
    assert b"vm_ready" in err or b"golden" in err  # the debug log was written ...
    assert value.encode() not in err  # ... without the value
    assert files_holding(value.encode(), roots, started) == []
