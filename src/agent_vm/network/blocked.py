"""Blocked-attempt accounting: what each sandbox tried and was refused, and why.

Attempts come from two places: the kernel-log observer (connections, datagrams, IPv6)
and the resolver (names outside an allowlist). Each is classified with the same policy
model the filter is rendered from, counted per VM, logged as ``egress_blocked`` and kept
(the last ``RECENT`` per VM). A VM's counters go when the VM is detached, so a host that
runs sandboxes for months does not keep one counter per sandbox it ever ran.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from agent_vm import timeutil
from agent_vm.logs import get_logger
from agent_vm.network import ipsets
from agent_vm.network.observer import Attempt
from agent_vm.network.policy import Blocked, verdict
from agent_vm.network.vmnet import VMNetwork

log = get_logger(__name__)

RECENT = 1000


@dataclass
class _Counters:
    total: int = 0
    recent: deque[Blocked] = field(default_factory=lambda: deque(maxlen=RECENT))


def classify(vm_network: VMNetwork, attempt: Attempt) -> str | None:
    """Why ``attempt`` was blocked, or None if the policy allows it (blocking: may ask
    ipset whether an allowlisted destination was resolved)."""
    if attempt.protocol == "ipv6":
        return None if vm_network.policy.allow_ipv6 else "IPv6 not allowed"
    if attempt.destination is None:
        return "malformed"
    if attempt.source is not None and attempt.source not in (
        vm_network.addressing.address,
        IPv4Address(0),  # a DHCP client before it has an address
    ):
        return f"spoofed source address {attempt.source}"
    resolved = (
        vm_network.policy.allow_domains is not None
        and attempt.port is not None
        and ipsets.contains(vm_network.ipset, attempt.destination, attempt.port)
    )
    return verdict(
        vm_network.policy,
        vm_network.addressing,
        protocol=attempt.protocol,
        destination=attempt.destination,
        port=attempt.port,
        resolved=resolved,
    )


class BlockedLog:
    """Per-VM counters of blocked attempts; updated on the event loop only."""

    def __init__(self, lookup_tap: Callable[[str], VMNetwork | None]) -> None:
        self._lookup_tap = lookup_tap
        self._counters: dict[str, _Counters] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def track(self, vm_name: str) -> None:
        self._counters.setdefault(vm_name, _Counters())

    def drop(self, vm_name: str) -> None:
        self._counters.pop(vm_name, None)

    def recent(self, vm_name: str) -> list[Blocked]:
        counters = self._counters.get(vm_name)
        return list(counters.recent) if counters is not None else []

    def total(self, vm_name: str) -> int:
        counters = self._counters.get(vm_name)
        return counters.total if counters is not None else 0

    def _count(self, vm_name: str, blocked: Blocked) -> None:
        counters = self._counters.get(vm_name)
        if counters is None:
            return  # detached meanwhile
        counters.total += 1
        counters.recent.append(blocked)

    def name_refused(
        self, vm_name: str, kind: str, destination: str, port: int, reason: str = "name not allowed"
    ) -> None:
        """From the resolver (on the event loop): a name outside the allowlist, or an
        answer with only non-public addresses."""
        self._count(vm_name, Blocked(timeutil.now(), kind, destination, port, reason))

    def observed(self, attempt: Attempt) -> None:
        """From the kernel-log thread: classify and count attempts of our own VMs."""
        vm_network = self._lookup_tap(attempt.tap)
        if vm_network is None:
            return
        reason = classify(vm_network, attempt)
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
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._count, vm_network.vm_name, blocked)
