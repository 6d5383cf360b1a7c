"""A read-only view of a directory (a bind mount), for files QEMU must read but no
sandbox may own.

libvirt's DAC driver chowns a domain's kernel and initrd to the domain's user while it
runs; shared between sandboxes, they would then be writable by whichever sandbox started
last. Through a read-only bind mount libvirt's chown fails with EROFS, which it accepts,
and the files stay root's. The mount lives until reboot and is made again when missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

from agent_vm.errors import HostError
from agent_vm.logs import get_logger

log = get_logger(__name__)
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


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


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount them)."""
    base = str(root.resolve())
    found = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = _unescape(fields[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def make_shared_bind(target: Path) -> None:
    """``target`` becomes a mount of its own in a shared peer group, so that what is
    mounted below it later also appears in the mount namespaces copied from ours before
    (libvirt starts each QEMU in a private copy, where "/" here is private)."""
    steps = [["mount", "--make-shared", str(target)]]
    if mounted_at(target) is None:
        steps.insert(0, ["mount", "--bind", str(target), str(target)])
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise HostError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def unmount_under(root: Path, rounds: int = 8) -> list[Path]:
    """Detach every mount at or below ``root`` (lazily, deepest first, again while mounts
    are stacked on one another); returns those that could not be detached."""
    for _ in range(rounds):
        points = mounts_under(root)
        if not points:
            return []
        for point in points:
            if _libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):  # not a mount (any more)
                    log.warning("unmount_failed", path=str(point), error=os.strerror(err))
    return mounts_under(root)


def remove_tree(root: Path) -> bool:
    """``rm -rf root`` that never crosses into a mount (a workspace bind-mounted inside a
    VM's work directory is the user's project): everything mounted below is detached
    first, and if anything stays mounted nothing is removed. False when refused."""
    if not root.exists():
        return True
    stuck = unmount_under(root)
    if stuck:
        log.error("remove_refused_mounted", path=str(root), mounts=[str(p) for p in stuck])
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True
