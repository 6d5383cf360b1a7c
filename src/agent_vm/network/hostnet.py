"""The host as a sandbox must see it: its own addresses and routes (unreachable), MACs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, collapse_addresses

from agent_vm.network.policy import NONPUBLIC_V4

GLOBAL_UNICAST = IPv6Network("2000::/3")


def random_mac() -> str:
    """A locally chosen MAC in QEMU's 52:54:00 range."""
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


def route_subnets(family: str = "-4") -> list[dict[str, str]]:
    out = subprocess.run(
        ["ip", "-j", family, "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        routes: list[dict[str, str]] = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return routes


def nonpublic_networks(
    own_subnet: IPv4Network,
    public: Iterable[IPv4Network] = (),
    addresses: Iterable[IPv4Address] | None = None,
) -> tuple[IPv4Network, ...]:
    """What a sandbox must never reach as "the internet": the special-purpose ranges,
    every host address, and the subnets of the host's routes that are not the default
    route (the LAN, VPNs, container bridges, provider networks), except those the
    operator declared ``public`` (AGENT_VM_NETWORK_PUBLIC_SUBNETS, e.g. a test network).
    The sandbox subnet itself is handled as local (host and neighbours), not here."""
    public = list(public)
    networks: list[IPv4Network] = list(NONPUBLIC_V4)
    networks += [IPv4Network(f"{a}/32") for a in (addresses or host_addresses())]
    for route in route_subnets("-4"):
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("type") in ("local", "broadcast"):
            continue
        try:
            subnet = IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if subnet.prefixlen == 0 or subnet.subnet_of(own_subnet) or subnet == own_subnet:
            continue
        if any(subnet.subnet_of(p) for p in public):
            continue
        networks.append(subnet)
    return tuple(collapse_addresses(networks))
