"""Layer 2 (and a stateless copy of the egress policy): an nftables bridge table.

Every frame a sandbox sends passes one chain of its own, at the bridge's prerouting
hook, before it is forwarded or reaches the host:

* its own MAC as source, ARP only with its own MAC and IPv4 address, IPv4 only from its
  own address (DHCP discover from 0.0.0.0 excepted); IPv4 and ARP only, and IPv6 only
  when the policy allows it: every other ethertype is dropped;
* DHCP, and DNS to its gateway; nothing else to the host or the sandbox subnet; its
  ``allow_cidrs`` on its ports; nothing to non-public ranges; TCP on its ports; nothing else.

What it cannot know without state is the domain allowlist (the resolver's answers) and
replies; those, and the same policy again, are layer 3 (``l3filter.py``). So each layer
holds on its own if the other's table is flushed. One ``nft -f`` transaction per sandbox
(a few ms, atomic); the table is agent-vm's alone, so nothing rebuilds it under us.
Frames from interfaces with the sandbox prefix but no chain are dropped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses, summarize_address_range
from typing import Any

from agent_vm.errors import NetworkError
from agent_vm.logs import get_logger
from agent_vm.network.tools import run_tool

log = get_logger(__name__)

TABLE = "agentvm_l2"
PRIORITY = -200  # after the observer (-300), so that it sees what is dropped here
LOCAL = "local4"
NONPUBLIC = "nonpublic4"
TAPS = "taps"
READ_ATTEMPTS = 5
WRITE_ATTEMPTS = 5
BROADCAST = IPv4Address("255.255.255.255")


def vm_chain(tap: str) -> str:
    return "vm_" + tap.replace("-", "_")


@dataclass(frozen=True)
class VMRules:
    """What layer 2 enforces for one sandbox."""

    tap: str
    mac: str
    address: IPv4Address
    gateway: IPv4Address
    tcp_ports: tuple[int, ...]
    allow_cidrs: tuple[IPv4Network, ...] = ()
    allow_ipv6: bool = False

    def rules(self) -> list[str]:
        mac, address, gateway = self.mac, self.address, self.gateway
        ip = "ether type ip"
        rules = [
            f"ether saddr != {mac} drop",
            f"ether type arp arp saddr ether != {mac} drop",
            f"ether type arp arp saddr ip != {address} drop",
            "ether type arp accept",
            f"{ip} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            f"{ip} ip saddr != {address} drop",
            f"{ip} ip daddr {{ {BROADCAST}, {gateway} }} udp dport 67 accept",
            f"{ip} ip daddr {gateway} udp dport 53 accept",
            f"{ip} ip daddr {gateway} tcp dport 53 accept",
            f"{ip} ip daddr @{LOCAL} drop",
        ]
        ports = _set(str(p) for p in self.tcp_ports)
        if self.allow_cidrs and self.tcp_ports:
            cidrs = _set(str(c) for c in self.allow_cidrs)
            rules.append(f"{ip} ip daddr {cidrs} tcp dport {ports} accept")
        rules.append(f"{ip} ip daddr @{NONPUBLIC} drop")
        if self.tcp_ports:
            rules.append(f"{ip} tcp dport {ports} accept")
        if self.allow_ipv6:
            rules.append("ether type ip6 accept")  # layer 3 (ip6tables) decides
        return [*rules, f'drop comment "agvm {self.digest(rules)}"']

    @staticmethod
    def digest(rules: list[str]) -> str:
        return hashlib.sha256("\n".join(rules).encode()).hexdigest()[:16]


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _elements(networks: Iterable[IPv4Network]) -> str:
    collapsed = [str(n) for n in collapse_addresses(networks)]
    return _set(collapsed) if collapsed else ""


def base_script(
    tap_prefix: str, local: Iterable[IPv4Network], nonpublic: Iterable[IPv4Network]
) -> str:
    """The table, its shared sets (refilled) and its dispatch, keeping the VMs' chains."""
    lines = [
        f"table bridge {TABLE} {{",
        f"  set {LOCAL} {{ type ipv4_addr; flags interval; }}",
        f"  set {NONPUBLIC} {{ type ipv4_addr; flags interval; }}",
        f"  map {TAPS} {{ type ifname : verdict; }}",
        f"  chain prerouting {{ type filter hook prerouting priority {PRIORITY}; policy accept; }}",
        "}",
        f"flush set bridge {TABLE} {LOCAL}",
        f"flush set bridge {TABLE} {NONPUBLIC}",
        f"flush chain bridge {TABLE} prerouting",
        f"add rule bridge {TABLE} prerouting iifname vmap @{TAPS}",
        f'add rule bridge {TABLE} prerouting iifname "{tap_prefix}*" drop',
    ]
    for name, networks in ((LOCAL, local), (NONPUBLIC, nonpublic)):
        elements = _elements(networks)
        if elements:
            lines.append(f"add element bridge {TABLE} {name} {elements}")
    return "\n".join(lines) + "\n"


def _apply(script: str) -> None:
    run_tool(["nft", "-f", "-"], stdin=script)


