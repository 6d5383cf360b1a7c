"""Remove the network pieces of sandboxes whose VM is gone (a crashed process).

A sandbox's pieces are made in this order: address reservation (record file), ipset,
backstop chain, nwfilter, full record; and removed in the reverse order, record last. So a filter or
set without a record is always a leftover, and a record whose VM has no domain is one
once it is old enough not to belong to a VM being created right now.
"""

from __future__ import annotations

import contextlib

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import NetworkError
from agent_vm.host.procs import is_alive
from agent_vm.logs import get_logger
from agent_vm.network import backstop, ipsets
from agent_vm.network.nwfilter import FILTER_PREFIX, LOCAL_SET, filter_name
from agent_vm.network.sandboxes import SandboxDirectory
from agent_vm.network.taps import tap_name

log = get_logger(__name__)


def reap_network(
    connection: LibvirtConnection,
    directory: SandboxDirectory,
    *,
    min_age: float = 60.0,
    gone: frozenset[str] = frozenset(),
) -> list[str]:
    """Remove leftover records, nwfilters and ipsets; returns what was removed.

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
        with contextlib.suppress(libvirt.libvirtError):
            conn.nwfilterLookupByName(filter_name(vm)).undefine()
        with contextlib.suppress(NetworkError):
            backstop.remove_vm(tap_name(vm))  # before the set: its rules refer to it
        with contextlib.suppress(NetworkError):
            ipsets.destroy(ipsets.set_name(vm))
        directory.remove(address)
        removed.append(f"network of {vm}")
    for nwfilter in conn.listAllNWFilters(0):
        name = nwfilter.name()
        vm = name.removeprefix(FILTER_PREFIX)
        if name.startswith(FILTER_PREFIX) and vm not in keep and vm not in domains:
            with contextlib.suppress(libvirt.libvirtError):
                nwfilter.undefine()
                removed.append(f"nwfilter {name}")
    kept_taps = {tap_name(vm) for vm in keep | domains}
    with contextlib.suppress(NetworkError):
        for tap in backstop.taps_in(backstop.read_tables()) - kept_taps:
            backstop.remove_vm(tap)
            removed.append(f"backstop chain of {tap}")
    kept_sets = {ipsets.set_name(vm) for vm in keep | domains} | {LOCAL_SET}
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
