"""The host packages agent-vm needs, read from the same list the bootstrap script installs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Package:
    name: str
    group: str


def required_packages(*groups: str) -> list[Package]:
    text = resources.files("agent_vm.host").joinpath("packages.txt").read_text()
    wanted = set(groups) or {"core"}
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, group = line.split()
        if group in wanted:
            out.append(Package(name, group))
    return out


def missing_packages(*groups: str) -> list[str]:
    """Names dpkg does not report as installed (all of them if dpkg itself is absent)."""
    names = [p.name for p in required_packages(*groups)]
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *names],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return names
    installed = {
        line.split()[0]
        for line in proc.stdout.splitlines()
        if line.endswith("install ok installed")
    }
    return [n for n in names if n not in installed]
