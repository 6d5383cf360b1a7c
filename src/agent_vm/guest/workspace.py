"""The shared workspace inside the guest: 9p mount and bind mounts. Standard library only.

The VM has one 9p device from its start (golden clones and pooled VMs were started
before anyone knew the workspace); the host mounts the user's directory inside that
device's export when a sandbox gets a workspace, and asks us to mount it here. The
host enforces read-only (its mount is read-only); ours says so to programs at once.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from agent_vm.guest.files import read_file
from agent_vm.protocol.files import WorkspaceRequest
from agent_vm.protocol.ports import SHARE_TAG, SHARE_WORKSPACE

SHARE_MOUNT = "/run/agent-vm/share"
OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client"
_mounted: list[str] = []  # mount points we made, innermost last
_lock = threading.Lock()  # file operations mount the share from their own threads


MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
MNT_DETACH = 2
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:  # fmt: skip
    """mount(2) itself: util-linux's mount costs a fork and an exec (~0.1 s under TCG)."""
    import ctypes

    def arg(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    if _libc().mount(arg(source), arg(target), arg(fstype), flags, arg(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    _libc().umount2(target.encode(), MNT_DETACH)


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
            _mount(SHARE_TAG, SHARE_MOUNT, "9p", 0, OPTIONS)


def apply(req: WorkspaceRequest) -> None:
    _libc()  # loaded now: a golden capture warms it up with an unmount (ctypes: ~70 ms)
    if req.mount is None:
        _release_holders()
    while _mounted:
        _umount(_mounted.pop())
    if req.mount is None:
        unmount()
        return
    ensure_share()
    source = f"{SHARE_MOUNT}/{SHARE_WORKSPACE}"
    os.makedirs(req.mount, exist_ok=True)
    _mount(source, req.mount, None, MS_BIND)
    _mounted.append(req.mount)
    if req.readonly:
        _mount(None, req.mount, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if req.layout and not req.readonly:
        inner = f"{req.mount}/input"
        _mount(inner, inner, None, MS_BIND)
        _mounted.append(inner)
        _mount(None, inner, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    _return_holders()


# Processes moved out of the share by the last unmount: pid -> (start time, directory).
_moved: dict[int, tuple[str, str]] = {}


def _release_holders() -> None:
    """Before the share goes: processes working in it move to / (back on the next
    mount); one that holds a file of it refuses the unmount (a mounted share blocks
    pause, snapshot and fork), naming it."""
    from agent_vm.guest import unpin

    with _lock:
        if not _is_mount(SHARE_MOUNT):
            return
        device = os.stat(SHARE_MOUNT).st_dev
    for _round in range(10):  # a process may start in it while others are moved
        in_it, others = unpin.holders(device)
        if others:
            pid, what = others[0]
            raise OSError(
                errno.EBUSY,
                f"{unpin.describe(pid)} holds {what}: close it or stop the process, then retry",
            )
        if not in_it:
            return
        for pid, path in in_it:
            _moved.setdefault(pid, (unpin.start_time(pid), path))
        _run_unpin([(pid, "/") for pid, _ in in_it])


def _return_holders() -> None:
    from agent_vm.guest import unpin

    back = [(pid, path) for pid, (start, path) in _moved.items() if unpin.start_time(pid) == start]
    _moved.clear()
    if back:
        _run_unpin(back)


def _run_unpin(moves: list[tuple[int, str]]) -> None:
    """The moves, made by a helper process (see ``unpin``); a failure is an OSError."""
    if not moves:
        return
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-m", "agent_vm.guest.unpin", json.dumps(moves)],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    try:
        failures = json.loads(done.stdout or "null")
    except ValueError:
        failures = None
    if done.returncode != 0 or failures is None:
        raise OSError(errno.EIO, f"moving processes out of the workspace failed: {done.stderr}")
    if failures:
        pid, why = next(iter(failures.items()))
        raise OSError(errno.EBUSY, f"could not move process {pid} out of the workspace: {why}")


def unmount() -> None:
    """Our bind mounts, then the share itself (a mounted 9p share blocks snapshots)."""
    while _mounted:
        _umount(_mounted.pop())
    with _lock:
        if _is_mount(SHARE_MOUNT):
            _umount(SHARE_MOUNT)
