"""Render an EgressPolicy into a per-VM libvirt nwfilter.

Layer 2 (ebtables) and layer 3 (iptables, seen for bridged traffic through br_netfilter
with bridge-nf-call-iptables=1) rules live in one filter. Values are written literally:
the filter is per VM, so a policy change is just a redefinition, which libvirt applies
to the running interface at once.

Known pitfalls handled here: the guest IP is given, never learnt from its first packet;
IPv6 and every other ethertype are dropped at layer 2 (a final layer-3 drop would cover
IPv4 only); DNS is allowed to the network's own resolver only, not to any address;
traffic to the host itself and to other VMs on the bridge is dropped explicitly.

IPv6, when a policy allows it, means: IPv6 frames may leave, TCP on the allowed ports to
global unicast addresses (2000::/3) except the host's own, nothing else. The project's
NAT network has no IPv6 prefix, so this matters only where the host routes IPv6 for it.
``ipsets.py`` fills the sets the filter refers to.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from ipaddress import IPv4Address

from agent_vm.network.policy import Addressing, EgressPolicy

FILTER_PREFIX = "agentvm-egress-"
LOCAL_SET = "agentvm-local"
# Priorities: lower runs first; libvirt's own building blocks use -700..-500.
NO_ADDRESS = str(IPv4Address(0))  # a DHCP client's source before it has an address
PRIO_SERVICES = 100  # layer-2 rules use 10..30
PRIO_BLOCK_LOCAL = 200
PRIO_ALLOW = 300
PRIO_DROP = 1000


def filter_name(vm_name: str) -> str:
    return f"{FILTER_PREFIX}{vm_name}"


def _rule(parent: ET.Element, action: str, direction: str, priority: int, **match: str) -> None:
    """One <rule>; ``protocol`` names the match element, ``protocol_`` is its attribute."""
    protocol = match.pop("protocol", None)
    if "protocol_" in match:
        match["protocol"] = match.pop("protocol_")
    rule = ET.SubElement(parent, "rule", action=action, direction=direction, priority=str(priority))
    if protocol is not None:
        ET.SubElement(rule, protocol, attrib=match)


def render_filter(vm_name: str, policy: EgressPolicy, addressing: Addressing, ipset: str) -> str:
    """The nwfilter XML for one VM.

    Every rule sits in the root chain, and ports and destinations live in ipsets: libvirt
    9.0 runs one iptables/ebtables process per rule and per sub-chain, and each costs
    5-10 ms inside libvirtd (libvirt's own building blocks no-mac/ip/arp-spoofing plus a
    rule per port and host address made 179 processes and 1.45 s per VM start). Sets
    also let most policy changes take effect by changing their contents:

    * ``LOCAL_SET`` (shared): the gateway, every host address and the sandbox subnet;
    * ``ipset`` (per VM, hash:net,port): the (destination, tcp:port) pairs allowed, i.e.
      0.0.0.0/1 and 128.0.0.0/1 for each allowed port, or with a domain allowlist the
      addresses the resolver handed out.
    """
    mac, address, gateway = addressing.mac, str(addressing.address), str(addressing.gateway)
    root = ET.Element("filter", name=filter_name(vm_name), chain="root")
    # --- layer 2 (ebtables): the VM's own MAC and IP only, then IPv4 and ARP only ---
    _rule(root, "drop", "out", 10, protocol="mac", match="no", srcmacaddr=mac)
    _rule(root, "drop", "out", 11, protocol="arp", match="no", arpsrcmacaddr=mac)
    _rule(root, "drop", "out", 12, protocol="arp", match="no", arpsrcipaddr=address)
    _rule(
        root, "accept", "out", 13, protocol="ip",
        srcipaddr=NO_ADDRESS, protocol_="udp", srcportstart="68", dstportstart="67",
    )  # fmt: skip
    _rule(root, "drop", "out", 14, protocol="ip", match="no", srcipaddr=address)
    _rule(root, "accept", "inout", 20, protocol="mac", protocolid="ipv4")
    _rule(root, "accept", "inout", 20, protocol="mac", protocolid="arp")
    if policy.allow_ipv6:
        _rule(root, "accept", "inout", 20, protocol="mac", protocolid="ipv6")
    _rule(root, "drop", "inout", 30, protocol="mac")  # every other ethertype, IPv6 included

    # --- layer 3 (iptables through br_netfilter): DHCP and DNS of the network only ---
    _rule(
        root, "accept", "out", PRIO_SERVICES,
        protocol="udp", srcportstart="68", dstportstart="67",
    )  # fmt: skip
    for proto in ("udp", "tcp"):
        _rule(
            root, "accept", "out", PRIO_SERVICES,
            protocol=proto, dstipaddr=gateway, dstportstart="53",
        )  # fmt: skip
    # --- nothing else to the host itself or to other VMs on the bridge ---
    _rule(root, "drop", "out", PRIO_BLOCK_LOCAL, protocol="all", ipset=LOCAL_SET, ipsetflags="dst")
    # --- allowed (destination, tcp:port) pairs; libvirt keeps ipset matches only on <all>
    # and ignores match='no' on them, so the set is matched positively. Replies come back
    # through the ESTABLISHED rule libvirt adds for every accepted outgoing rule. ---
    _rule(root, "accept", "out", PRIO_ALLOW, protocol="all", ipset=ipset, ipsetflags="dst,dst")
    if policy.allow_ipv6:
        for host in addressing.host_addresses6:
            _rule(root, "drop", "out", PRIO_BLOCK_LOCAL, protocol="all-ipv6", dstipaddr=str(host))
        for port in policy.tcp_ports:
            _rule(
                root, "accept", "out", PRIO_ALLOW, protocol="tcp-ipv6",
                dstipaddr="2000::", dstipmask="3", dstportstart=str(port),
            )  # fmt: skip
        _rule(root, "drop", "inout", PRIO_DROP, protocol="all-ipv6")
    # --- everything else, both ways ---
    _rule(root, "drop", "inout", PRIO_DROP, protocol="all")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def rules_of(xml: str) -> list[str]:
    """A filter's rules and references as comparable strings (uuid and order of
    attributes ignored), for checking a live filter against the rendered one."""
    root = ET.fromstring(xml)
    out = []
    for child in root:
        if child.tag == "filterref":
            out.append(f"ref {child.get('filter')}")
        elif child.tag == "rule":
            head = " ".join(f"{k}={child.get(k)}" for k in ("action", "direction", "priority"))
            for match in child:
                attrs = " ".join(f"{k}={v}" for k, v in sorted(match.attrib.items()))
                head += f" {match.tag}[{attrs}]"
            out.append(head)
    return sorted(out)
