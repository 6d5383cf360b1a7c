"""The per-process owner of sandbox networking: network, addresses, filters, DNS, counters.

One ``NetworkGuard`` serves every VM a process starts in NAT_FILTERED mode:

* ``start()``: the project's libvirt network (created or verified), br_netfilter, the
  backstop's shared chains, the network pieces of crashed processes' sandboxes removed,
  the resolver on the gateway, the blocked-attempt observer, and a watch that
  reconciles every VM's filter after libvirtd comes back;
* ``attach(vm, policy)`` before the domain is defined: MAC, reserved address, ipset,
  backstop chain, per-VM nwfilter, shared sandbox record; ``detach`` after the domain
  is gone;
* ``set_policy`` on a running VM: the filter is redefined (libvirt applies it to the
  live interface), the record rewritten, resolved addresses dropped if names changed;
* ``reconcile``: live filter, interface binding, firewall rules and ipset compared with
  the policy, and repaired (or the VM stopped when that fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import libvirt

from agent_vm import timeutil
from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import NetworkAttachment
from agent_vm.core.vm import VM
from agent_vm.errors import AgentVMError, NetworkError
from agent_vm.host.netfilter import ensure_bridge_netfilter
from agent_vm.logs import get_logger
from agent_vm.network import backstop, firewall, ipsets
from agent_vm.network.libvirt_net import NetworkDefinition, ensure_network
from agent_vm.network.nwfilter import LOCAL_SET, filter_name, render_filter, rules_of
from agent_vm.network.observer import Attempt, KernelLogFollower, install
from agent_vm.network.orphans import reap_network
from agent_vm.network.policy import Addressing, EgressPolicy, verdict
from agent_vm.network.resolver import Resolver, upstreams_from_resolv_conf
from agent_vm.network.sandboxes import SandboxDirectory, SandboxRecord
from agent_vm.network.taps import TAP_PREFIX, tap_name

log = get_logger(__name__)

GLOBAL_UNICAST = IPv6Network("2000::/3")
WATCH_INTERVAL = 1.0
FIREWALL_CHECK_INTERVAL = 2.0  # iptables-save + nft list: ~10 ms of CPU


def random_mac() -> str:
    tail = os.urandom(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _addresses(family: str) -> list[str]:
    out = subprocess.run(["ip", "-j", family, "addr"], capture_output=True, text=True, check=False)
    return [
        info["local"]
        for interface in json.loads(out.stdout or "[]")
        for info in interface.get("addr_info", [])
    ]


def host_addresses() -> tuple[IPv4Address, ...]:
    """Every IPv4 address of the host (sandboxes may reach none but DNS/DHCP on the gateway)."""
    addresses = {IPv4Address(a) for a in _addresses("-4")}
    return tuple(sorted(a for a in addresses if not a.is_loopback))


def host_addresses6() -> tuple[IPv6Address, ...]:
    """The host's addresses in 2000::/3, the only range a sandbox's IPv6 may reach."""
    addresses = {IPv6Address(a) for a in _addresses("-6")}
    return tuple(sorted(a for a in addresses if a in GLOBAL_UNICAST))


RUN_DIR = Path("/run/agent-vm/networks")


def sandbox_directory(settings: Settings) -> SandboxDirectory:
    """Records live per libvirt network, not per state directory: the network and its
    addresses are host-wide, so two installations (state dirs) sharing it must see each
    other's reservations. Under /run, as they are as short-lived as the VMs."""
    return SandboxDirectory(RUN_DIR / settings.network_name / "sandboxes")


@dataclass(frozen=True)
class Blocked:
    """One blocked attempt of a sandbox."""

    at: datetime
    kind: str  # dns, tcp, udp, icmp, ipv6, ...
    destination: str
    port: int | None
    reason: str


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


@dataclass
class _Counters:
    total: int = 0
    recent: deque[Blocked] = field(default_factory=lambda: deque(maxlen=1000))


