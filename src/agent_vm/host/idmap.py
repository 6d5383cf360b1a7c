"""Idmapped bind mounts: a user's directory shown to one sandbox's QEMU as its own.

A sandbox's QEMU runs as a host user of its own (``agvm-N``) and must read and write the
user's workspace, and what it creates must belong to the workspace's owner, not to
``agvm-N``. An idmapped bind mount (Linux >= 5.12, ``mount_setattr(MOUNT_ATTR_IDMAP)``)
does exactly that: through the mount, files of the owner appear as ``agvm-N``'s, and
what ``agvm-N`` creates is stored as the owner's. Nothing is chowned; the mapping lives
only in the mount. The kernel interface has no wrapper in Python or in Debian 12's
util-linux (2.38), so the four syscalls are called through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import HostError

# x86_64 and aarch64 share the numbers of these new syscalls (generic table)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
MNT_DETACH = 2
USERNS_TIMEOUT = 10.0


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


@dataclass(frozen=True)
class IdMap:
    """On-disk owner ``disk_uid:disk_gid`` is seen as ``seen_uid:seen_gid`` (one id each)."""

    disk_uid: int
    disk_gid: int
    seen_uid: int
    seen_gid: int


def _userns_fd(idmap: IdMap) -> int:
    """A user namespace holding the mapping (a parked ``unshare --user`` process, whose
    maps root writes; the namespace outlives it through the returned descriptor)."""
    child = subprocess.Popen(
        ["unshare", "--user", "sleep", "60"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        own = Path("/proc/self/ns/user").stat().st_ino
        deadline = time.monotonic() + USERNS_TIMEOUT
        while True:  # until the child has unshared (slow when booting VMs load the CPUs)
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child.pid}/ns/user").stat().st_ino != own:
                    break
            if child.poll() is not None:
                raise HostError(
                    "cannot create a user namespace for an idmapped mount: "
                    f"{(child.stderr.read() if child.stderr else b'').decode().strip()}",
                    hint="user namespaces must be enabled (kernel.unprivileged_userns_clone "
                    "does not matter: agent-vm runs as root)",
                )
            if time.monotonic() > deadline:
                raise HostError(
                    f"the user namespace for an idmapped mount was not ready in "
                    f"{USERNS_TIMEOUT:.0f} s (unshare did not run)",
                    hint="the host is overloaded; try again",
                )
            time.sleep(0.001)
        Path(f"/proc/{child.pid}/uid_map").write_text(f"{idmap.disk_uid} {idmap.seen_uid} 1\n")
        Path(f"/proc/{child.pid}/setgroups").write_text("deny\n")
        Path(f"/proc/{child.pid}/gid_map").write_text(f"{idmap.disk_gid} {idmap.seen_gid} 1\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def bind_idmapped(source: Path, target: Path, idmap: IdMap, *, readonly: bool = False) -> None:
    """Mount ``source`` at ``target`` (an existing directory) with ``idmap``; nosuid and
    nodev always, read-only on request. One clear HostError when the kernel or the file
    system cannot (idmapped mounts need ext4, xfs, btrfs, tmpfs >= 6.3, ...)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        raise HostError(f"idmapped mounts are not wired for {platform.machine()}")
    userns = _userns_fd(idmap)
    tree = -1
    try:
        tree = _check(
            _libc.syscall(
                SYS_OPEN_TREE, -100, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
            ),
            f"open_tree({source})",
        )
        flags = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        if readonly:
            flags |= MOUNT_ATTR_RDONLY
        attr = _MountAttr(flags, 0, 0, userns)
        size = ctypes.sizeof(attr)
        _check(
            _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), size),
            "mount_setattr(idmap)",
        )
        _check(
            _libc.syscall(
                SYS_MOVE_MOUNT, tree, b"", -100, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount(→ {target})",
        )
    except OSError as exc:
        hint = "the workspace's file system may not support idmapped mounts (ext4, xfs, btrfs do)"
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            hint = "idmapped mounts need Linux >= 5.12 and root"
        raise HostError(
            f"cannot share {source} with the sandbox: {exc.strerror}", hint=hint
        ) from exc
    finally:
        if tree >= 0:
            os.close(tree)
        os.close(userns)


def unmount(target: Path) -> None:
    """Detach the mount at ``target`` (lazy: QEMU may still hold files open)."""
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"umount({target})")
