"""A process's memory cgroup, on cgroup v1 and v2 hosts, for the host memory cap.

libvirt's own memory tunable (``setMemoryParameters``/``<memtune>``) also raises QEMU's
locked-memory rlimit, which needs CAP_SYS_RESOURCE; where that is withheld, every later
QEMU start of the domain (a snapshot revert restarts QEMU from the stored definition)
then fails. So agent-vm writes the cgroup's limit itself: on v1 the domain's memory
cgroup (``memory.limit_in_bytes``), on v2 the domain's directory (``memory.max``, above
libvirt's ``emulator``/``vcpuN`` children, so it covers all of QEMU).
"""

from __future__ import annotations

from pathlib import Path

from agent_vm.errors import HostError


def _mounts(mountinfo: Path) -> tuple[Path | None, Path | None]:
    """(the v1 memory controller's mount, the v2 mount) from mountinfo."""
    v1 = v2 = None
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, kinds = left.split(), right.split()
        if len(fields) < 5 or len(kinds) < 3:
            continue
        if kinds[0] == "cgroup" and "memory" in kinds[2].split(","):
            v1 = Path(fields[4])
        elif kinds[0] == "cgroup2":
            v2 = Path(fields[4])
    return v1, v2


def memory_limit_file(pid: int, proc: Path = Path("/proc")) -> Path:
    """The file that caps ``pid``'s cgroup's memory."""
    v1_mount, v2_mount = _mounts(proc / "self" / "mountinfo")
    unified = None
    for line in (proc / str(pid) / "cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and v1_mount is not None:
            return v1_mount / path.lstrip("/") / "memory.limit_in_bytes"
        if controllers == "":
            unified = path
    if unified is not None and v2_mount is not None:
        directory = v2_mount / unified.lstrip("/")
        if directory.name == "emulator":  # libvirt's layout: the domain is its parent
            directory = directory.parent
        if "memory" in (v2_mount / "cgroup.controllers").read_text().split():
            return directory / "memory.max"
    raise HostError(
        f"no memory cgroup for process {pid}",
        hint="the host needs the cgroup memory controller (v1 or v2) for memory caps",
    )


def limit_memory(pid: int, limit_bytes: int) -> None:
    target = memory_limit_file(pid)
    try:
        target.write_text(str(limit_bytes))
    except OSError as exc:
        raise HostError(f"cannot cap the memory of process {pid} ({target}): {exc}") from exc
