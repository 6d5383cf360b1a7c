"""The project's own libvirt NAT network.

libvirt's dnsmasq serves DHCP only (``<dns enable='no'/>``): DNS on the gateway belongs to
agent-vm's resolver, which applies each sandbox's policy. Sandboxes get static addresses
from the lower part of the subnet (reserved in ``sandboxes.py``); dnsmasq's dynamic range
is the upper part, so the two never collide. (DHCP host entries through virNetworkUpdate
were tried first: each update reloads dnsmasq, 0.4 s per reservation and per release.)
"""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import NetworkError
from agent_vm.logs import get_logger

log = get_logger(__name__)

DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
ET.register_namespace("dnsmasq", DNSMASQ_NS)
FIRST_STATIC = 10  # .1 is the gateway; .2-.9 are left alone
DHCP_SHARE = 0.25  # the top quarter of the subnet is dnsmasq's dynamic range


@dataclass(frozen=True)
class NetworkDefinition:
    name: str
    bridge: str
    subnet: IPv4Network

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def static_addresses(self) -> list[IPv4Address]:
        """Addresses agent-vm hands to sandboxes (below dnsmasq's range)."""
        hosts = list(self.subnet.hosts())
        return hosts[FIRST_STATIC - 1 : -max(1, int(len(hosts) * DHCP_SHARE))]

    def render(self) -> str:
        root = ET.Element("network")
        ET.SubElement(root, "name").text = self.name
        ET.SubElement(root, "forward", mode="nat")
        ET.SubElement(root, "bridge", name=self.bridge, stp="off", delay="0")
        ET.SubElement(root, "dns", enable="no")
        ip = ET.SubElement(root, "ip", address=str(self.gateway), netmask=str(self.subnet.netmask))
        dhcp = ET.SubElement(ip, "dhcp")
        hosts = list(self.subnet.hosts())
        start = hosts[-max(1, int(len(hosts) * DHCP_SHARE))]
        ET.SubElement(dhcp, "range", start=str(start), end=str(hosts[-1]))
        options = ET.SubElement(root, f"{{{DNSMASQ_NS}}}options")
        ET.SubElement(
            options,
            f"{{{DNSMASQ_NS}}}option",
            value=f"dhcp-option=option:dns-server,{self.gateway}",
        )
        ET.indent(root)
        return ET.tostring(root, encoding="unicode")


def _routes() -> list[dict[str, str]]:
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        data: list[dict[str, str]] = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return data


def conflicting_route(definition: NetworkDefinition) -> str | None:
    """A host route overlapping our subnet on another interface (e.g. a LAN or VPN)."""
    for route in _routes():
        dst = route.get("dst", "")
        if dst in ("default", "") or route.get("dev") == definition.bridge:
            continue
        if route.get("type") in ("local", "broadcast"):
            continue
        try:
            network = IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if network.overlaps(definition.subnet):
            return f"{dst} via {route.get('dev', '?')}"
    return None


def ensure_network(
    connection: LibvirtConnection, definition: NetworkDefinition
) -> libvirt.virNetwork:
    """Define (if missing), start (if stopped) and verify the project's network. Idempotent."""
    conn = connection.connection
    try:
        network = conn.networkLookupByName(definition.name)
    except libvirt.libvirtError:
        conflict = conflicting_route(definition)
        if conflict:
            raise NetworkError(
                f"subnet {definition.subnet} for network {definition.name} overlaps the host "
                f"route {conflict}",
                hint="choose another subnet with AGENT_VM_NETWORK_SUBNET (e.g. 10.214.0.0/24)",
            ) from None
        try:
            network = conn.networkDefineXML(definition.render())
        except libvirt.libvirtError as exc:
            raise NetworkError(
                f"libvirt refused network {definition.name}: {exc.get_error_message()}"
            ) from exc
    problems = verify(network, definition)
    if problems and _unused(network) and conflicting_route(definition) is None:
        log.info("network_redefined", network=definition.name, differences=problems)
        network = _redefine(conn, network, definition)
        problems = verify(network, definition)
    if problems:
        raise NetworkError(
            f"libvirt network {definition.name} exists but differs: {'; '.join(problems)}",
            hint=f"remove it (virsh net-destroy {definition.name}; virsh net-undefine "
            f"{definition.name}) or configure agent-vm to match it",
        )
    if not network.isActive():
        try:
            network.create()
        except libvirt.libvirtError as exc:
            raise NetworkError(
                f"cannot start network {definition.name}: {exc.get_error_message()}",
                hint="another interface may already use its bridge name or subnet",
            ) from exc
    network.setAutostart(1)
    return network


def _unused(network: libvirt.virNetwork) -> bool:
    """No VM is attached (its definition can then change under nobody's feet)."""
    try:
        return not network.isActive() or not network.listAllPorts(0)
    except libvirt.libvirtError:
        return False


def _redefine(
    conn: libvirt.virConnect, network: libvirt.virNetwork, definition: NetworkDefinition
) -> libvirt.virNetwork:
    """Replace our own network's definition (e.g. a subnet grown for more sandboxes)."""
    try:
        if network.isActive():
            network.destroy()
        network.undefine()
        return conn.networkDefineXML(definition.render())
    except libvirt.libvirtError as exc:
        raise NetworkError(
            f"cannot redefine network {definition.name}: {exc.get_error_message()}"
        ) from exc


def verify(network: libvirt.virNetwork, definition: NetworkDefinition) -> list[str]:
    root = ET.fromstring(network.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
    problems = []
    forward = root.find("forward")
    if forward is None or forward.get("mode") != "nat":
        problems.append("forward mode is not nat")
    bridge = root.find("bridge")
    if bridge is None or bridge.get("name") != definition.bridge:
        problems.append(f"bridge is not {definition.bridge}")
    ip = root.find("ip")
    if ip is None or ip.get("address") != str(definition.gateway):
        problems.append(f"gateway is not {definition.gateway}")
    elif ip.get("netmask") != str(definition.subnet.netmask):
        problems.append(f"netmask is not {definition.subnet.netmask}")
    dns = root.find("dns")
    if dns is None or dns.get("enable") != "no":
        problems.append("libvirt's DNS is enabled (agent-vm's resolver needs port 53)")
    static = set(definition.static_addresses())
    for dhcp_range in root.findall("ip/dhcp/range"):
        bounds = dhcp_range.get("start"), dhcp_range.get("end")
        if bounds[0] is None or bounds[1] is None:
            problems.append("a DHCP range without start or end")
            continue
        start, end = IPv4Address(bounds[0]), IPv4Address(bounds[1])
        if any(start <= address <= end for address in static):
            problems.append(f"its DHCP range {start}-{end} overlaps agent-vm's static addresses")
    return problems
