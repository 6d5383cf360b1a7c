"""The ipsets the layer-3 filter (``l3filter.py``) matches on.

Shared by every sandbox on the host:

* ``agentvm-local`` (hash:net): gateway, host addresses, sandbox subnet: never reachable
  (DNS and DHCP to the gateway are let through before it);
* ``agentvm-nonpublic`` (hash:net): special-purpose ranges and the host's routed subnets;
* ``agentvm-gateways`` (hash:ip): where DNS and DHCP may go on the host.

Per sandbox (``hash:net,port``, (destination, tcp:port) pairs):

* ``agentvm-<vm>``: what it may open connections to. Without an allowlist that is
  0.0.0.0/1 and 128.0.0.0/1 (hash:net refuses /0) per allowed port, permanently; with
  one, the resolver adds (address/32, tcp:port) pairs with the answer's TTL;
* ``agvcidr-<vm>``: its ``allow_cidrs`` per allowed port (checked before the non-public
  drop, so that a named range is reachable).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from ipaddress import IPv4Address

from agent_vm.network.tools import run_tool, succeeds

DEFAULT_TIMEOUT = 3600
PREFIX = "agentvm-"
CIDR_PREFIX = "agvcidr-"
TWIN_PREFIX = "agvtwin"
LOCAL_SET = "agentvm-local"
NONPUBLIC_SET = "agentvm-nonpublic"
GATEWAYS_SET = "agentvm-gateways"
SHARED_SETS = (LOCAL_SET, NONPUBLIC_SET, GATEWAYS_SET)
MAX_NAME = 31
_TWINS = threading.Lock()  # twin sets are named per process, so threads take turns


def set_name(vm_name: str) -> str:
    """ipset names are limited to 31 characters; VM names end in a unique hex id."""
    return f"{PREFIX}{vm_name[-20:]}"


def cidr_set_name(vm_name: str) -> str:
    return f"{CIDR_PREFIX}{vm_name[-20:]}"


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


def ensure_shared(name: str, networks: Iterable[str], kind: str = "hash:net") -> None:
    """A shared set (local, non-public, gateways), replaced atomically so that what the
    host no longer has drops out."""
    create = f"{kind} family inet"
    lines = [f"add {{twin}} {network} -exist" for network in networks]
    with _TWINS:  # concurrent attaches of one process would share the twin set
        _refill({name: (create, lines)})


EVERYWHERE = ("0.0.0.0/1", "128.0.0.0/1")  # hash:net refuses /0
SANDBOX_SET = f"hash:net,port family inet timeout {DEFAULT_TIMEOUT}"


def fill(sets: dict[str, tuple[Iterable[int], Iterable[str]]]) -> None:
    """Reset sandbox sets, ``{name: (ports, networks)}``, to (network, tcp:port) for every
    network and port, as permanent entries (the resolver adds expiring ones to
    allowlisted sandboxes' sets). Each is replaced atomically by swapping in a filled
    twin, and all of it is one ``ipset restore`` (one process: ~2 ms, not ~20)."""
    work = {
        name: (
            SANDBOX_SET,
            [
                f"add {{twin}} {network},tcp:{port} timeout 0 -exist"
                for network in networks
                for port in ports
            ],
        )
        for name, (ports, networks) in sets.items()
    }
    with _TWINS:
        _refill(work)


def _refill(sets: dict[str, tuple[str, list[str]]]) -> None:
    script = []
    for name, (create, adds) in sets.items():
        twin = twin_name(name)
        script += [
            f"create {name} {create} -exist",
            f"create {twin} {create} -exist",
            f"flush {twin}",
            *(line.format(twin=twin) for line in adds),
            f"swap {twin} {name}",
            f"destroy {twin}",
        ]
    _ipset("-exist", "restore", stdin="\n".join(script) + "\n")


def destroy(*names: str) -> None:
    """Destroy the sets that exist (one process to list, one to destroy)."""
    present = set(_ipset("list", "-n").split())
    doomed = [name for name in names if name in present]
    if doomed:
        _ipset("restore", stdin="".join(f"destroy {name}\n" for name in doomed))


def exists(name: str) -> bool:
    return succeeds(["ipset", "list", "-n", name])


def names() -> list[str]:
    prefixes = (PREFIX, CIDR_PREFIX, TWIN_PREFIX)
    return [n for n in _ipset("list", "-n").split() if n.startswith(prefixes)]


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
