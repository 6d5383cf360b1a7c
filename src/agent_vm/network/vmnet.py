"""One sandbox's place on the network, and how its pieces are written and removed.

A NAT_FILTERED sandbox owns these pieces, made in this order and removed in the reverse
one (``orphans.py`` relies on the order): an address reservation (record file), two
ipsets (allowed destinations; allowed CIDRs), its layer-3 chain (``l3filter.py``), its
layer-2 chain (``l2filter.py``), the full record. Removal checks what it removed: a piece
that stays (an ipset still referenced by a rule, a transaction that failed) is retried
and, if it still stays, reported, never silently ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent_vm.core.template import NetworkAttachment
from agent_vm.errors import NetworkError
from agent_vm.logs import get_logger
from agent_vm.network import ipsets, l2filter, l3filter, redirect
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

    @property
    def cidr_set(self) -> str:
        return ipsets.cidr_set_name(self.vm_name)

    def attachment(self) -> NetworkAttachment:
        return NetworkAttachment(network=self.network, mac=self.addressing.mac, target_dev=self.tap)

    def record(self) -> SandboxRecord:
        return SandboxRecord(
            vm=self.vm_name,
            addressing=self.addressing,
            policy=self.policy,
            ipset=self.ipset,
            tap=self.tap,
        )

    def l3_rules(self) -> l3filter.VMRules:
        return l3filter.VMRules(
            tap=self.tap,
            ipset=self.ipset,
            cidr_set=self.cidr_set,
            ipv6_ports=tuple(self.policy.tcp_ports) if self.policy.allow_ipv6 else None,
            host_addresses6=self.addressing.host_addresses6,
        )

    def l2_rules(self) -> l2filter.VMRules:
        return l2filter.VMRules(
            tap=self.tap,
            mac=self.addressing.mac,
            address=self.addressing.address,
            gateway=self.addressing.gateway,
            tcp_ports=tuple(self.policy.tcp_ports),
            allow_cidrs=self.policy.allow_cidrs,
            allow_ipv6=self.policy.allow_ipv6,
        )


def fill_sets(vm_network: VMNetwork) -> None:
    """Create the VM's ipsets if needed and refill them for its policy (atomic swaps)."""
    policy = vm_network.policy
    everywhere = () if policy.allow_domains is not None else ipsets.EVERYWHERE
    cidrs = [str(c) for c in policy.allow_cidrs]
    ipsets.fill(
        {
            vm_network.ipset: (policy.tcp_ports, everywhere),
            vm_network.cidr_set: (policy.tcp_ports, cidrs),
        }
    )


def write_rules(vm_network: VMNetwork) -> None:
    """Both layers' chains for the VM's current policy (each replaced atomically)."""
    l3filter.add_vm(vm_network.l3_rules())
    l2filter.add_vm(vm_network.l2_rules())


def write_pieces(directory: SandboxDirectory, vm: VMNetwork) -> None:
    """Everything after the reservation: ipsets, both layers' chains, record."""
    fill_sets(vm)
    write_rules(vm)
    directory.write(vm.record())


def remove_pieces(directory: SandboxDirectory, vm: VMNetwork) -> list[str]:
    """Remove a VM's pieces (its domain must be gone); returns those that stayed.

    Retried with backoff: right after a domain is destroyed, concurrent firewall
    transactions (other VMs', other processes') can make one of ours fail, and an ipset
    cannot go while a rule still refers to it. The record goes last, and only when
    everything else went, so that a leftover is always found again by ``orphans.py``.
    """
    delay = REMOVE_BACKOFF
    stayed: list[str] = []
    for attempt in range(REMOVE_ATTEMPTS):
        stayed = remove_rules_and_sets(vm.tap, (vm.ipset, vm.cidr_set))
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


def remove_rules_and_sets(tap: str, sets: tuple[str, ...]) -> list[str]:
    """One attempt: both layers' chains of ``tap``, then ``sets`` (their rules refer to
    them); what could not be removed."""
    stayed = []
    try:
        l2filter.remove_vm(tap)
    except NetworkError as exc:
        stayed.append(f"layer-2 chain of {tap}: {exc.message}")
    try:
        l3filter.remove_vm(tap)
    except NetworkError as exc:
        stayed.append(f"layer-3 chain of {tap}: {exc.message}")
    try:
        redirect.remove_vm(tap)
    except NetworkError as exc:
        stayed.append(f"proxy redirection of {tap}: {exc.message}")
    try:
        ipsets.destroy(*sets)
    except NetworkError as exc:
        stayed.append(f"ipsets {', '.join(sets)}: {exc.message}")
    return stayed
