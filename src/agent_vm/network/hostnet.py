"""The host as a sandbox must see it: its own addresses (unreachable) and fresh MACs."""

from __future__ import annotations

import json
import os
import subprocess
from ipaddress import IPv4Address, IPv6Address, IPv6Network

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
