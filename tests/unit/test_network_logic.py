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
from agent_vm.network import ipsets
from agent_vm.network.libvirt_net import NetworkDefinition
from agent_vm.network.nwfilter import LOCAL_SET, render_filter, rules_of
from agent_vm.network.observer import PREFIX, parse
from agent_vm.network.policy import DEFAULT_TCP_PORTS, Addressing, EgressPolicy, verdict

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


def _rules(policy: EgressPolicy) -> list[ET.Element]:
    return list(ET.fromstring(render_filter("agentvm-x-1", policy, ADDRESSING, "agentvm-1")))


def test_filter_pins_mac_and_ip_and_ends_in_drops() -> None:
    rules = _rules(EgressPolicy())
    text = rules_of(render_filter("agentvm-x-1", EgressPolicy(), ADDRESSING, "agentvm-1"))
    assert any("mac[match=no srcmacaddr=52:54:00:12:34:56]" in r for r in text)
    assert any("ip[match=no srcipaddr=10.213.0.10]" in r for r in text)
    assert any("arp[arpsrcipaddr=10.213.0.10 match=no]" in r for r in text)
    assert any(r.startswith("action=drop direction=inout priority=30 mac[]") for r in text)
    last = max(rules, key=lambda r: int(r.get("priority", "0")))
    assert (last.get("action"), last.get("direction"), last[0].tag) == ("drop", "inout", "all")
    # DNS only to the gateway, the local set dropped before the allowed set is accepted
    dns = [r for r in text if "dstportstart=53" in r]
    assert len(dns) == 2 and all("dstipaddr=10.213.0.1" in r for r in dns)
    local = next(r for r in rules if r[0].get("ipset") == LOCAL_SET)
    allowed = next(r for r in rules if r[0].get("ipset") == "agentvm-1")
    assert local.get("action") == "drop" and allowed.get("action") == "accept"
    assert int(local.get("priority", "0")) < int(allowed.get("priority", "0"))
    assert not any("ipv6" in r for r in text)


def test_filter_with_ipv6_accepts_global_tcp_only_and_blocks_the_host() -> None:
    text = rules_of(
        render_filter("agentvm-x-1", EgressPolicy(allow_ipv6=True), ADDRESSING, "agentvm-1")
    )
    assert any("mac[protocolid=ipv6]" in r and "accept" in r for r in text)
    v6 = [r for r in text if "tcp-ipv6" in r]
    assert len(v6) == len(DEFAULT_TCP_PORTS)
    assert all("dstipaddr=2000::" in r and "dstipmask=3" in r for r in v6)
    assert any("all-ipv6[dstipaddr=2001:db8::5]" in r and "drop" in r for r in text)
    assert any(r.startswith("action=drop direction=inout") and "all-ipv6[]" in r for r in text)


def test_rules_of_ignores_attribute_order_and_uuid() -> None:
    a = '<filter name="f" chain="root"><uuid>1</uuid><rule action="drop" direction="out" \
priority="5"><tcp dstportstart="1" srcipaddr="x"/></rule></filter>'
    b = '<filter chain="root" name="f"><rule priority="5" direction="out" action="drop">\
<tcp srcipaddr="x" dstportstart="1"/></rule></filter>'
    assert rules_of(a) == rules_of(b)


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
