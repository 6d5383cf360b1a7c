"""A read-only view of a directory (a bind mount), for files QEMU must read but no
sandbox may own.

libvirt's DAC driver chowns a domain's kernel and initrd to the domain's user while it
runs; shared between sandboxes, they would then be writable by whichever sandbox started
last. Through a read-only bind mount libvirt's chown fails with EROFS, which it accepts,
and the files stay root's. The mount lives until reboot and is made again when missing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent_vm.errors import HostError


def mounted_at(target: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The options of the mount at ``target`` (None if nothing is mounted there)."""
    wanted = str(target.resolve())
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[4] == wanted:
            return fields[5]
    return None


def ensure_readonly_bind(source: Path, target: Path) -> Path:
    """``target`` shows ``source`` read-only; idempotent. Returns ``target``."""
    options = mounted_at(target) if target.exists() else None
    if options is not None and "ro" in options.split(","):
        return target
    source.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    steps = [] if options is not None else [["mount", "--bind", str(source), str(target)]]
    steps.append(["mount", "-o", "remount,bind,ro", str(target)])
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise HostError(
                f"cannot make {target} a read-only view of {source}: {proc.stderr.strip()}",
                hint="agent-vm needs root (mount) to keep kernels out of sandboxes' reach",
            )
    return target
