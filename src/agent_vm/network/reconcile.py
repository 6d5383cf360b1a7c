"""Keeping what is live equal to what each sandbox's policy says.

libvirt writes a filter into the kernel once and never looks again; libvirtd restarts,
firewall reloads and ``iptables -F`` silently undo it. The reconciler compares, for a
VM, the live nwfilter with the rendered one, its ipsets, its record, its backstop chain,
its interface binding and libvirt's kernel rules, and repairs what differs; what cannot
be repaired stops the VM (a sandbox never runs unfiltered). The watch loop runs it after
every libvirt reconnect and whenever a periodic check finds a VM's rules gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.vm import VM
from agent_vm.errors import AgentVMError, NetworkError
from agent_vm.logs import get_logger
from agent_vm.network import backstop, firewall, ipsets
from agent_vm.network.libvirt_net import NetworkDefinition, ensure_network
from agent_vm.network.nwfilter import LOCAL_SET, filter_name, rules_of
from agent_vm.network.sandboxes import SandboxDirectory
from agent_vm.network.taps import TAP_PREFIX
from agent_vm.network.vmnet import VMNetwork, define_filter, fill_set

log = get_logger(__name__)

WATCH_INTERVAL = 1.0
FIREWALL_CHECK_INTERVAL = 2.0  # iptables-save + nft list: ~10 ms of CPU


class Reconciler:
    """Repairs the network pieces of the VMs in ``vms`` (the guard's live registry)."""

    def __init__(
        self,
        connection: LibvirtConnection,
        definition: NetworkDefinition,
        directory: SandboxDirectory,
        vms: dict[str, VMNetwork],
        refresh_local_set: Callable[[], None],
    ) -> None:
        self.connection = connection
        self.definition = definition
        self.directory = directory
        self._vms = vms
        self._refresh_local_set = refresh_local_set
        self._enforced: set[str] = set()  # taps whose rules were once seen complete
        self._closing: set[str] = set()  # taps of VMs being destroyed

    def closing(self, tap: str) -> None:
        """The VM is about to be destroyed: its kernel rules will vanish, on purpose."""
        self._closing.add(tap)

    def forget(self, tap: str) -> None:
        self._enforced.discard(tap)
        self._closing.discard(tap)

    async def reconcile(self, vm: VM) -> list[str]:
        """Compare what is live for ``vm`` with its policy; fix it, or stop the VM."""
        vm_network = self._vms.get(vm.name)
        if vm_network is None:
            return []
        fixes = await asyncio.to_thread(self._reconcile, vm, vm_network)
        if fixes:
            log.warning("egress_reconciled", vm=vm.name, fixes=fixes)
        return fixes

    def problems(self, vm_network: VMNetwork) -> list[str]:
        """What is missing from the kernel to enforce a VM's policy (both layers);
        blocking (runs iptables-save and nft)."""
        tables = backstop.read_tables()
        found = backstop.base_problems(tables, TAP_PREFIX)
        found += backstop.vm_problems(tables, vm_network.backstop_rules())
        if not firewall.rules_present(vm_network.tap):
            found.append(f"libvirt's filter rules for {vm_network.tap} are incomplete")
        return found

    def _reconcile(self, vm: VM, vm_network: VMNetwork) -> list[str]:
        if not vm.is_active():
            return []  # being destroyed (or gone): its rules go with it
        fixes = []
        try:
            live = self.connection.connection.nwfilterLookupByName(filter_name(vm.name)).XMLDesc(0)
        except libvirt.libvirtError:
            live = None
        if live is None or rules_of(live) != rules_of(vm_network.render()):
            define_filter(self.connection, vm_network)
            fixes.append("filter redefined")
        if not ipsets.exists(vm_network.ipset) or not ipsets.exists(LOCAL_SET):
            self._refresh_local_set()
            fill_set(vm_network)
            fixes.append("ipsets recreated")
        if self.directory.lookup(vm_network.addressing.address) is None:
            self.directory.write(vm_network.record())
            fixes.append("sandbox record rewritten")
        try:
            tables = backstop.read_tables()
            if backstop.ensure_base(TAP_PREFIX, tables):
                fixes.append("backstop chains restored")
            rules = vm_network.backstop_rules()
            if backstop.vm_problems(tables, rules):
                backstop.add_vm(rules)
                fixes.append("backstop rules of the VM restored")
            if not self._interface_bound(vm, vm_network):
                raise NetworkError(f"{vm.name}'s interface lost its filter")
            if not firewall.rules_present(vm_network.tap):
                self._rebind(vm_network.tap)
                fixes.append("firewall rules re-instantiated")
        except (AgentVMError, libvirt.libvirtError) as exc:
            if not vm.is_active():
                return fixes  # destroyed meanwhile: nothing left to enforce
            log.error("egress_unenforceable", vm=vm.name, error=str(exc), action="stopping VM")
            vm.destroy()
            fixes.append(f"VM stopped: {exc}")
        return fixes

    @staticmethod
    def _interface_bound(vm: VM, vm_network: VMNetwork) -> bool:
        root = ET.fromstring(vm.xml())
        for iface in root.findall("devices/interface"):
            ref = iface.find("filterref")
            if ref is not None and ref.get("filter") == filter_name(vm.name):
                ips = [p.get("value") for p in ref.findall("parameter") if p.get("name") == "IP"]
                return ips == [str(vm_network.addressing.address)]
        return False

    def _rebind(self, tap: str) -> None:
        """Make libvirt instantiate the filter's rules again (e.g. after an iptables flush)."""
        conn = self.connection.connection
        binding = conn.nwfilterBindingLookupByPortDev(tap)
        xml = binding.XMLDesc(0)
        binding.delete()
        conn.nwfilterBindingCreateXML(xml, 0)

    async def watch(self) -> None:
        """Reconcile after libvirtd comes back, and whenever a VM's kernel rules vanish.
        A failed round is logged and the next one tried: the watch must outlive errors."""
        generation = self.connection.generation
        checked = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await asyncio.to_thread(lambda: self.connection.connection)
            except AgentVMError:
                continue  # libvirtd away: nothing can be checked or fixed now
            try:
                if self.connection.generation != generation:
                    generation = self.connection.generation
                    log.info("libvirt_reconnected_reconciling", vms=len(self._vms))
                    await asyncio.to_thread(ensure_network, self.connection, self.definition)
                    for name in list(self._vms):
                        with contextlib.suppress(AgentVMError):
                            await self.reconcile(VM.lookup(self.connection, name))
                if self._vms and time.monotonic() - checked >= FIREWALL_CHECK_INTERVAL:
                    checked = time.monotonic()
                    await self.check_firewall()
            except Exception as exc:  # logged; the next round tries again
                log.error("network_guard_round_failed", error=repr(exc))

    async def check_firewall(self) -> None:
        """A tap counts once its rules were seen complete (libvirt builds them while the
        VM starts); if they are gone later while its VM still runs, reconcile it."""
        tables = await asyncio.to_thread(backstop.read_tables)
        if damage := backstop.base_problems(tables, TAP_PREFIX):
            log.warning("egress_backstop_damaged", problems=damage)
            await asyncio.to_thread(backstop.ensure_base, TAP_PREFIX, tables)
        networks = {vm_network.tap: vm_network for vm_network in list(self._vms.values())}
        taps = {tap: vm_network.vm_name for tap, vm_network in networks.items()}
        lost = await asyncio.to_thread(firewall.missing, taps)
        lost |= {
            tap
            for tap, vm_network in networks.items()  # VMs may be detached meanwhile
            if backstop.vm_problems(tables, vm_network.backstop_rules())
        }
        self._enforced |= set(taps) - lost
        for tap in (lost & self._enforced) - self._closing:
            name = taps[tap]
            if name not in self._vms:
                continue  # detached while we looked
            vm = VM.lookup(self.connection, name)
            if await asyncio.to_thread(vm.is_active):
                log.warning("egress_rules_vanished", vm=vm.name, tap=tap)
                await self.reconcile(vm)
