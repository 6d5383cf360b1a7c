"""Find and remove what agent-vm processes left behind when they crashed.

A domain is ours when its metadata says so; it is a leftover when the process that made
it (pid plus start time, so a reused pid does not count) no longer exists. Work
directories without a domain are leftovers too, and so are the network records,
nwfilters and ipsets of sandboxes without a domain (``network/orphans.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import parse_metadata
from agent_vm.core.vm import VM
from agent_vm.errors import VMError
from agent_vm.execution.launch import OWNER
from agent_vm.execution.teardown import destroy_and_remove
from agent_vm.host.identities import Identities
from agent_vm.host.mounts import remove_tree
from agent_vm.host.procs import same_process
from agent_vm.logs import get_logger
from agent_vm.network.orphans import reap_network
from agent_vm.network.sandboxes import SandboxDirectory

log = get_logger(__name__)


@dataclass(frozen=True)
class OwnedDomain:
    vm: VM
    metadata: dict[str, str]

    @property
    def owner_alive(self) -> bool:
        pid = self.metadata.get("pid", "")
        if not pid.isdigit():
            return False
        return same_process(int(pid), self.metadata.get("pid_start", ""))


def owned_domains(connection: LibvirtConnection) -> list[OwnedDomain]:
    out = []
    for domain in connection.connection.listAllDomains(0):
        try:
            metadata = parse_metadata(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError:
            continue  # vanished meanwhile
        if metadata.get("owner") == OWNER:
            out.append(OwnedDomain(VM(domain, connection), metadata))
    return out


def reap(
    connection: LibvirtConnection,
    vms_dir: Path,
    *,
    include_live_owners: bool = False,
    orphan_min_age: float = 60.0,
    network_records: SandboxDirectory | None = None,
    identities: Identities | None = None,
) -> list[str]:
    """Destroy and remove leftovers; returns the names removed.

    Work directories without a domain are removed only once ``orphan_min_age`` seconds
    old, so a VM another process is launching right now is not pulled from under it.
    """
    removed = []
    known_workdirs = set()
    for owned in owned_domains(connection):
        workdir = owned.metadata.get("workdir")
        if workdir:
            known_workdirs.add(Path(workdir))
        if owned.owner_alive and not include_live_owners:
            continue
        try:
            destroy_and_remove(owned.vm, Path(workdir) if workdir else None)
        except VMError as exc:
            log.warning("reap_failed", vm=owned.vm.name, error=str(exc))
            continue
        removed.append(owned.vm.name)
        log.info("reaped", vm=owned.vm.name)
    if vms_dir.is_dir():
        for leftover in vms_dir.iterdir():
            try:
                age = time.time() - leftover.stat().st_mtime
            except FileNotFoundError:
                continue  # its own process removed it meanwhile (agent-vm processes share it)
            if leftover.is_dir() and leftover not in known_workdirs and age >= orphan_min_age:
                remove_tree(leftover)
                removed.append(leftover.name)
    if identities is not None:
        domains = {d.vm.name for d in owned_domains(connection)}
        for slot, vm, age in identities.owners():
            if vm not in domains and (age >= orphan_min_age or vm in removed):
                identities.release_slot(slot)
                removed.append(f"identity {identities.base + slot} of {vm}")
    if network_records is not None:
        removed += reap_network(
            connection, network_records, min_age=orphan_min_age, gone=frozenset(removed)
        )
    return removed
