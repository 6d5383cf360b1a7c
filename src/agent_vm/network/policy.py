"""What a sandbox may reach on the network, as data.

The same model is rendered into the libvirt nwfilter that enforces it (``nwfilter.py``),
used by the resolver to answer or refuse names (``resolver.py``) and used to classify
observed connection attempts as blocked (``observer.py``), so the three cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent_vm.models import Model
from agent_vm.names import clean_pattern, matches

DEFAULT_TCP_PORTS = (80, 443, 22, 9418)  # HTTP, HTTPS, SSH (git), git://
# Destinations that are never "the internet" (RFC 6890 special-purpose ranges a sandbox
# could use to reach the host's LAN, a cloud's metadata service or the host itself).
# The documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24) are not among them.
NONPUBLIC_V4 = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
        "240.0.0.0/4",
    )
)  # fmt: skip
NONPUBLIC_V6 = tuple(
    IPv6Network(n) for n in ("::1/128", "::/128", "fe80::/10", "fc00::/7", "ff00::/8")
)


class EgressPolicy(Model):
    """Egress rules of one sandbox.

    ``allow_domains``: None means any destination (ports still apply). A list restricts
    TCP to addresses that the project's resolver returned for those names: ``pypi.org``
    matches that name only, ``*.github.com`` matches its subdomains (not github.com).
    ``allow_cidrs``: non-public IPv4 ranges opened deliberately (a company proxy, a
    package mirror on the LAN), on the allowed TCP ports; everything non-public (private,
    link-local, loopback, CGNAT, multicast, the host's other routes) is refused otherwise.
    Never the host itself or other sandboxes.
    """

    model_config = ConfigDict(frozen=True)

    tcp_ports: tuple[int, ...] = Field(default=DEFAULT_TCP_PORTS, validate_default=True)
    allow_domains: tuple[str, ...] | None = None
    allow_ipv6: bool = False
    allow_cidrs: tuple[IPv4Network, ...] = ()

    @field_validator("tcp_ports")
    @classmethod
    def _ports(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        return tuple(sorted(set(ports)))

    @field_validator("allow_domains")
    @classmethod
    def _domains(cls, domains: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if domains is None:
            return None
        return tuple(sorted({clean_pattern(domain) for domain in domains}))

    @field_validator("allow_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, cidrs: object) -> tuple[IPv4Network, ...]:
        if isinstance(cidrs, str):
            cidrs = (cidrs,)
        if not isinstance(cidrs, (list, tuple)):
            raise ValueError("allow_cidrs must be a list of IPv4 networks such as 10.1.2.0/24")
        networks = []
        for cidr in cidrs:
            try:
                networks.append(IPv4Network(cidr, strict=False))
            except ValueError:
                raise ValueError(
                    f"{cidr!r} is not an IPv4 network (allow_cidrs is IPv4 only, e.g. 10.1.2.0/24)"
                ) from None
        return tuple(sorted(set(networks)))

    def allows_cidr(self, destination: IPv4Address) -> bool:
        return any(destination in network for network in self.allow_cidrs)

    @model_validator(mode="after")
    def _ipv6_without_allowlist(self) -> EgressPolicy:
        if self.allow_ipv6 and self.allow_domains is not None:
            raise ValueError(
                "a domain allowlist is enforced for IPv4 only: use allow_ipv6=False with it"
            )
        return self

    def allows_name(self, name: str) -> bool:
        """May the sandbox resolve ``name``?"""
        return self.allow_domains is None or matches(self.allow_domains, name)


class Addressing(BaseModel):
    """Where a sandbox sits on the project's network."""

    model_config = ConfigDict(frozen=True)

    mac: str
    address: IPv4Address
    network: IPv4Network
    gateway: IPv4Address
    host_addresses: tuple[IPv4Address, ...] = ()  # every address of the host itself
    host_addresses6: tuple[IPv6Address, ...] = ()  # the host's global IPv6 addresses
    # non-public ranges: NONPUBLIC_V4 plus the subnets of the host's non-default routes
    nonpublic: tuple[IPv4Network, ...] = NONPUBLIC_V4

    def is_nonpublic(self, destination: IPv4Address) -> bool:
        return any(destination in network for network in self.nonpublic)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.network.prefixlen}"


def verdict(
    policy: EgressPolicy,
    addressing: Addressing,
    *,
    protocol: str,
    destination: IPv4Address,
    port: int | None,
    resolved: bool,
) -> str | None:
    """Why a new outgoing attempt is blocked, or None if the filter lets it through.

    ``resolved``: whether ``destination`` is in the sandbox's resolved-address set
    (only consulted when the policy has a domain allowlist).
    """
    gateway = addressing.gateway
    if destination == gateway and protocol in ("udp", "tcp") and port == 53:
        return None
    if destination == gateway and protocol == "udp" and port == 67:
        return None
    if destination in addressing.host_addresses or destination == gateway:
        return "host service"
    if destination in addressing.network:
        return "other sandbox"
    if protocol != "tcp":
        return f"{protocol} not allowed"
    if port not in policy.tcp_ports:
        return f"port {port} not allowed"
    if policy.allows_cidr(destination):
        return None
    if addressing.is_nonpublic(destination):
        return "non-public destination"
    if policy.allow_domains is not None and not resolved:
        return "address not resolved from an allowed name"
    return None


@dataclass(frozen=True)
class Blocked:
    """One blocked attempt of a sandbox (what the filters and the resolver refused)."""

    at: datetime
    kind: str  # dns, tcp, udp, icmp, ipv6, ...
    destination: str
    port: int | None
    reason: str