def read_table() -> dict[str, Any] | None:
    """The table as nft's JSON (None when it does not exist)."""
    try:
        text = run_tool(["nft", "-j", "list", "table", "bridge", TABLE], attempts=READ_ATTEMPTS)
    except NetworkError as exc:
        if "No such file or directory" in exc.message:
            return None
        raise
    items = json.loads(text).get("nftables", [])
    table: dict[str, Any] = {"sets": {}, "maps": {}, "chains": {}, "rules": {}}
    for item in items:
        if "set" in item:
            table["sets"][item["set"]["name"]] = item["set"].get("elem", [])
        elif "map" in item:
            table["maps"][item["map"]["name"]] = item["map"].get("elem", [])
        elif "chain" in item:
            table["chains"][item["chain"]["name"]] = item["chain"]
            table["rules"].setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            table["rules"].setdefault(item["rule"]["chain"], []).append(item["rule"])
    return table


def _networks(elements: list[Any]) -> set[str]:
    out = set()
    for element in elements:
        if isinstance(element, str):
            out.add(str(IPv4Network(element)))
        elif isinstance(element, dict) and "prefix" in element:
            out.add(f"{element['prefix']['addr']}/{element['prefix']['len']}")
        elif isinstance(element, dict) and "range" in element:
            low, high = element["range"]
            span = summarize_address_range(IPv4Address(low), IPv4Address(high))
            out |= {str(n) for n in span}
    return out


def base_problems(
    table: dict[str, Any] | None,
    local: Iterable[IPv4Network],
    nonpublic: Iterable[IPv4Network],
) -> list[str]:
    if table is None:
        return [f"nft table bridge {TABLE} is missing"]
    found = []
    for name, networks in ((LOCAL, local), (NONPUBLIC, nonpublic)):
        expected = {str(n) for n in collapse_addresses(networks)}
        if name not in table["sets"]:
            found.append(f"set {name} is missing")
        elif _networks(table["sets"][name]) != expected:
            found.append(f"set {name} differs")
    if TAPS not in table["maps"]:
        found.append(f"map {TAPS} is missing")
    chain = table["chains"].get("prerouting")
    if chain is None or chain.get("hook") != "prerouting" or chain.get("prio") != PRIORITY:
        found.append("chain prerouting is missing or not hooked")
    elif len(table["rules"].get("prerouting", [])) != 2:
        found.append("chain prerouting does not dispatch")
    return found


def ensure_base(
    tap_prefix: str,
    local: Iterable[IPv4Network],
    nonpublic: Iterable[IPv4Network],
    table: dict[str, Any] | None = None,
) -> list[str]:
    """Create the table or repair its shared parts (per-VM chains are kept)."""
    local, nonpublic = list(local), list(nonpublic)
    table = table if table is not None else read_table()
    problems = base_problems(table, local, nonpublic)
    if problems:
        _apply(base_script(tap_prefix, local, nonpublic))
        log.info("egress_l2_base_installed", repaired=problems)
    return problems


def _retried(operation: Callable[[], None]) -> None:
    for attempt in range(WRITE_ATTEMPTS):
        try:
            operation()
            return
        except NetworkError:
            if attempt + 1 == WRITE_ATTEMPTS:
                raise
            time.sleep(0.05 * (attempt + 1))


def add_vm(vm: VMRules) -> None:
    """The VM's chain (replaced atomically), then its dispatch entry, in one transaction."""
    chain = vm_chain(vm.tap)
    lines = [
        f"add chain bridge {TABLE} {chain}",
        f"flush chain bridge {TABLE} {chain}",
        *(f"add rule bridge {TABLE} {chain} {rule}" for rule in vm.rules()),
        f'add element bridge {TABLE} {TAPS} {{ "{vm.tap}" : jump {chain} }}',
    ]
    _retried(lambda: _apply("\n".join(lines) + "\n"))


def remove_vm(tap: str) -> None:
    """The VM's dispatch entry and chain; idempotent."""

    def remove() -> None:
        table = read_table()
        if table is None:
            return
        chain = vm_chain(tap)
        lines = []
        if tap in _mapped(table):
            lines.append(f'delete element bridge {TABLE} {TAPS} {{ "{tap}" }}')
        if chain in table["chains"]:
            lines.append(f"delete chain bridge {TABLE} {chain}")
        if lines:
            _apply("\n".join(lines) + "\n")

    _retried(remove)


def _mapped(table: dict[str, Any]) -> dict[str, str]:
    """tap -> the chain its dispatch entry jumps to."""
    out = {}
    for element in table["maps"].get(TAPS, []):
        if isinstance(element, list) and len(element) == 2:
            target = (
                element[1].get("jump", {}).get("target") if isinstance(element[1], dict) else None
            )
            out[str(element[0])] = str(target)
    return out


def vm_problems(table: dict[str, Any] | None, vm: VMRules) -> list[str]:
    if table is None:
        return [f"nft table bridge {TABLE} is missing"]
    chain = vm_chain(vm.tap)
    found = []
    if _mapped(table).get(vm.tap) != chain:
        found.append(f"no dispatch of {vm.tap} to {chain}")
    rules = table["rules"].get(chain)
    expected = vm.rules()
    if chain not in table["chains"] or rules is None:
        found.append(f"chain {chain} is missing")
    elif len(rules) != len(expected) or rules[-1].get("comment") != expected[-1].split('"')[1]:
        found.append(f"chain {chain} differs from the policy")
    return found


def taps_in(table: dict[str, Any] | None) -> set[str]:
    """Taps with a chain or a dispatch entry (to find orphans)."""
    if table is None:
        return set()
    chains = {name for name in table["chains"] if name.startswith("vm_")}
    return set(_mapped(table)) | {name[3:].replace("_", "-", 1) for name in chains}
