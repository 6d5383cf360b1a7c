"""Remove the network pieces of sandboxes whose VM is gone (a crashed process).

A sandbox's pieces are made in this order: address reservation (record file), ipsets,
layer-3 chain, layer-2 chain, full record; and removed in the reverse order, record
last. So a chain or set without a record is always a leftover, and a record whose VM has
no domain is one once it is old enough not to belong to a VM being created right now.
Filters of agent-vm versions that used libvirt's nwfilter are removed too.
"""

from __future__ import annotations

import contextlib

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import NetworkError
from agent_vm.host.procs import is_alive
from agent_vm.logs import get_logger
from agent_vm.network import ipsets, l2filter, l3filter, redirect
from agent_vm.network.sandboxes import SandboxDirectory
from agent_vm.network.taps import tap_name
from agent_vm.network.vmnet import remove_rules_and_sets

log = get_logger(__name__)

LEGACY_FILTER_PREFIX = "agentvm-egress-"  # libvirt nwfilters of agent-vm before 0.2


def reap_network(
    connection: LibvirtConnection,
    directory: SandboxDirectory,
    *,
    min_age: float = 60.0,
    gone: frozenset[str] = frozenset(),
) -> list[str]:
    """Remove leftover records, chains and ipsets; returns what was removed.

    ``gone``: VMs known to be dead (just reaped), whose pieces go whatever their age.
    """
    conn = connection.connection
    domains = {domain.name() for domain in conn.listAllDomains(0)}
    removed = []
    keep = set()
    for address, vm, age in directory.owners():
        if vm in domains or (age < min_age and vm not in gone):
            keep.add(vm)
            continue
        sets = (ipsets.set_name(vm), ipsets.cidr_set_name(vm))
        if not remove_rules_and_sets(tap_name(vm), sets):
            directory.remove(address)
            removed.append(f"network of {vm}")
    for nwfilter in conn.listAllNWFilters(0):
        if nwfilter.name().startswith(LEGACY_FILTER_PREFIX):
            with contextlib.suppress(libvirt.libvirtError):
                nwfilter.undefine()
                removed.append(f"nwfilter {nwfilter.name()}")
    alive = keep | domains
    kept_taps = {tap_name(vm) for vm in alive}
    with contextlib.suppress(NetworkError):
        for tap in l2filter.taps_in(l2filter.read_table()) - kept_taps:
            l2filter.remove_vm(tap)
            removed.append(f"layer-2 chain of {tap}")
        for tap in l3filter.taps_in(l3filter.read_tables()) - kept_taps:
            l3filter.remove_vm(tap)
            removed.append(f"layer-3 chain of {tap}")
        for tap in redirect.taps_in() - kept_taps:
            redirect.remove_vm(tap)
            removed.append(f"proxy redirection of {tap}")
    kept_sets = {f(vm) for vm in alive for f in (ipsets.set_name, ipsets.cidr_set_name)}
    kept_sets |= set(ipsets.SHARED_SETS)
    for name in ipsets.names():
        owner = ipsets.twin_owner(name)
        if owner is not None and is_alive(owner):
            continue  # being refilled by a live process
        if name not in kept_sets:
            with contextlib.suppress(NetworkError):  # still referenced by live rules
                ipsets.destroy(name)
                removed.append(f"ipset {name}")
    if removed:
        log.info("network_leftovers_removed", removed=removed)
    return removed
