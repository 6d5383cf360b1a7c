"""One sandbox's place on the network, and how its pieces are written and removed.

A NAT_FILTERED sandbox owns five pieces, made in this order and removed in the reverse
one (``orphans.py`` relies on the order): an address reservation (record file), an ipset,
a backstop chain, an nwfilter, the full record. Removal checks what it removed: a piece
that stays (an ipset still referenced by a rule, an iptables transaction that failed) is
retried and, if it still stays, reported, never silently ignored.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import NetworkAttachment
from agent_vm.errors import AgentVMError, NetworkError
from agent_vm.logs import get_logger
from agent_vm.network import backstop, ipsets
from agent_vm.network.nwfilter import LOCAL_SET, filter_name, render_filter
from agent_vm.network.policy import Addressing, EgressPolicy
from agent_vm.network.sandboxes import SandboxDirectory, SandboxRecord

log = get_logger(__name__)

REMOVE_ATTEMPTS = 5
REMOVE_BACKOFF = 0.1  # seconds, doubled per attempt


@dataclass
class VMNetwork:
    """A VM's place on the network and its current policy."""

    vm_name: str
    addressing: Addressing
    policy: EgressPolicy
    ipset: str
    tap: str
    network: str

    def attachment(self) -> NetworkAttachment:
        return NetworkAttachment(
            network=self.network,
            mac=self.addressing.mac,
            filter=filter_name(self.vm_name),
            filter_params={"IP": str(self.addressing.address)},
            target_dev=self.tap,
        )

    def record(self) -> SandboxRecord:
        return SandboxRecord(
            vm=self.vm_name,
            addressing=self.addressing,
            policy=self.policy,
            ipset=self.ipset,
            tap=self.tap,
        )

    def backstop_rules(self) -> backstop.VMRules:
        return backstop.VMRules(
            tap=self.tap,
            ipset=self.ipset,
            local_set=LOCAL_SET,
            ipv6_ports=tuple(self.policy.tcp_ports) if self.policy.allow_ipv6 else None,
            host_addresses6=self.addressing.host_addresses6,
        )

    def render(self) -> str:
        return render_filter(self.vm_name, self.policy, self.addressing, self.ipset)


def fill_set(vm_network: VMNetwork) -> None:
    """Create the VM's ipset if needed and refill it for its policy (atomic swap)."""
    ipsets.create(vm_network.ipset)
    policy = vm_network.policy
    ipsets.fill(vm_network.ipset, policy.tcp_ports, policy.allow_domains is not None)


def define_filter(connection: LibvirtConnection, vm_network: VMNetwork) -> None:
    """Define (or redefine, keeping its UUID) the VM's nwfilter."""
    xml = vm_network.render()
    conn = connection.connection
    with contextlib.suppress(libvirt.libvirtError):
        uuid = conn.nwfilterLookupByName(filter_name(vm_network.vm_name)).UUIDString()
        root = ET.fromstring(xml)  # redefining needs the existing filter's UUID
        ET.SubElement(root, "uuid").text = uuid
        xml = ET.tostring(root, encoding="unicode")
    try:
        conn.nwfilterDefineXML(xml)
    except libvirt.libvirtError as exc:
        raise NetworkError(
            f"libvirt refused the egress filter of {vm_network.vm_name}: {exc.get_error_message()}"
        ) from exc


def write_pieces(connection: LibvirtConnection, directory: SandboxDirectory, vm: VMNetwork) -> None:
    """Everything after the reservation: ipset, backstop chain, nwfilter, record."""
    fill_set(vm)
    backstop.add_vm(vm.backstop_rules())
    define_filter(connection, vm)
    directory.write(vm.record())


def remove_pieces(
    connection: LibvirtConnection, directory: SandboxDirectory, vm: VMNetwork
) -> list[str]:
    """Remove a VM's pieces (its domain must be gone); returns those that stayed.

    Retried with backoff: right after a domain is destroyed, concurrent firewall
    transactions (libvirt's own, other VMs') can make one of ours fail, and an ipset
    cannot go while a rule still refers to it. The record goes last, and only when
    everything else went, so that a leftover is always found again by ``orphans.py``.
    """
    delay = REMOVE_BACKOFF
    stayed: list[str] = []
    for attempt in range(REMOVE_ATTEMPTS):
        stayed = _remove_once(connection, vm)
        if not stayed:
            directory.remove(vm.addressing.address)
            return []
        if attempt + 1 < REMOVE_ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    log.error(
        "network_pieces_left",
        vm=vm.vm_name,
        left=stayed,
        remedy="`agent-vm gc` removes them once the cause is gone",
    )
    return stayed


def _remove_once(connection: LibvirtConnection, vm: VMNetwork) -> list[str]:
    stayed = []
    name = filter_name(vm.vm_name)
    try:
        connection.connection.nwfilterLookupByName(name).undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
            stayed.append(f"nwfilter {name}: {exc.get_error_message()}")
    except AgentVMError as exc:  # libvirtd unreachable
        stayed.append(f"nwfilter {name}: {exc.message}")
    try:
        backstop.remove_vm(vm.tap)  # before the set: its rules refer to it
    except NetworkError as exc:
        stayed.append(f"backstop chain of {vm.tap}: {exc.message}")
    try:
        ipsets.destroy(vm.ipset)
    except NetworkError as exc:
        stayed.append(f"ipset {vm.ipset}: {exc.message}")
    return stayed
