"""Isolation from the host's surroundings: LAN, metadata service, the host's own routes.

Every destination here is a test host this module creates in a network namespace,
reached through a host route into that namespace: 169.254.77.77 stands for a cloud
metadata service (169.254.169.254 itself is never touched, so the host's real route to it
stays as it is), 192.168.213.10 for a machine on the host's LAN, 203.0.113.10 for a
public-looking subnet the host routes somewhere other than its default route. The
internet is the session's test host at 198.51.100.10, declared public in conftest.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Interface
from typing import Any

import pytest

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.guest_probe import parse, probe_code
from tests.integration.helpers import eventually
from tests.integration.testnet import TestHost

METADATA_IP = "169.254.77.77"
LAN_IP = "192.168.213.10"
ROUTED_IP = "203.0.113.10"


def _unused_by_the_host(network: str) -> None:
    routes = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    if any(route.get("dst", "").startswith(network) for route in json.loads(routes or "[]")):
        pytest.fail(f"{network} is in use on this host: the test host cannot stand in for it")


@pytest.fixture(scope="module")
def outside(test_host: TestHost) -> Iterator[dict[str, TestHost]]:
    """The three test hosts, each behind a host route into its namespace."""
    specs = {
        "metadata": ("agvtest3", "169.254.77.1/24", f"{METADATA_IP}/24", "169.254.77."),
        "lan": ("agvtest4", "192.168.213.1/24", f"{LAN_IP}/24", "192.168.213."),
        "routed": ("agvtest5", "203.0.113.1/24", f"{ROUTED_IP}/24", "203.0.113."),
    }
    hosts: dict[str, TestHost] = {}
    try:
        for key, (name, host_side, address, prefix) in specs.items():
            _unused_by_the_host(prefix)
            hosts[key] = TestHost(
                name=name, host_side=IPv4Interface(host_side), addresses=(IPv4Interface(address),)
            )
            hosts[key].start()
        yield hosts
    finally:
        for host in hosts.values():
            host.stop()


@asynccontextmanager
async def sandbox(runtime: Runtime, image: Image, policy: EgressPolicy) -> AsyncIterator[RunningVM]:
    vm = await runtime.vm(image=image, policy=policy)
    try:
        yield vm
    finally:
        await vm.close()


async def probe(
    executor: AgentExecutor, vm: RunningVM, probes: dict[str, list[Any]]
) -> dict[str, str]:
    result = await executor.execute(vm, code=probe_code(probes, 2.0), timeout=60)
    assert result.exit_code == 0, result.stderr
    return parse(result.stdout)


def blocked(outcome: str) -> bool:
    return outcome in ("timeout", "no reply") or outcome.startswith("error:")


WEB = {
    "internet": ["http", TEST_HOST_IP, 80],
    "metadata": ["http", METADATA_IP, 80],
    "lan": ["http", LAN_IP, 80],
    "routed": ["http", ROUTED_IP, 80],
}


async def test_lan_metadata_and_routed_subnets_are_refused_by_default(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard,
    outside: dict[str, TestHost],
) -> None:  # fmt: skip
    async with sandbox(runtime, image, EgressPolicy()) as vm:
        out = await probe(executor, vm, WEB)
        reasons = {"metadata": METADATA_IP, "lan": LAN_IP, "routed": ROUTED_IP}

        def counted() -> set[str]:
            return {
                b.destination
                for b in guard.blocked(vm.name)
                if b.reason == "non-public destination"
            }

        await eventually(lambda: set(reasons.values()) <= counted(), 5, f"blocks in {counted()}")
    assert out["internet"].startswith("ok:"), out  # the network works: the control
    for key in reasons:
        assert blocked(out[key]), (key, out)


async def test_allow_cidrs_opens_exactly_the_named_range(
    runtime: Runtime, image: Image, executor: AgentExecutor, outside: dict[str, TestHost]
) -> None:
    policy = EgressPolicy(allow_cidrs=("169.254.77.0/24", "203.0.113.0/24"), tcp_ports=(80,))
    async with sandbox(runtime, image, policy) as vm:
        out = await probe(executor, vm, {**WEB, "metadata_8080": ["http", METADATA_IP, 8080]})
    assert out["metadata"] == f"ok:hello from port 80 to {METADATA_IP.rsplit('.', 1)[0]}.1", out
    assert out["routed"].startswith("ok:"), out
    assert blocked(out["lan"]), out  # not named: still refused
    assert blocked(out["metadata_8080"]), out  # the policy's ports still apply


async def test_allowlisted_names_with_non_public_answers_are_refused(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard,
    outside: dict[str, TestHost],
) -> None:  # fmt: skip
    """DNS rebinding: an allowed name that resolves to the metadata service or the LAN."""
    names = {
        "web": ["resolve", "web.allowed.test"],
        "meta": ["resolve", "meta.allowed.test"],
        "lan": ["resolve", "lan.allowed.test"],
    }
    allowlist = EgressPolicy(allow_domains=("*.allowed.test",))
    async with sandbox(runtime, image, allowlist) as vm:
        refused = await probe(executor, vm, names)
        reasons = {(b.destination, b.reason) for b in guard.blocked(vm.name)}
    assert refused["web"] == f"ok:{TEST_HOST_IP}", refused
    assert refused["meta"].startswith("error:") and refused["lan"].startswith("error:"), refused
    assert ("meta.allowed.test", "non-public answer") in reasons
    opened = EgressPolicy(allow_domains=("*.allowed.test",), allow_cidrs=("169.254.77.0/24",))
    async with sandbox(runtime, image, opened) as vm:
        allowed = await probe(executor, vm, {**names, "get": ["http", METADATA_IP, 80]})
    assert allowed["meta"] == f"ok:{METADATA_IP}", allowed  # named range: handed out
    assert allowed["get"].startswith("ok:"), allowed
    assert allowed["lan"].startswith("error:"), allowed
