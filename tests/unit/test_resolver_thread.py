"""The sandbox resolver answers while its process's own event loop is blocked.

Every agent-vm process binds the gateway's port 53 with SO_REUSEPORT and the kernel hands
a query to any one of them; a process whose loop sat idle (a test runner between async
tests) once swallowed other processes' queries, and their guests saw "Temporary failure
in name resolution". Loopback only, a refusal answered locally (no upstream is asked).
"""

from __future__ import annotations

import socket
import threading
import time
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import cast

from dnslib import RCODE, DNSRecord

from agent_vm.network.policy import EgressPolicy
from agent_vm.network.resolver import Resolver
from agent_vm.network.sandboxes import SandboxDirectory


class OneSandbox:
    def lookup(self, address: IPv4Address) -> object:
        return SimpleNamespace(vm="vm-1", policy=EgressPolicy(allow_domains=("ok.test",)))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_queries_are_answered_while_the_callers_loop_is_blocked() -> None:
    refused: list[tuple[object, ...]] = []
    resolver = Resolver(
        IPv4Address("127.0.0.1"), cast(SandboxDirectory, OneSandbox()), [],
        port=_free_udp_port(), on_blocked=lambda *args: refused.append(args),
    )  # fmt: skip
    await resolver.start()
    answers: list[int] = []

    def ask() -> None:
        query = DNSRecord.question("blocked.test").pack()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(2.0)
            client.sendto(query, ("127.0.0.1", resolver.port))
            answers.append(DNSRecord.parse(client.recv(4096)).header.rcode)

    try:
        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(2.5)  # noqa: ASYNC251  (the point: this loop is blocked, like an idle runner)
        asker.join()
        assert answers == [RCODE.NXDOMAIN]
    finally:
        await resolver.close()
    assert refused == [("vm-1", "dns", "blocked.test", 53)]  # counted on this loop, later
