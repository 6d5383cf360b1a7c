"""The shared workspace inside the guest: 9p mount and bind mounts. Standard library only.

The VM has one 9p device from its start (golden clones and pooled VMs were started
before anyone knew the workspace); the host mounts the user's directory inside that
device's export when a sandbox gets a workspace, and asks us to mount it here. The
host enforces read-only (its mount is read-only); ours says so to programs at once.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

from agent_vm.guest.files import read_file
from agent_vm.protocol.files import WorkspaceRequest
from agent_vm.protocol.ports import SHARE_TAG, SHARE_WORKSPACE

SHARE_MOUNT = "/run/agent-vm/share"
OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client"
_mounted: list[str] = []  # mount points we made, innermost last
_lock = threading.Lock()  # file operations mount the share from their own threads


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(errno.EIO, f"mount {' '.join(args)}: {proc.stderr.strip()}")


def _wait_for_9p(timeout: float = 30.0) -> None:
    """init loads the 9p modules in its late start-up, which a cold boot may not have
    finished when the first workspace arrives."""
    deadline = time.monotonic() + timeout
    while "9p" not in read_file("/proc/filesystems").split():
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, "the guest kernel has no 9p file system loaded")
        time.sleep(0.02)


def _is_mount(path: str) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == path for line in mounts)


def ensure_share() -> None:
    """The 9p share mounted at SHARE_MOUNT (workspaces and the bulk lane live in it)."""
    with _lock:
        if not _is_mount(SHARE_MOUNT):
            _wait_for_9p()
            os.makedirs(SHARE_MOUNT, exist_ok=True)
            _mount("-t", "9p", "-o", OPTIONS, SHARE_TAG, SHARE_MOUNT)


def apply(req: WorkspaceRequest) -> None:
    while _mounted:
        subprocess.run(["umount", "-l", _mounted.pop()], capture_output=True)
    if req.mount is None:
        unmount()
        return
    ensure_share()
    source = f"{SHARE_MOUNT}/{SHARE_WORKSPACE}"
    os.makedirs(req.mount, exist_ok=True)
    _mount("--bind", source, req.mount)
    _mounted.append(req.mount)
    if req.readonly:
        _mount("-o", "remount,bind,ro", req.mount)
    if req.layout and not req.readonly:
        inner = f"{req.mount}/input"
        _mount("--bind", inner, inner)
        _mounted.append(inner)
        _mount("-o", "remount,bind,ro", inner)


def unmount() -> None:
    """Our bind mounts, then the share itself (a mounted 9p share blocks snapshots)."""
    while _mounted:
        path = _mounted.pop()
        subprocess.run(["umount", "-l", path], capture_output=True)
    with _lock:
        if _is_mount(SHARE_MOUNT):
            subprocess.run(["umount", "-l", SHARE_MOUNT], capture_output=True)
