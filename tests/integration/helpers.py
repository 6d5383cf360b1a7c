"""Small helpers shared by integration tests."""

from __future__ import annotations

from pathlib import Path

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.execution.reaper import owned_domains
from agent_vm.network import ipsets, l2filter, l3filter
from agent_vm.network.sandboxes import sandbox_directory
from agent_vm.network.taps import tap_name
from tests.waiting import eventually

__all__ = ["domains_of", "eventually", "network_leftovers", "vm_dirs"]


def vm_dirs(settings: Settings) -> set[Path]:
    """Work directories now (the directory itself appears with the first VM)."""
    return set(settings.vms_dir.iterdir()) if settings.vms_dir.is_dir() else set()


def saved_dirs(settings: Settings) -> set[Path]:
    """Paused sandboxes and snapshots on disk now (data a test must remove itself)."""
    found: set[Path] = set()
    for root in (settings.paused_dir, settings.state_dir / "snapshots"):
        if root.is_dir():
            found |= set(root.iterdir())
    return found


def domains_of(connection: LibvirtConnection, pid: int) -> set[str]:
    """Names of the agent-vm domains a process made."""
    return {d.vm.name for d in owned_domains(connection) if d.metadata.get("pid") == str(pid)}


def network_leftovers(settings: Settings, names: set[str]) -> list[str]:
    """Every network piece of the VMs ``names`` still on the host: ipsets, both layers'
    chains and address records."""
    sets = set(ipsets.names())
    found = [
        f"ipset {name}"
        for vm in names
        for name in (ipsets.set_name(vm), ipsets.cidr_set_name(vm))
        if name in sets
    ]
    l3 = l3filter.taps_in(l3filter.read_tables())
    found += [f"layer-3 chain of {vm}" for vm in names if tap_name(vm) in l3]
    l2 = l2filter.taps_in(l2filter.read_table())
    found += [f"layer-2 chain of {vm}" for vm in names if tap_name(vm) in l2]
    records = sandbox_directory(settings.network_name).owners()
    found += [f"record of {vm}" for _, vm, _ in records if vm in names]
    return found
