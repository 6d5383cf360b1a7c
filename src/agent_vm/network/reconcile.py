"""Keeping what is in the kernel equal to what each sandbox's policy says.

Both filter layers are agent-vm's own tables, which nothing else rebuilds; but a
firewall reload, ``iptables -t mangle -F``, ``nft flush ruleset`` or an ``ipset destroy``
can still remove them. Every ``FIREWALL_CHECK_INTERVAL`` the watch reads both layers once
and compares the shared parts and every VM's chain with its policy; what differs is
written again. What cannot be repaired stops the VM: a sandbox never runs unfiltered.
After libvirtd comes back, the network is verified (libvirt owns it and its NAT).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any, Literal

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.vm import VM
from agent_vm.errors import AgentVMError
from agent_vm.logs import get_logger
from agent_vm.network import ipsets, l2filter, l3filter
from agent_vm.network.libvirt_net import NetworkDefinition, ensure_network
from agent_vm.network.sandboxes import SandboxDirectory
from agent_vm.network.taps import TAP_PREFIX
from agent_vm.network.vmnet import VMNetwork, fill_sets, write_rules

log = get_logger(__name__)

WATCH_INTERVAL = 1.0
FIREWALL_CHECK_INTERVAL = 2.0  # iptables-save + nft list: ~15 ms of CPU
REPAIR_ATTEMPTS = 3
WRITE_RETRIES = 3  # failed writes (the shared table gone meanwhile) before a VM is stopped
SharedSets = tuple[tuple[IPv4Network, ...], tuple[IPv4Network, ...]]  # local, non-public


class Reconciler:
    """Repairs the network pieces of the VMs in ``vms`` (the guard's live registry)."""

    def __init__(
        self,
        connection: LibvirtConnection,
        definition: NetworkDefinition,
        directory: SandboxDirectory,
        vms: dict[str, VMNetwork],
        refresh_shared: Callable[..., object],
        shared: Callable[[], SharedSets | None],
    ) -> None:
        self.connection = connection
        self.definition = definition
        self.directory = directory
        self._vms = vms
        self._refresh_shared = refresh_shared
        self._shared = shared  # what the shared sets were last written as
        self._busy: set[str] = set()  # taps whose pieces are being written or removed

    def hold(self, tap: str) -> None:
        """Leave this VM's pieces alone: they are being written (attach) or are about to
        go with the VM (teardown); checking them now would be a false alarm."""
        self._busy.add(tap)

    def release(self, tap: str) -> None:
        self._busy.discard(tap)

    def problems(self, vm_network: VMNetwork) -> list[str]:
        """What is missing from the kernel to enforce a VM's policy (both layers and the
        sets); blocking."""
        found = self._shared_problems()
        found += l3filter.vm_problems(l3filter.read_tables(), vm_network.l3_rules())
        found += l2filter.vm_problems(l2filter.read_table(), vm_network.l2_rules())
        found += [
            f"ipset {name} is missing"
            for name in (vm_network.ipset, vm_network.cidr_set)
            if not ipsets.exists(name)
        ]
        return found

    def _shared_problems(
        self,
        l3_tables: l3filter.Tables | None = None,
        l2_table: dict[str, Any] | Literal[False] | None = False,
    ) -> list[str]:
        """What is wrong with the parts every sandbox shares (blocking)."""
        found = l3filter.base_problems(l3_tables or l3filter.read_tables(), TAP_PREFIX)
        table = l2filter.read_table() if l2_table is False else l2_table
        shared = self._shared()
        local, nonpublic = shared if shared is not None else ((), ())
        problems = l2filter.base_problems(table, local, nonpublic)
        if shared is None:  # nothing written yet: only the structure can be checked
            problems = [p for p in problems if not p.endswith("differs")]
        found += problems
        found += [
            f"ipset {name} is missing" for name in ipsets.SHARED_SETS if not ipsets.exists(name)
        ]
        return found

    async def reconcile(self, vm_name: str) -> list[str]:
        """Repair what is missing for a VM; stop it when that fails."""
        vm_network = self._vms.get(vm_name)
        if vm_network is None:
            return []
        fixes = await asyncio.to_thread(self._reconcile_one, vm_network)
        if fixes:
            log.warning("egress_reconciled", vm=vm_name, fixes=fixes)
        return fixes

    def _reconcile_one(self, vm_network: VMNetwork) -> list[str]:
        """Rewrite what differs, re-check, and again if something else was damaged
        meanwhile; stop the VM only when writing fails or the damage keeps coming."""
        fixes: list[str] = []
        problems: list[str] = []
        rewrites = failures = 0
        while rewrites < REPAIR_ATTEMPTS:
            fixes += self._repair_shared()
            problems = self.problems(vm_network)
            if not problems:
                return fixes
            try:
                fill_sets(vm_network)
                write_rules(vm_network)
                if self.directory.lookup(vm_network.addressing.address) is None:
                    self.directory.write(vm_network.record())
            except AgentVMError as exc:
                # the shared table may have gone again between its repair and this write
                # (a flush, libvirtd reloading): repair it and write again before giving up
                failures += 1
                if failures > WRITE_RETRIES:
                    fixes.append(self._stop(vm_network, exc))
                    return fixes
                log.warning("egress_rewrite_failed", vm=vm_network.vm_name, error=str(exc))
                time.sleep(0.05 * failures)
                continue
            rewrites += 1
            fixes.append(f"rewritten: {'; '.join(problems)}")
        problems = self.problems(vm_network)
        if problems:
            damage = AgentVMError(f"still damaged after {REPAIR_ATTEMPTS} rewrites: {problems}")
            fixes.append(self._stop(vm_network, damage))
        return fixes

    def _stop(self, vm_network: VMNetwork, exc: AgentVMError) -> str:
        """The last resort: a VM whose policy cannot be enforced does not run."""
        try:
            vm = VM.lookup(self.connection, vm_network.vm_name)
            if vm.is_active():
                log.error("egress_unenforceable", vm=vm.name, error=str(exc), action="stopping VM")
                vm.destroy()
                return f"VM stopped: {exc}"
        except AgentVMError:
            pass  # not defined yet or gone: it sends nothing
        return f"unrepaired, VM not running: {exc}"

    def _repair_shared(self) -> list[str]:
        problems = self._shared_problems()
        if not problems:
            return []
        self._refresh_shared(force=True)
        l3filter.ensure_base(TAP_PREFIX)
        return [f"shared parts restored: {'; '.join(problems)}"]

    async def watch(self) -> None:
        """Check both layers every FIREWALL_CHECK_INTERVAL and repair what vanished;
        verify the network after libvirtd comes back. A failed round is logged and the
        next one tried: the watch must outlive errors."""
        generation = self.connection.generation
        checked = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                if self.connection.generation != generation:
                    generation = self.connection.generation
                    log.info("libvirt_reconnected_verifying_network", vms=len(self._vms))
                    await asyncio.to_thread(ensure_network, self.connection, self.definition)
                if self._vms and time.monotonic() - checked >= FIREWALL_CHECK_INTERVAL:
                    checked = time.monotonic()
                    await self.check_firewall()
            except Exception as exc:  # logged; the next round tries again
                log.error("network_guard_round_failed", error=repr(exc))

    async def check_firewall(self) -> None:
        """One read of each layer; VMs whose pieces are damaged are repaired.

        Only VMs that were settled (not being attached or torn down) before the read
        started are judged by it: a VM whose attach finished while the tables were being
        read is missing from that snapshot without anything having vanished (the false
        alarms a pool soak used to log). A finding is confirmed by a fresh read before it
        is reported."""
        settled = [v for v in self._vms.values() if v.tap not in self._busy]
        if not settled:
            return
        l3_tables, l2_table = await asyncio.to_thread(
            lambda: (l3filter.read_tables(), l2filter.read_table())
        )
        damaged = [
            vm_network
            for vm_network in settled
            if l3filter.vm_problems(l3_tables, vm_network.l3_rules())
            or l2filter.vm_problems(l2_table, vm_network.l2_rules())
        ]
        shared = self._shared_problems(l3_tables, l2_table)
        if shared and not damaged:
            await asyncio.to_thread(self._repair_shared)
        for vm_network in damaged:
            if self._vms.get(vm_network.vm_name) is not vm_network or vm_network.tap in self._busy:
                continue  # detached, or its teardown began, while we looked
            problems = await asyncio.to_thread(self.problems, vm_network)
            if not problems:
                continue
            log.warning(
                "egress_rules_vanished", vm=vm_network.vm_name, tap=vm_network.tap,
                problems=problems,
            )  # fmt: skip
            await self.reconcile(vm_network.vm_name)
