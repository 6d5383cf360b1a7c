"""Small helpers shared by integration tests."""

from __future__ import annotations

from pathlib import Path

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.execution.reaper import owned_domains
from agent_vm.network import backstop, ipsets
from agent_vm.network.nwfilter import filter_name
from agent_vm.network.sandboxes import sandbox_directory
from agent_vm.network.taps import tap_name
from tests.waiting import eventually

__all__ = ["domains_of", "eventually", "network_leftovers", "vm_dirs"]


def vm_dirs(settings: Settings) -> set[Path]:
    """Work directories now (the directory itself appears with the first VM)."""
    return set(settings.vms_dir.iterdir()) if settings.vms_dir.is_dir() else set()


def domains_of(connection: LibvirtConnection, pid: int) -> set[str]:
    """Names of the agent-vm domains a process made."""
    return {d.vm.name for d in owned_domains(connection) if d.metadata.get("pid") == str(pid)}


def network_leftovers(settings: Settings, names: set[str]) -> list[str]:
    """Every network piece of the VMs ``names`` still on the host: ipsets, backstop
    chains, address records and nwfilters."""
    found = [f"ipset {ipsets.set_name(vm)}" for vm in names if ipsets.exists(ipsets.set_name(vm))]
    chains = backstop.taps_in(backstop.read_tables())
    found += [f"backstop chain of {vm}" for vm in names if tap_name(vm) in chains]
    records = sandbox_directory(settings.network_name).owners()
    found += [f"record of {vm}" for _, vm, _ in records if vm in names]
    with LibvirtConnection(settings.libvirt_uri) as conn:
        filters = {f.name() for f in conn.connection.listAllNWFilters(0)}
    found += [f"nwfilter of {vm}" for vm in names if filter_name(vm) in filters]
    return found
