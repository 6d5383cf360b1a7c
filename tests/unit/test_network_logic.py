"""Pure network logic: policy validation, verdicts, filter rendering, log parsing.

What these rules do to real traffic is tested in tests/integration/test_network.py; here
only the data transformations that feed them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_vm.errors import ConfigError
from agent_vm.network import ipsets, l2filter, l3filter
from agent_vm.network.hostnet import nonpublic_networks
from agent_vm.network.libvirt_net import NetworkDefinition
from agent_vm.network.observer import PREFIX, parse
from agent_vm.network.policy import (
    DEFAULT_TCP_PORTS,
    NONPUBLIC_V4,
    Addressing,
    EgressPolicy,
    verdict,
)

ADDRESSING = Addressing(
    mac="52:54:00:12:34:56",
    address=IPv4Address("10.213.0.10"),
    network=IPv4Network("10.213.0.0/24"),
    gateway=IPv4Address("10.213.0.1"),
    host_addresses=(IPv4Address("192.0.2.5"),),
    host_addresses6=(IPv6Address("2001:db8::5"),),
)


def test_policy_defaults_are_the_seed_ports() -> None:
    policy = EgressPolicy()
    assert policy.tcp_ports == tuple(sorted(DEFAULT_TCP_PORTS))
    assert policy.allow_domains is None and policy.allow_ipv6 is False


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_policy_rejects_ports_out_of_range(port: int) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        EgressPolicy(tcp_ports=(port,))


@pytest.mark.parametrize("bad", ["", "exa mple.com", "*.", "a..b", "http://x.org", "**.x.org"])
def test_policy_rejects_what_is_not_a_domain(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a domain"):
        EgressPolicy(allow_domains=(bad,))


def test_policy_refuses_ipv6_with_an_allowlist() -> None:
    with pytest.raises(ConfigError, match="IPv4 only"):
        EgressPolicy(allow_domains=("pypi.org",), allow_ipv6=True)


def test_allowlist_matching() -> None:
    policy = EgressPolicy(allow_domains=("PyPI.org.", "*.github.com"))
    assert policy.allow_domains == ("*.github.com", "pypi.org")
    assert policy.allows_name("pypi.org") and policy.allows_name("PYPI.ORG.")
    assert policy.allows_name("api.github.com") and policy.allows_name("a.b.github.com")
    assert not policy.allows_name("github.com")  # *.x is subdomains only
    assert not policy.allows_name("evilgithub.com")
    assert not policy.allows_name("files.pypi.org")
    assert not policy.allows_name("pypi.org.evil.test")


@given(st.from_regex(r"[a-z]{1,10}(\.[a-z]{1,10}){0,3}", fullmatch=True))
def test_no_allowlist_allows_every_name_and_empty_allows_none(name: str) -> None:
    assert EgressPolicy().allows_name(name)
    assert not EgressPolicy(allow_domains=()).allows_name(name)


@pytest.mark.parametrize(
    ("protocol", "destination", "port", "resolved", "expected"),
    [
        ("udp", "10.213.0.1", 53, False, None),
        ("tcp", "10.213.0.1", 53, False, None),
        ("udp", "10.213.0.1", 67, False, None),
        ("tcp", "10.213.0.1", 22, False, "host service"),
        ("tcp", "192.0.2.5", 80, False, "host service"),
        ("tcp", "10.213.0.11", 80, False, "other sandbox"),
        ("udp", "198.51.100.10", 443, False, "udp not allowed"),
        ("icmp", "198.51.100.10", None, False, "icmp not allowed"),
        ("tcp", "198.51.100.10", 8080, False, "port 8080 not allowed"),
        ("tcp", "198.51.100.10", 443, False, None),
    ],
)
def test_verdict_without_allowlist(
    protocol: str, destination: str, port: int | None, resolved: bool, expected: str | None
) -> None:
    got = verdict(
        EgressPolicy(),
        ADDRESSING,
        protocol=protocol,
        destination=IPv4Address(destination),
        port=port,
        resolved=resolved,
    )
    assert got == expected


def test_verdict_with_allowlist_needs_a_resolved_address() -> None:
    policy = EgressPolicy(allow_domains=("web.allowed.test",))
    args = {"protocol": "tcp", "destination": IPv4Address("198.51.100.10"), "port": 80}
    assert verdict(policy, ADDRESSING, resolved=True, **args) is None  # type: ignore[arg-type]
    assert verdict(policy, ADDRESSING, resolved=False, **args) == (  # type: ignore[arg-type]
        "address not resolved from an allowed name"
    )


def l2(policy: EgressPolicy) -> list[str]:
    return l2filter.VMRules(
        tap="agvm-0123456789",
        mac=ADDRESSING.mac,
        address=ADDRESSING.address,
        gateway=ADDRESSING.gateway,
        tcp_ports=policy.tcp_ports,
        allow_cidrs=policy.allow_cidrs,
        allow_ipv6=policy.allow_ipv6,
    ).rules()


def test_layer2_pins_mac_and_ip_and_ends_in_a_drop() -> None:
    rules = l2(EgressPolicy())
    assert rules[0] == "ether saddr != 52:54:00:12:34:56 drop"
    assert "ether type arp arp saddr ether != 52:54:00:12:34:56 drop" in rules
    assert "ether type arp arp saddr ip != 10.213.0.10 drop" in rules
    assert "ether type ip ip saddr != 10.213.0.10 drop" in rules
    assert rules[-1].startswith('drop comment "agvm ')
    assert not any("ip6" in r for r in rules)  # IPv6 and every other ethertype: the drop
    # DNS only to the gateway; local and non-public dropped before the ports are accepted
    dns = [r for r in rules if "dport 53" in r]
    assert len(dns) == 2 and all("ip daddr 10.213.0.1 " in r for r in dns)
    local = rules.index("ether type ip ip daddr @local4 drop")
    nonpublic = rules.index("ether type ip ip daddr @nonpublic4 drop")
    ports = rules.index("ether type ip tcp dport { 22, 80, 443, 9418 } accept")
    assert local < nonpublic < ports


def test_layer2_opens_allowed_cidrs_before_the_nonpublic_drop_and_ipv6_when_asked() -> None:
    rules = l2(EgressPolicy(allow_cidrs=("10.9.0.0/16",), tcp_ports=(3128,)))
    cidr = rules.index("ether type ip ip daddr { 10.9.0.0/16 } tcp dport { 3128 } accept")
    assert rules.index("ether type ip ip daddr @local4 drop") < cidr
    assert cidr < rules.index("ether type ip ip daddr @nonpublic4 drop")
    assert "ether type ip6 accept" in l2(EgressPolicy(allow_ipv6=True))
    assert l2(EgressPolicy())[-1] != l2(EgressPolicy(tcp_ports=(443,)))[-1]  # the digest


def test_nonpublic_ranges_cover_all_of_link_local_and_the_metadata_service() -> None:
    nonpublic = nonpublic_networks(IPv4Network("10.213.0.0/21"), addresses=[])
    link_local = IPv4Network("169.254.0.0/16")
    assert any(link_local.subnet_of(n) for n in nonpublic)
    for address in ("169.254.169.254", "169.254.77.77", "169.254.0.1", "169.254.255.254"):
        assert any(IPv4Address(address) in n for n in nonpublic), address
    for private in ("10.1.2.3", "172.20.0.1", "192.168.213.10", "100.64.0.1", "127.0.0.1"):
        assert any(IPv4Address(private) in n for n in nonpublic), private
    # what the rendered rules drop is exactly these sets (layer 2 and layer 3)
    base = l2filter.base_script("agvm-", [], nonpublic)
    assert "169.254.0.0/16" in base and "add element bridge agentvm_l2 nonpublic4" in base
    l3 = l3filter.VMRules(tap="agvm-0123456789", ipset="a", cidr_set="c").chain_rules("ipv4")
    assert l3 is not None
    drop = "-m set --match-set agentvm-nonpublic dst -j DROP"
    assert any(rule.endswith(drop) for rule in l3)


def test_the_documentation_ranges_stay_public() -> None:
    """Test hosts live there; nothing a user owns does."""
    for address in ("192.0.2.1", "198.51.100.10", "203.0.113.10"):
        assert not any(IPv4Address(address) in n for n in NONPUBLIC_V4)


def test_verdict_blocks_nonpublic_unless_an_allowed_cidr() -> None:
    addressing = ADDRESSING.model_copy(update={"nonpublic": NONPUBLIC_V4})
    args = {"protocol": "tcp", "port": 80, "resolved": False}
    metadata = IPv4Address("169.254.169.254")
    assert verdict(EgressPolicy(), addressing, destination=metadata, **args) == (  # type: ignore[arg-type]
        "non-public destination"
    )
    opened = EgressPolicy(allow_cidrs=("169.254.0.0/16",))
    assert verdict(opened, addressing, destination=metadata, **args) is None  # type: ignore[arg-type]
    assert verdict(opened, addressing, destination=IPv4Address("10.213.0.1"), **args) == (  # type: ignore[arg-type]
        "host service"
    )  # never the host itself, whatever the CIDRs


def test_parse_kernel_log_lines() -> None:
    tcp = (
        "[ 12.3] agentvm-obs IN=vnet3 OUT= MAC=ff:ff:ff:ff:ff:ff:52:54:00:12:34:56:08:00 "
        "SRC=10.213.0.10 DST=198.51.100.1 LEN=60 TOS=0x00 PROTO=TCP SPT=40000 DPT=8080 SYN"
    )
    attempt = parse(tcp.replace("agentvm-obs ", PREFIX))
    assert attempt is not None
    assert (attempt.tap, attempt.protocol, attempt.port) == ("vnet3", "tcp", 8080)
    assert attempt.destination == IPv4Address("198.51.100.1")
    v6 = (
        f"{PREFIX}IN=vnet3 OUT= MAC=33:33:00:00:00:01:52:54:00:12:34:56:86:dd "
        "SRC=fe80::1 DST=ff02::1"
    )
    attempt6 = parse(v6)
    assert attempt6 is not None and attempt6.protocol == "ipv6" and attempt6.destination is None
    assert parse("unrelated kernel message IN=eth0") is None


def test_network_definition_splits_static_and_dhcp_ranges() -> None:
    definition = NetworkDefinition("agentvm", "agvbr0", IPv4Network("10.213.0.0/24"))
    static = definition.static_addresses()
    assert static[0] == IPv4Address("10.213.0.10")
    root = ET.fromstring(definition.render())
    rng = root.find("ip/dhcp/range")
    assert rng is not None
    assert IPv4Address(rng.get("start", "")) > static[-1]
    assert rng.get("end") == "10.213.0.254"
    assert root.find("dns") is not None and root.find("dns").get("enable") == "no"  # type: ignore[union-attr]


def test_ipset_names_fit_the_kernel_limit() -> None:
    name = ipsets.set_name("agentvm-standard-0123456789abcdef0123")
    assert len(name) <= ipsets.MAX_NAME
    twin = ipsets.twin_name(name)
    assert len(twin) <= ipsets.MAX_NAME
    assert ipsets.twin_owner(twin) == os.getpid()
    assert ipsets.twin_owner(name) is None
