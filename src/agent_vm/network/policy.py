"""What a sandbox may reach on the network, as data.

The same model is rendered into the libvirt nwfilter that enforces it (``nwfilter.py``),
used by the resolver to answer or refuse names (``resolver.py``) and used to classify
observed connection attempts as blocked (``observer.py``), so the three cannot disagree.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent_vm.models import Model

DEFAULT_TCP_PORTS = (80, 443, 22, 9418)  # HTTP, HTTPS, SSH (git), git://
DOMAIN_PATTERN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


class EgressPolicy(Model):
    """Egress rules of one sandbox.

    ``allow_domains``: None means any destination (ports still apply). A list restricts
    TCP to addresses that the project's resolver returned for those names: ``pypi.org``
    matches that name only, ``*.github.com`` matches its subdomains (not github.com).
    """

    model_config = ConfigDict(frozen=True)

    tcp_ports: tuple[int, ...] = Field(default=DEFAULT_TCP_PORTS, validate_default=True)
    allow_domains: tuple[str, ...] | None = None
    allow_ipv6: bool = False

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
        cleaned = []
        for domain in domains:
            name = domain.strip().lower().rstrip(".")
            if not DOMAIN_PATTERN.match(name):
                raise ValueError(f"not a domain name or *.domain pattern: {domain!r}")
            cleaned.append(name)
        return tuple(sorted(set(cleaned)))

    @model_validator(mode="after")
    def _ipv6_without_allowlist(self) -> EgressPolicy:
        if self.allow_ipv6 and self.allow_domains is not None:
            raise ValueError(
                "a domain allowlist is enforced for IPv4 only: use allow_ipv6=False with it"
            )
        return self

    def allows_name(self, name: str) -> bool:
        """May the sandbox resolve ``name``?"""
        if self.allow_domains is None:
            return True
        name = name.lower().rstrip(".")
        for pattern in self.allow_domains:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]):
                    return True
            elif name == pattern:
                return True
        return False


class Addressing(BaseModel):
    """Where a sandbox sits on the project's network."""

    model_config = ConfigDict(frozen=True)

    mac: str
    address: IPv4Address
    network: IPv4Network
    gateway: IPv4Address
    host_addresses: tuple[IPv4Address, ...] = ()  # every address of the host itself
    host_addresses6: tuple[IPv6Address, ...] = ()  # the host's global IPv6 addresses

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
    if policy.allow_domains is not None and not resolved:
        return "address not resolved from an allowed name"
    return None
