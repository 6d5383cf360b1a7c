"""Peers measured beside agent-vm: bubblewrap and gVisor's ``runsc do``.

Each call is a fresh sandbox running one command and exiting, which is the only mode
both offer without extra set-up; compare them with agent-vm's "boot + command" and
"fresh sandbox" figures, and read agent-vm's warm exec figures as a different thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from bench.stats import summary

BWRAP = [
    "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
    "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
]  # fmt: skip
RUNSC = ["runsc", "--network=none", "--ignore-cgroups", "do"]
# The peers run the distribution's python3, like the guest image does: a PATH with a
# version manager's shim first (pyenv's is a shell script) once made `runsc do python3`
# look ~0.9 s slower than it is.
ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def available(tool: str) -> str | None:
    """None when usable, else why not (the table says so instead of a number)."""
    if shutil.which(tool) is None:
        return f"{tool} not installed (apt-get install {'bubblewrap' if tool == 'bwrap' else tool})"
    probe = subprocess.run(
        (BWRAP if tool == "bwrap" else RUNSC) + ["true"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    if probe.returncode != 0:
        return f"{tool} fails here: {probe.stderr.strip()[-200:]}"
    return None


def time_command(prefix: list[str], argv: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run(prefix + argv, capture_output=True, timeout=120, env=ENV)
        samples.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise RuntimeError(f"{prefix[0]} {argv} failed: {proc.stderr.decode()[-300:]}")
    return samples


def measure(argv: list[str], runs: int) -> dict[str, dict[str, Any]]:
    """Each peer's timing summary for ``argv`` (a fresh sandbox per run), or
    ``{"error": why}`` where the peer cannot run here."""
    out: dict[str, dict[str, Any]] = {}
    for tool, prefix in (("bwrap", BWRAP), ("runsc", RUNSC)):
        problem = available(tool)
        out[tool] = {"error": problem} if problem else summary(time_command(prefix, argv, runs))
    return out
