"""Per-sandbox network records shared by every agent-vm process on the host.

Each process runs its own resolver on the gateway's port 53 (SO_REUSEPORT), so a query
may reach a process that did not start the querying VM. The records live in files
(``/run/agent-vm/networks/<network>/sandboxes/<address>.json``) that every resolver
reads; writing a new record is how a policy change reaches all of them at once.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent_vm.errors import NetworkError
from agent_vm.network.policy import Addressing, EgressPolicy

RUN_DIR = Path("/run/agent-vm/networks")


def sandbox_directory(network_name: str) -> SandboxDirectory:
    """Records live per libvirt network, not per state directory: the network and its
    addresses are host-wide, so two installations (state dirs) sharing it must see each
    other's reservations. Under /run, as they are as short-lived as the VMs."""
    return SandboxDirectory(RUN_DIR / network_name / "sandboxes")


class SandboxRecord(BaseModel):
    vm: str
    addressing: Addressing
    policy: EgressPolicy
    ipset: str | None
    tap: str


class SandboxDirectory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[IPv4Address, tuple[int, SandboxRecord]] = {}

    def _path(self, address: IPv4Address) -> Path:
        return self.root / f"{address}.json"

    def reserve(self, candidates: Sequence[IPv4Address], vm_name: str) -> IPv4Address:
        """Claim a free address: the record file, created exclusively, is the reservation
        (atomic between processes). It holds only the VM name until write() fills it."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = [a for a in candidates if not self._path(a).exists()]
        random.shuffle(free)
        for address in free:
            try:
                fd = os.open(self._path(address), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # taken meanwhile
            with os.fdopen(fd, "w") as handle:
                handle.write(vm_name)
            return address
        raise NetworkError(f"no free sandbox address left ({len(candidates)} in the range)")

    def write(self, record: SandboxRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(record.addressing.address)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(record.model_dump_json())
        tmp.replace(path)

    def remove(self, address: IPv4Address) -> None:
        self._path(address).unlink(missing_ok=True)
        self._cache.pop(address, None)

    def lookup(self, address: IPv4Address) -> SandboxRecord | None:
        """The record for a source address (re-read when its file changed)."""
        path = self._path(address)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._cache.pop(address, None)
            return None
        cached = self._cache.get(address)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            record = SandboxRecord.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            return None
        self._cache[address] = (mtime, record)
        return record

    def owners(self) -> list[tuple[IPv4Address, str, float]]:
        """(address, VM name, age in seconds) of every record and bare reservation."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob("*.json"):
            try:
                text = path.read_text()
                age = time.time() - path.stat().st_mtime
                address = IPv4Address(path.stem)
            except (OSError, ValueError):
                continue
            try:
                vm = SandboxRecord.model_validate_json(text).vm
            except ValidationError:
                vm = text.strip()  # a reservation: just the name
            out.append((address, vm, age))
        return out

    def all(self) -> list[SandboxRecord]:
        if not self.root.is_dir():
            return []
        records = []
        for path in self.root.glob("*.json"):
            try:
                records.append(SandboxRecord.model_validate_json(path.read_text()))
            except (OSError, ValidationError):
                continue
        return records
