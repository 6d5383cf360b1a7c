"""The per-process owner of sandbox networking: network, addresses, filters, DNS, counters.

One ``NetworkGuard`` (held by the runtime) serves every VM a process starts in
NAT_FILTERED mode:

* ``start()``: the project's libvirt network (created or verified), br_netfilter, the
  shared parts of both filter layers and the shared sets (host, non-public ranges), the
  network pieces of crashed processes' sandboxes removed, the resolver on the gateway,
  the blocked-attempt observer, and the reconciler's watch;
* ``attach(vm, policy)`` before the domain is defined: MAC, reserved address, then the
  pieces of ``vmnet.py`` (a few ms: no libvirt nwfilter is involved); ``detach`` after
  the domain is gone removes them and the VM's blocked-attempt counters;
* ``set_policy`` on a running VM: sets swapped and both layers' chains replaced, each
  atomically; the record rewritten.

Reconciliation lives in ``reconcile.py``, accounting of blocked attempts in
``blocked.py``; this module only wires them to the VMs it attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network

from agent_vm.asyncutil import finish_in_thread, finish_then_undo
from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import NetworkError
from agent_vm.host.netfilter import ensure_bridge_netfilter
from agent_vm.logs import get_logger
from agent_vm.network import ipsets, l2filter, l3filter
from agent_vm.network.blocked import BlockedLog
from agent_vm.network.egress import EgressProxy, ProxyEvent
from agent_vm.network.hostnet import (
    host_addresses,
    host_addresses6,
    nonpublic_networks,
    random_mac,
)
from agent_vm.network.libvirt_net import NetworkDefinition, ensure_network
from agent_vm.network.observer import KernelLogFollower, install
from agent_vm.network.orphans import reap_network
from agent_vm.network.policy import Addressing, Blocked, EgressPolicy
from agent_vm.network.reconcile import Reconciler
from agent_vm.network.resolver import Resolver, upstreams_from_resolv_conf
from agent_vm.network.sandboxes import sandbox_directory
from agent_vm.network.taps import TAP_PREFIX, tap_name
from agent_vm.network.vmnet import VMNetwork, fill_sets, remove_pieces, write_pieces, write_rules
from agent_vm.secrets import Secret

log = get_logger(__name__)

__all__ = ["Blocked", "NetworkGuard", "VMNetwork"]


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
        self.directory = sandbox_directory(settings.network_name)
        self._upstreams = upstreams
        self._vms: dict[str, VMNetwork] = {}
        self._by_tap: dict[str, VMNetwork] = {}
        self.blocked_log = BlockedLog(self._by_tap.get)
        self.reconciler = Reconciler(
            connection,
            self.definition,
            self.directory,
            self._vms,
            self.refresh_shared,
            lambda: self._shared,
        )
        self._resolver: Resolver | None = None
        self.proxy: EgressProxy | None = None
        self._secrets: dict[str, Mapping[str, Secret]] = {}  # memory only, never written
        self.proxy_listeners: list[Callable[[ProxyEvent], None]] = []
        self._follower: KernelLogFollower | None = None
        self._watch: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._shared_lock = threading.Lock()
        self._shared: tuple[tuple[IPv4Network, ...], tuple[IPv4Network, ...]] | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self.blocked_log.bind(asyncio.get_running_loop())
            await asyncio.to_thread(self._prepare_host)
            upstreams = (
                self._upstreams or self.settings.dns_upstreams() or upstreams_from_resolv_conf()
            )
            self._resolver = Resolver(
                self.definition.gateway,
                self.directory,
                upstreams,
                on_blocked=self.blocked_log.name_refused,
            )
            await self._resolver.start()
            if self.settings.egress_proxy:
                self.proxy = EgressProxy(
                    self.settings, self.definition.gateway, upstreams, self._proxy_event
                )
                await self.proxy.start()
            self._follower = KernelLogFollower(self.blocked_log.observed)
            self._follower.start()
            self._watch = asyncio.create_task(self.reconciler.watch(), name="network-guard-watch")
            self._started = True

    def _prepare_host(self) -> None:
        ensure_bridge_netfilter()
        ensure_network(self.connection, self.definition)
        install(TAP_PREFIX, self.definition.gateway)
        self.refresh_shared()
        l3filter.ensure_base(TAP_PREFIX)
        reap_network(self.connection, self.directory)

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
            self.proxy = None
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None
        self._started = False

    # ------------------------------------------------------------------ per VM

    async def attach(self, vm_name: str, policy: EgressPolicy | None = None) -> VMNetwork:
        """Address, ipsets, both layers' chains and record for a VM about to be defined.
        On failure (or cancellation) nothing of it stays."""
        await self.start()
        chosen = policy or EgressPolicy()

        async def release(made: VMNetwork) -> None:
            self._track(made)
            await self.detach(vm_name)

        vm_network = await finish_then_undo(lambda: self._reserve(vm_name, chosen), release)
        self._track(vm_network)  # from here on detach() finds and removes it
        self.reconciler.hold(vm_network.tap)
        try:
            await finish_in_thread(write_pieces, self.directory, vm_network)
        except BaseException:
            await asyncio.shield(self.detach(vm_name))
            raise
        self.reconciler.release(vm_network.tap)
        if self.proxy is not None:
            try:
                await self.proxy.configure(vm_network, {})
            except BaseException:
                await asyncio.shield(self.detach(vm_name))
                raise
        return vm_network

    def _reserve(self, vm_name: str, policy: EgressPolicy) -> VMNetwork:
        addresses, nonpublic = self.refresh_shared()  # the host may have gained some
        address = self.directory.reserve(self.definition.static_addresses(), vm_name)
        return VMNetwork(
            vm_name=vm_name,
            addressing=Addressing(
                mac=random_mac(),
                address=address,
                network=self.definition.subnet,
                gateway=self.definition.gateway,
                host_addresses=addresses,
                host_addresses6=host_addresses6(),
                nonpublic=nonpublic,
            ),
            policy=policy,
            ipset=ipsets.set_name(vm_name),
            tap=tap_name(vm_name),
            network=self.definition.name,
        )

    def closing(self, vm_name: str) -> None:
        """The VM is about to be destroyed: its kernel rules will vanish, on purpose."""
        vm_network = self._vms.get(vm_name)
        if vm_network is not None:
            self.reconciler.hold(vm_network.tap)

    async def detach(self, vm_name: str) -> list[str]:
        """Remove what attach made (call after the domain is destroyed and undefined);
        returns the pieces that could not be removed (logged; ``agent-vm gc`` retries)."""
        vm_network = self._vms.pop(vm_name, None)
        if vm_network is None:
            return []
        self._by_tap.pop(vm_network.tap, None)
        self._secrets.pop(vm_name, None)
        if self.proxy is not None:
            with contextlib.suppress(NetworkError):
                await asyncio.shield(self.proxy.forget(vm_network))
        self.reconciler.release(vm_network.tap)
        self.blocked_log.drop(vm_name)
        return await asyncio.shield(asyncio.to_thread(remove_pieces, self.directory, vm_network))

    async def set_policy(self, vm_name: str, policy: EgressPolicy) -> None:
        """Change a running VM's policy; in force when this returns."""
        vm_network = self._vms.get(vm_name)
        if vm_network is None:
            raise NetworkError(f"{vm_name} has no network managed by this process")
        vm_network.policy = policy
        await asyncio.to_thread(self.directory.write, vm_network.record())
        await asyncio.to_thread(fill_sets, vm_network)
        await asyncio.to_thread(write_rules, vm_network)
        if self.proxy is not None:
            await self.proxy.configure(vm_network, self._secrets.get(vm_name, {}))
        log.info("egress_policy_changed", vm=vm_name, policy=policy.model_dump())

    async def set_secrets(self, vm_name: str, secrets: Mapping[str, Secret]) -> None:
        """The secrets the proxy injects for this VM (replacing any it had)."""
        vm_network = self._vms.get(vm_name)
        if vm_network is None or self.proxy is None:
            raise NetworkError(
                f"{vm_name} has no egress proxy to inject secrets",
                hint="the proxy is off (AGENT_VM_EGRESS_PROXY=0) or the VM is not on NAT",
            )
        self._secrets[vm_name] = dict(secrets)
        await self.proxy.configure(vm_network, secrets)

    def _proxy_event(self, event: ProxyEvent) -> None:
        """From the proxy's reader (on the event loop): refusals are blocked attempts."""
        if event.kind == "denied":
            data = event.data
            port = int(data.get("port") or 0)
            kind = "https" if data.get("kind") == "tls" or port == 443 else "http"
            self.blocked_log.name_refused(
                event.vm, kind, str(data.get("host")), port, str(data.get("reason"))
            )
        for listener in self.proxy_listeners:
            listener(event)

    async def reconcile(self, vm_name: str) -> list[str]:
        return await self.reconciler.reconcile(vm_name)

    def enforcement_problems(self, vm_name: str) -> list[str]:
        """What is missing from the kernel to enforce a VM's policy; blocking."""
        return self.reconciler.problems(self._vms[vm_name])

    def attached(self) -> list[str]:
        """Names of the VMs this guard holds network pieces for."""
        return list(self._vms)

    def policy(self, vm_name: str) -> EgressPolicy | None:
        vm_network = self._vms.get(vm_name)
        return vm_network.policy if vm_network else None

    def blocked(self, vm_name: str) -> list[Blocked]:
        return self.blocked_log.recent(vm_name)

    def blocked_count(self, vm_name: str) -> int:
        return self.blocked_log.total(vm_name)

    # ------------------------------------------------------------------ internals

    def refresh_shared(
        self, *, force: bool = False
    ) -> tuple[tuple[IPv4Address, ...], tuple[IPv4Network, ...]]:
        """The shared sets of both layers from the host as it is now (blocking); returns
        the host's addresses and the non-public ranges. Local: gateway, host addresses,
        sandbox subnet; non-public:
        special-purpose ranges and the host's routed subnets. Written only when they
        changed since this process last wrote them (the reconciler checks the kernel's
        copy and passes ``force`` when it differs)."""
        subnet = self.definition.subnet
        addresses = host_addresses()
        local = (*(IPv4Network(f"{a}/32") for a in (self.definition.gateway, *addresses)), subnet)
        nonpublic = nonpublic_networks(subnet, self.settings.public_subnets(), addresses)
        with self._shared_lock:
            if force or self._shared != (local, nonpublic):
                ipsets.ensure_shared(ipsets.LOCAL_SET, [str(n) for n in local])
                ipsets.ensure_shared(ipsets.NONPUBLIC_SET, [str(n) for n in nonpublic])
                gateway = str(self.definition.gateway)
                ipsets.ensure_shared(ipsets.GATEWAYS_SET, [gateway], "hash:ip")
                l2filter.ensure_base(TAP_PREFIX, local, nonpublic)
                self._shared = (local, nonpublic)
        return addresses, nonpublic

    def _track(self, vm_network: VMNetwork) -> None:
        self._vms[vm_network.vm_name] = vm_network
        self._by_tap[vm_network.tap] = vm_network
        self.blocked_log.track(vm_network.vm_name)
