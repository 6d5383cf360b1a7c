"""What this host can give a VM: CPUs and memory, read once per question from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostResources:
    cpus: int
    memory_total_mib: int
    memory_available_mib: int


def read_resources(meminfo: Path = Path("/proc/meminfo")) -> HostResources:
    fields: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0])  # kB
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return HostResources(
        cpus=cpus or 1,
        memory_total_mib=fields.get("MemTotal", 0) // 1024,
        memory_available_mib=fields.get("MemAvailable", fields.get("MemFree", 0)) // 1024,
    )
