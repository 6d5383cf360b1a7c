"""The ipsets the egress filters match on.

* the shared local set (``hash:net``): gateway, host addresses, sandbox subnet;
* one ``hash:net,port`` set per sandbox: (destination, tcp:port) pairs it may open
  connections to. Without an allowlist that is 0.0.0.0/1 and 128.0.0.0/1 (hash:net
  refuses /0) for each allowed port, permanently; with one, the resolver adds
  (address/32, tcp:port) pairs with the answer's TTL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from ipaddress import IPv4Address

from agent_vm.network.tools import run_tool, succeeds

DEFAULT_TIMEOUT = 3600
PREFIX = "agentvm-"
TWIN_PREFIX = "agvtwin"
MAX_NAME = 31
_TWINS = threading.Lock()  # twin sets are named per process, so threads take turns


def set_name(vm_name: str) -> str:
    """ipset names are limited to 31 characters; VM names end in a unique hex id."""
    return f"{PREFIX}{vm_name[-20:]}"


def _ipset(*args: str, stdin: str | None = None) -> str:
    return run_tool(["ipset", *args], stdin=stdin)


def twin_name(name: str) -> str:
    """The temporary set a set is refilled in: per process, ending like ``name``."""
    head = f"{TWIN_PREFIX}{os.getpid()}-"
    return head + name.removeprefix(PREFIX)[-(MAX_NAME - len(head)) :]


def twin_owner(name: str) -> int | None:
    """The pid that made a twin set (None if ``name`` is not one)."""
    pid = name.removeprefix(TWIN_PREFIX).split("-", 1)[0]
    return int(pid) if name.startswith(TWIN_PREFIX) and pid.isdigit() else None


def create(name: str) -> None:
    """A sandbox's (destination net, tcp:port) set; entries expire unless added with 0."""
    _ipset(
        "create", name, "hash:net,port", "family", "inet",
        "timeout", str(DEFAULT_TIMEOUT), "-exist",
    )  # fmt: skip


def ensure_local(name: str, networks: Iterable[str]) -> None:
    """The shared set of destinations no sandbox may reach (besides DNS/DHCP), replaced
    atomically so that addresses the host no longer has drop out."""
    with _TWINS:  # concurrent attaches of one process would share the twin set
        _ensure_local(name, networks)


def _ensure_local(name: str, networks: Iterable[str]) -> None:
    twin = twin_name(name)
    _ipset("create", name, "hash:net", "family", "inet", "-exist")
    _ipset("create", twin, "hash:net", "family", "inet", "-exist")
    lines = [f"flush {twin}", *(f"add {twin} {network} -exist" for network in networks)]
    _ipset("-exist", "restore", stdin="\n".join(lines) + "\n")
    _ipset("swap", twin, name)
    _ipset("destroy", twin)


def fill(name: str, ports: Iterable[int], allowlist: bool) -> None:
    """Reset a sandbox set for its policy: without an allowlist every destination on the
    allowed ports (two /1 halves; hash:net refuses /0), with one nothing until the
    resolver adds addresses. Replaced atomically by swapping in a filled twin set."""
    with _TWINS:
        _fill(name, ports, allowlist)


def _fill(name: str, ports: Iterable[int], allowlist: bool) -> None:
    twin = twin_name(name)
    _ipset(
        "create", twin, "hash:net,port", "family", "inet",
        "timeout", str(DEFAULT_TIMEOUT), "-exist",
    )  # fmt: skip
    _ipset("flush", twin)
    if not allowlist:
        lines = [
            f"add {twin} {half},tcp:{port} timeout 0 -exist"
            for half in ("0.0.0.0/1", "128.0.0.0/1")
            for port in ports
        ]
        if lines:
            _ipset("-exist", "restore", stdin="\n".join(lines) + "\n")
    _ipset("swap", twin, name)
    _ipset("destroy", twin)


def destroy(name: str) -> None:
    if exists(name):
        _ipset("destroy", name)


def flush(name: str) -> None:
    _ipset("flush", name)


def exists(name: str) -> bool:
    return succeeds(["ipset", "list", "-n", name])


def names() -> list[str]:
    return [n for n in _ipset("list", "-n").split() if n.startswith((PREFIX, TWIN_PREFIX))]


def allow(name: str, addresses: Iterable[IPv4Address], ports: Iterable[int], timeout: int) -> None:
    """Add every (address, tcp:port) pair in one ipset invocation."""
    lines = [
        f"add {name} {address}/32,tcp:{port} timeout {timeout} -exist"
        for address in addresses
        for port in ports
    ]
    if lines:
        _ipset("-exist", "restore", stdin="\n".join(lines) + "\n")


def contains(name: str, address: IPv4Address, port: int) -> bool:
    return succeeds(["ipset", "test", name, f"{address},tcp:{port}"])
