"""One host identity per sandbox: each QEMU runs as a uid and gid of its own.

A QEMU escape then lands as a user that owns only that sandbox's overlay and libvirt's
per-domain directory (channel socket, monitor, master key), all mode 0600/0750: it cannot
read another sandbox's disk, console log or sockets. Identities are system users
``agvm-<slot>`` with uid = gid = ``base + slot`` (a range far above login users and
/etc/subuid's usual 100000-165535 blocks), created on first use and reused: a host keeps
as many as it ever ran sandboxes at once. Their supplementary groups are what a QEMU
needs: ``kvm`` (/dev/kvm), ``libvirt-qemu`` (to traverse libvirt's state directory) and
``agentvm`` (the shared, read-only files: base images, golden disks, golden RAM). libvirt
applies them because the numeric label has a passwd entry.

A slot is reserved by creating ``/run/agent-vm/identities/<slot>`` exclusively (atomic
between processes), holding the VM's name; teardown removes it, and the reaper removes
those whose VM is gone.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import HostError

IDENTITY_DIR = Path("/run/agent-vm/identities")
SHARED_GROUP = "agentvm"
PREFIX = "agvm-"
MAX_SLOTS = 8192
SUPPLEMENTARY = ("kvm", "libvirt-qemu")
_create_lock = threading.Lock()


@dataclass(frozen=True)
class Identity:
    """The host user one sandbox's QEMU runs as."""

    slot: int
    uid: int
    gid: int
    reservation: Path

    def release(self) -> None:
        """Give the slot back (only once the QEMU that ran as it is gone)."""
        self.reservation.unlink(missing_ok=True)

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.slot}"

    @property
    def label(self) -> str:
        """libvirt's DAC label (numeric: the passwd entry supplies the groups)."""
        return f"+{self.uid}:+{self.gid}"


class Identities:
    """Allocation of sandbox identities from ``base`` (see the module docstring)."""

    def __init__(self, base: int, directory: Path = IDENTITY_DIR) -> None:
        if not 1_000_000 <= base <= 4_000_000_000 - MAX_SLOTS:
            raise HostError(
                f"AGENT_VM_UID_BASE={base} is outside 1000000..{4_000_000_000 - MAX_SLOTS}"
            )
        self.base = base
        self.directory = directory

    @property
    def shared_gid(self) -> int:
        return self.base - 1

    def ensure_shared_group(self) -> int:
        """The ``agentvm`` group; HostError if its gid is taken by another group."""
        try:
            group = grp.getgrnam(SHARED_GROUP)
        except KeyError:
            _run(["groupadd", "-g", str(self.shared_gid), SHARED_GROUP])
            return self.shared_gid
        if group.gr_gid != self.shared_gid:
            raise HostError(
                f"group {SHARED_GROUP} exists with gid {group.gr_gid}, not {self.shared_gid}",
                hint="set AGENT_VM_UID_BASE to that gid + 1, or remove the group",
            )
        return group.gr_gid

    def allocate(self, vm_name: str) -> Identity:
        """Reserve the lowest free slot for ``vm_name`` and make sure its user exists."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for slot in range(MAX_SLOTS):
            path = self.directory / str(slot)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(vm_name)
            identity = Identity(slot, self.base + slot, self.base + slot, path)
            try:
                self._ensure_user(identity)
            except BaseException:
                identity.release()
                raise
            return identity
        raise HostError(f"all {MAX_SLOTS} sandbox identities are in use")

    def owners(self) -> list[tuple[int, str, float]]:
        """(slot, VM name, age in seconds) of every reservation."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            if path.name.isdigit():
                try:
                    out.append(
                        (int(path.name), path.read_text(), time.time() - path.stat().st_mtime)
                    )
                except OSError:
                    continue
        return out

    def release_slot(self, slot: int) -> None:
        (self.directory / str(slot)).unlink(missing_ok=True)

    def _ensure_user(self, identity: Identity) -> None:
        with _create_lock:
            try:
                entry = pwd.getpwuid(identity.uid)
            except KeyError:
                entry = None
            if entry is not None:
                if entry.pw_name != identity.name:
                    raise HostError(
                        f"uid {identity.uid} belongs to {entry.pw_name}, not {identity.name}",
                        hint="choose another range with AGENT_VM_UID_BASE",
                    )
                return
            self.ensure_shared_group()
            try:
                grp.getgrgid(identity.gid)
            except KeyError:
                _run(["groupadd", "-g", str(identity.gid), identity.name])
            groups = ",".join([SHARED_GROUP, *(g for g in SUPPLEMENTARY if _group_exists(g))])
            _run([
                "useradd", "-u", str(identity.uid), "-g", str(identity.gid), "-G", groups,
                "-M", "-N", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                "-c", "agent-vm sandbox (QEMU)", identity.name,
            ])  # fmt: skip


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError as exc:
        raise HostError(f"{argv[0]} is not installed", hint="apt-get install passwd") from exc
    if proc.returncode != 0:
        raise HostError(f"{' '.join(argv[:2])} failed: {proc.stderr.strip()}")
