"""QMP commands sent through libvirt's QEMU monitor passthrough.

libvirt stays the manager of every domain; this is only for what libvirt 9.0 has no API
for (migrating device state with x-ignore-shared, loading it into a waiting QEMU).
libvirt marks such domains "tainted: custom-monitor", which is expected.
File descriptors travel with the command (``qemuMonitorCommandWithFiles``): QEMU runs
sandboxed (no exec: migration) and cannot open our files by path.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from agent_vm.core.vm import VM
from agent_vm.errors import QMPError, VMError


def qmp(
    vm: VM, command: str, arguments: dict[str, Any] | None = None, fds: Sequence[int] = ()
) -> Any:
    """Run one QMP command and return its ``return`` value.

    QEMU's refusals raise QMPError carrying QEMU's ``error_class`` (e.g. GenericError,
    DeviceNotFound); a failure to reach the monitor at all raises VMError.
    """
    message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    try:
        if fds:
            reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(vm.domain, message, list(fds), 0)
        else:
            reply = libvirt_qemu.qemuMonitorCommand(vm.domain, message, 0)
    except libvirt.libvirtError as exc:
        raise VMError(f"QMP {command} on {vm.name} failed: {exc.get_error_message()}") from exc
    data = json.loads(reply)
    if "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {}
        raise QMPError(
            f"QEMU refused {command} on {vm.name}: {error.get('desc', data['error'])}",
            error_class=str(error.get("class", "GenericError")),
        )
    return data.get("return")


def pass_file(vm: VM, name: str, path: Path, flags: int) -> None:
    """Open ``path`` here and hand the descriptor to QEMU under ``name`` (``fd:name``)."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        qmp(vm, "getfd", {"fdname": name}, fds=[fd])
    finally:
        os.close(fd)


def set_ignore_shared(vm: VM, state: bool = True) -> None:
    qmp(
        vm,
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": state}]},
    )


def wait_migration(vm: VM, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``query-migrate`` until completed; failure or timeout raise VMError."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        status: dict[str, Any] = qmp(vm, "query-migrate") or {}
        state = status.get("status")
        if state == "completed":
            return status
        if state in ("failed", "cancelled"):
            raise VMError(f"migration of {vm.name} {state}: {status.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise VMError(f"migration of {vm.name} still {state} after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def save_device_state(vm: VM, path: Path, timeout: float = 60.0) -> int:
    """Write the VM's device state to ``path`` and leave it paused; returns the size.

    With x-ignore-shared, RAM in a shared memory-backend-file is not copied: the file
    already is the RAM. What is written is CPU and device state plus small ROM blocks.
    """
    set_ignore_shared(vm)
    pass_file(vm, "agentvm-out", path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    qmp(vm, "migrate", {"uri": "fd:agentvm-out"})
    wait_migration(vm, timeout)
    return path.stat().st_size


def load_device_state(vm: VM, path: Path, timeout: float = 60.0, paused: bool = False) -> None:
    """Load state saved by :func:`save_device_state` into a VM started with -incoming defer.

    libvirt's own ``cont`` at start-up only armed autostart, so the guest runs as soon as
    the load completes.
    """
    set_ignore_shared(vm)
    pass_file(vm, "agentvm-in", path, os.O_RDONLY)
    qmp(vm, "migrate-incoming", {"uri": "fd:agentvm-in"})
    wait_migration(vm, timeout)
    # A state saved by a paused QEMU (a capture's converter) says "paused", and QEMU
    # restores that runstate instead of autostarting.
    if not paused and (qmp(vm, "query-status") or {}).get("status") == "paused":
        qmp(vm, "cont")


UNCAPPED = 1 << 40  # bytes per second


def migrate_into(source: VM, target: VM, timeout: float = 120.0) -> None:
    """Migrate ``source`` with all its RAM into ``target``, a QEMU started with -incoming
    defer, over a socket pair: neither QEMU opens anything by path. (``x-ignore-shared``
    off on both: the target's RAM is a shared file that must receive every page.)"""
    ours, theirs = socket.socketpair()
    try:
        for vm in (source, target):
            set_ignore_shared(vm, False)
        # QEMU caps migration at 32 MiB/s by default (meant for networks): 3 s for the
        # 100 MiB an idle guest has touched. Between two local processes: no cap.
        qmp(source, "migrate-set-parameters", {"max-bandwidth": UNCAPPED})
        qmp(target, "getfd", {"fdname": "agentvm-in"}, fds=[theirs.fileno()])
        qmp(source, "getfd", {"fdname": "agentvm-out"}, fds=[ours.fileno()])
    finally:
        ours.close()
        theirs.close()
    qmp(target, "migrate-incoming", {"uri": "fd:agentvm-in"})
    qmp(source, "migrate", {"uri": "fd:agentvm-out"})
    wait_migration(source, timeout)
    wait_migration(target, timeout)