class NetworkGuard:
    def __init__(
        self,
        connection: LibvirtConnection,
        settings: Settings,
        *,
        upstreams: list[tuple[str, int]] | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.definition = NetworkDefinition(
            name=settings.network_name,
            bridge=settings.network_bridge,
            subnet=IPv4Network(settings.network_subnet),
        )
        self.directory = sandbox_directory(settings)
        self._upstreams = upstreams
        self._vms: dict[str, VMNetwork] = {}
        self._by_tap: dict[str, VMNetwork] = {}
        self._enforced: set[str] = set()  # taps whose rules were once seen complete
        self._closing: set[str] = set()  # taps of VMs being destroyed
        self._counters: dict[str, _Counters] = defaultdict(_Counters)
        self._resolver: Resolver | None = None
        self._follower: KernelLogFollower | None = None
        self._watch: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(ensure_bridge_netfilter)
        await asyncio.to_thread(ensure_network, self.connection, self.definition)
        await asyncio.to_thread(install, TAP_PREFIX, self.definition.gateway)
        await asyncio.to_thread(backstop.ensure_base, TAP_PREFIX)
        await asyncio.to_thread(self._local_set)
        await asyncio.to_thread(reap_network, self.connection, self.directory)
        upstreams = self._upstreams or self.settings.dns_upstreams() or upstreams_from_resolv_conf()
        self._resolver = Resolver(
            self.definition.gateway, self.directory, upstreams, on_blocked=self._count_dns
        )
        await self._resolver.start()
        self._follower = KernelLogFollower(self._observed)
        self._follower.start()
        self._watch = asyncio.create_task(self._watch_libvirt(), name="network-guard-watch")
        self._started = True

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._follower is not None:
            self._follower.stop()
        if self._resolver is not None:
            await self._resolver.close()
        self._started = False

    # ------------------------------------------------------------------ per VM

    async def attach(self, vm_name: str, policy: EgressPolicy | None = None) -> VMNetwork:
        """Address, ipset, filter and record for a VM about to be defined."""
        await self.start()
        await asyncio.to_thread(self._local_set)  # the host may have gained addresses
        mac = random_mac()
        address = await asyncio.to_thread(
            self.directory.reserve, self.definition.static_addresses(), vm_name
        )
        vm_network = VMNetwork(
            vm_name=vm_name,
            addressing=Addressing(
                mac=mac,
                address=address,
                network=self.definition.subnet,
                gateway=self.definition.gateway,
                host_addresses=await asyncio.to_thread(host_addresses),
                host_addresses6=await asyncio.to_thread(host_addresses6),
            ),
            policy=policy or EgressPolicy(),
            ipset=ipsets.set_name(vm_name),
            tap=tap_name(vm_name),
            network=self.definition.name,
        )
        try:
            await asyncio.to_thread(self._prepare_set, vm_network)
            await asyncio.to_thread(backstop.add_vm, self._backstop(vm_network))
            await asyncio.to_thread(self._define_filter, vm_network)
            await asyncio.to_thread(self.directory.write, vm_network.record())
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._remove, vm_network))
            raise
        self._track(vm_network)
        return vm_network

    def closing(self, vm_name: str) -> None:
        """The VM is about to be destroyed: its kernel rules will vanish, on purpose."""
        vm_network = self._vms.get(vm_name)
        if vm_network is not None:
            self._closing.add(vm_network.tap)

    async def detach(self, vm_name: str) -> None:
        """Remove what attach made; call after the domain is destroyed and undefined."""
        vm_network = self._vms.pop(vm_name, None)
        if vm_network is None:
            return
        self._by_tap.pop(vm_network.tap, None)
        self._enforced.discard(vm_network.tap)
        self._closing.discard(vm_network.tap)
        await asyncio.to_thread(self._remove, vm_network)

    async def set_policy(self, vm_name: str, policy: EgressPolicy) -> None:
        """Change a running VM's policy; in force when this returns."""
        vm_network = self._vms.get(vm_name)
        if vm_network is None:
            raise NetworkError(f"{vm_name} has no network managed by this process")
        before = self._render(vm_network)
        vm_network.policy = policy
        await asyncio.to_thread(self.directory.write, vm_network.record())
        await asyncio.to_thread(self._prepare_set, vm_network)
        if self._render(vm_network) != before:  # IPv6 rules are in the XML, the rest in sets
            await asyncio.to_thread(backstop.add_vm, self._backstop(vm_network))
            await asyncio.to_thread(self._define_filter, vm_network)
        log.info("egress_policy_changed", vm=vm_name, policy=policy.model_dump())

    def enforcement_problems(self, vm_name: str) -> list[str]:
        """What is missing from the kernel to enforce a VM's policy (both layers); blocking
        (runs iptables-save and nft)."""
        vm_network = self._vms[vm_name]
        tables = backstop.read_tables()
        problems = backstop.base_problems(tables, TAP_PREFIX)
        problems += backstop.vm_problems(tables, self._backstop(vm_network))
        if not firewall.rules_present(vm_network.tap):
            problems.append(f"libvirt's filter rules for {vm_network.tap} are incomplete")
        return problems

    def policy(self, vm_name: str) -> EgressPolicy | None:
        vm_network = self._vms.get(vm_name)
        return vm_network.policy if vm_network else None

    def blocked(self, vm_name: str) -> list[Blocked]:
        return list(self._counters[vm_name].recent)

    def blocked_count(self, vm_name: str) -> int:
        return self._counters[vm_name].total

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, vm: VM) -> list[str]:
        """Compare what is live for ``vm`` with its policy; fix it, or stop the VM."""
        vm_network = self._vms.get(vm.name)
        if vm_network is None:
            return []
        fixes = await asyncio.to_thread(self._reconcile, vm, vm_network)
        if fixes:
            log.warning("egress_reconciled", vm=vm.name, fixes=fixes)
        return fixes

    def _reconcile(self, vm: VM, vm_network: VMNetwork) -> list[str]:
        if not vm.is_active():
            return []  # being destroyed (or gone): its rules go with it
        fixes = []
        expected = self._render(vm_network)
        try:
            live = self.connection.connection.nwfilterLookupByName(filter_name(vm.name)).XMLDesc(0)
        except libvirt.libvirtError:
            live = None
        if live is None or rules_of(live) != rules_of(expected):
            self._define_filter(vm_network)
            fixes.append("filter redefined")
        if not ipsets.exists(vm_network.ipset) or not ipsets.exists(LOCAL_SET):
            self._local_set()
            self._prepare_set(vm_network)
            fixes.append("ipsets recreated")
        if self.directory.lookup(vm_network.addressing.address) is None:
            self.directory.write(vm_network.record())
            fixes.append("sandbox record rewritten")
        try:
            tables = backstop.read_tables()
            if backstop.ensure_base(TAP_PREFIX, tables):
                fixes.append("backstop chains restored")
            rules = self._backstop(vm_network)
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

    def _interface_bound(self, vm: VM, vm_network: VMNetwork) -> bool:
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

    async def _watch_libvirt(self) -> None:
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
                    await self._check_firewall()
            except Exception as exc:  # logged; the next round tries again
                log.error("network_guard_round_failed", error=repr(exc))

    async def _check_firewall(self) -> None:
        """A tap counts once its rules were seen complete (libvirt builds them while the
        VM starts); if they are gone later while its VM still runs, reconcile it."""
        tables = await asyncio.to_thread(backstop.read_tables)
        if damage := backstop.base_problems(tables, TAP_PREFIX):
            log.warning("egress_backstop_damaged", problems=damage)
            await asyncio.to_thread(backstop.ensure_base, TAP_PREFIX, tables)
        networks = {vm_network.tap: vm_network for vm_network in self._vms.values()}
        taps = {tap: vm_network.vm_name for tap, vm_network in networks.items()}
        lost = await asyncio.to_thread(firewall.missing, taps)
        lost |= {
            tap
            for tap, vm_network in networks.items()  # VMs may be detached meanwhile
            if backstop.vm_problems(tables, self._backstop(vm_network))
        }
        self._enforced |= set(taps) - lost
        for tap in (lost & self._enforced) - self._closing:
            vm = VM.lookup(self.connection, taps[tap])
            if tap in self._by_tap and await asyncio.to_thread(vm.is_active):
                log.warning("egress_rules_vanished", vm=vm.name, tap=tap)
                await self.reconcile(vm)

    # ------------------------------------------------------------------ internals

    def _local_set(self) -> None:
        local = [f"{a}/32" for a in (self.definition.gateway, *host_addresses())]
        ipsets.ensure_local(LOCAL_SET, [*local, str(self.definition.subnet)])

    @staticmethod
    def _prepare_set(vm_network: VMNetwork) -> None:
        ipsets.create(vm_network.ipset)
        policy = vm_network.policy
        ipsets.fill(vm_network.ipset, policy.tcp_ports, policy.allow_domains is not None)

    @staticmethod
    def _backstop(vm_network: VMNetwork) -> backstop.VMRules:
        policy = vm_network.policy
        return backstop.VMRules(
            tap=vm_network.tap,
            ipset=vm_network.ipset,
            local_set=LOCAL_SET,
            ipv6_ports=tuple(policy.tcp_ports) if policy.allow_ipv6 else None,
            host_addresses6=vm_network.addressing.host_addresses6,
        )

    @staticmethod
    def _render(vm_network: VMNetwork) -> str:
        return render_filter(
            vm_network.vm_name, vm_network.policy, vm_network.addressing, vm_network.ipset
        )

    def _define_filter(self, vm_network: VMNetwork) -> None:
        xml = self._render(vm_network)
        conn = self.connection.connection
        with contextlib.suppress(libvirt.libvirtError):
            uuid = conn.nwfilterLookupByName(filter_name(vm_network.vm_name)).UUIDString()
            root = ET.fromstring(xml)  # redefining needs the existing filter's UUID
            ET.SubElement(root, "uuid").text = uuid
            xml = ET.tostring(root, encoding="unicode")
        try:
            conn.nwfilterDefineXML(xml)
        except libvirt.libvirtError as exc:
            raise NetworkError(
                f"libvirt refused the egress filter of {vm_network.vm_name}: "
                f"{exc.get_error_message()}"
            ) from exc

    def _remove(self, vm_network: VMNetwork) -> None:
        conn = self.connection.connection
        with contextlib.suppress(libvirt.libvirtError):
            conn.nwfilterLookupByName(filter_name(vm_network.vm_name)).undefine()
        with contextlib.suppress(NetworkError):
            backstop.remove_vm(vm_network.tap)  # before the set: its rules refer to it
        with contextlib.suppress(NetworkError):
            ipsets.destroy(vm_network.ipset)
        self.directory.remove(vm_network.addressing.address)

    def _track(self, vm_network: VMNetwork) -> None:
        self._vms[vm_network.vm_name] = vm_network
        self._by_tap[vm_network.tap] = vm_network

    def _count(self, vm_name: str, blocked: Blocked) -> None:
        counters = self._counters[vm_name]
        counters.total += 1
        counters.recent.append(blocked)

    def _count_dns(self, vm_name: str, kind: str, destination: str, port: int) -> None:
        if vm_name in self._vms:
            self._count(
                vm_name, Blocked(timeutil.now(), kind, destination, port, "name not allowed")
            )

    def _observed(self, attempt: Attempt) -> None:
        """From the kernel-log thread: classify and count attempts of our own VMs."""
        vm_network = self._by_tap.get(attempt.tap)
        if vm_network is None:
            return
        if attempt.protocol == "ipv6":
            reason: str | None = None if vm_network.policy.allow_ipv6 else "IPv6 not allowed"
        elif attempt.destination is None:
            reason = "malformed"
        elif attempt.source is not None and attempt.source not in (
            vm_network.addressing.address,
            IPv4Address(0),  # a DHCP client before it has an address
        ):
            reason = f"spoofed source address {attempt.source}"
        else:
            resolved = (
                vm_network.policy.allow_domains is not None
                and attempt.port is not None
                and ipsets.contains(vm_network.ipset, attempt.destination, attempt.port)
            )
            reason = verdict(
                vm_network.policy,
                vm_network.addressing,
                protocol=attempt.protocol,
                destination=attempt.destination,
                port=attempt.port,
                resolved=resolved,
            )
        if reason is None:
            return
        blocked = Blocked(
            timeutil.now(),
            attempt.protocol,
            str(attempt.destination or "ipv6"),
            attempt.port,
            reason,
        )
        log.info(
            "egress_blocked",
            vm=vm_network.vm_name,
            protocol=blocked.kind,
            destination=blocked.destination,
            port=blocked.port,
            reason=reason,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._count, vm_network.vm_name, blocked)
