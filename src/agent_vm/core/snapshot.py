"""Internal snapshots with memory state, stored inside the VM's qcow2 overlay.

Tags live in a JSON file in the VM's work directory: libvirt's snapshot XML has no
metadata element, and a revert replaces the domain definition with the one saved in the
snapshot, so domain metadata written later would be lost on restore.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import libvirt
from pydantic import BaseModel, ConfigDict, Field

from agent_vm import timeutil
from agent_vm.core.template import NAME_PATTERN
from agent_vm.core.vm import VM
from agent_vm.errors import SnapshotError, VMError
from agent_vm.logs import get_logger

log = get_logger(__name__)

TAGS_FILE = "snapshot-tags.json"


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    created_at: datetime  # aware, America/New_York
    tags: tuple[str, ...] = ()
    state: str = ""  # the domain state captured: running, paused, shutoff


class SnapshotManager:
    """Create, list, restore and delete snapshots of a VM.

    >>> mgr = SnapshotManager()
    >>> golden = mgr.create_snapshot(vm, "golden", "clean state", tags=["base"])
    >>> mgr.restore_snapshot(vm, golden)
    """

    def _tags_path(self, vm: VM) -> Path | None:
        workdir = vm.metadata().get("workdir")
        return Path(workdir) / TAGS_FILE if workdir else None

    def _load_tags(self, vm: VM) -> dict[str, list[str]]:
        path = self._tags_path(vm)
        if path is None or not path.exists():
            return {}
        data = json.loads(path.read_text())
        return {str(k): [str(t) for t in v] for k, v in data.items()}

    def _save_tags(self, vm: VM, tags: dict[str, list[str]]) -> None:
        path = self._tags_path(vm)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(tags, indent=1, sort_keys=True))
            tmp.replace(path)

    def create_snapshot(
        self, vm: VM, name: str, description: str = "", tags: list[str] | tuple[str, ...] = ()
    ) -> Snapshot:
        """Snapshot disk and, if the VM runs, its memory and device state."""
        Snapshot(name=name, created_at=timeutil.now())  # validates the name early
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = description
        try:
            snap = vm.domain.snapshotCreateXML(ET.tostring(root, encoding="unicode"), 0)
        except (libvirt.libvirtError, VMError) as exc:
            message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else exc
            raise SnapshotError(
                f"cannot snapshot {vm.name}: {message}",
                hint="a mounted 9p share blocks memory snapshots; unmount it in the guest first",
            ) from exc
        all_tags = self._load_tags(vm)
        all_tags[name] = list(tags)
        self._save_tags(vm, all_tags)
        snapshot = self._describe(snap, all_tags)
        log.info("snapshot_created", vm=vm.name, snapshot=name)
        return snapshot

    def list_snapshots(self, vm: VM) -> list[Snapshot]:
        try:
            snaps = vm.domain.listAllSnapshots(0)
        except libvirt.libvirtError as exc:
            raise SnapshotError(f"cannot list snapshots of {vm.name}: {exc}") from exc
        tags = self._load_tags(vm)
        return sorted((self._describe(s, tags) for s in snaps), key=lambda s: s.created_at)

    def get_snapshot(self, vm: VM, name: str) -> Snapshot:
        for snapshot in self.list_snapshots(vm):
            if snapshot.name == name:
                return snapshot
        raise SnapshotError(f"{vm.name} has no snapshot named {name!r}")

    def restore_snapshot(self, vm: VM, snapshot: Snapshot | str) -> None:
        """Return the VM to the snapshot; it runs afterwards if it ran when snapshotted.

        libvirt implements this by restarting QEMU, so the control channel must reconnect.
        """
        name = snapshot if isinstance(snapshot, str) else snapshot.name
        try:
            snap = vm.domain.snapshotLookupByName(name, 0)
            vm.domain.revertToSnapshot(snap, 0)
        except libvirt.libvirtError as exc:
            raise SnapshotError(f"cannot restore {vm.name} to {name}: {exc}") from exc
        if vm.is_active():
            vm.reapply_limits()  # a new QEMU, in a new cgroup
        log.info("snapshot_restored", vm=vm.name, snapshot=name)

    def delete_snapshot(self, vm: VM, snapshot: Snapshot | str) -> None:
        name = snapshot if isinstance(snapshot, str) else snapshot.name
        try:
            vm.domain.snapshotLookupByName(name, 0).delete(0)
        except libvirt.libvirtError as exc:
            raise SnapshotError(f"cannot delete snapshot {name} of {vm.name}: {exc}") from exc
        tags = self._load_tags(vm)
        if tags.pop(name, None) is not None:
            self._save_tags(vm, tags)

    @staticmethod
    def _describe(snap: libvirt.virDomainSnapshot, tags: dict[str, list[str]]) -> Snapshot:
        root = ET.fromstring(snap.getXMLDesc(0))
        name = root.findtext("name", "")
        return Snapshot(
            name=name,
            description=root.findtext("description", ""),
            created_at=timeutil.from_timestamp(float(root.findtext("creationTime", "0"))),
            tags=tuple(tags.get(name, ())),
            state=root.findtext("state", ""),
        )
