"""Layer 3: each sandbox's egress policy, stateful, in the mangle table (iptables).

agent-vm writes these rules itself, in one ``iptables-restore --noflush`` transaction
per sandbox (~8 ms), instead of having libvirt instantiate an nwfilter (one iptables or
ebtables process per rule inside libvirtd, ~1 s per VM start). Nothing but agent-vm
writes to these chains, so libvirt's rule rebuilds (which used to leave every sandbox
unfiltered for ~50 ms) cannot touch them. The mangle table runs before the filter table
and sees bridged traffic through br_netfilter; sandboxes are told apart by their tap
(``physdev``), which a guest cannot spoof. Layer 2 and a stateless copy of this policy
are in ``l2filter.py``, so flushing either table leaves the other in force.

* ``AGENTVM_EGRESS`` (mangle FORWARD): one ``-g E-<tap>`` per sandbox, then a drop for
  every other sandbox tap (a VM whose chain is not there yet, or any more, gets nothing);
* ``E-<tap>``: replies of allowed connections; drop to ``agentvm-local`` (host, subnet);
  the VM's ``allow_cidrs`` on its ports; drop to ``agentvm-nonpublic``; the VM's
  (address, port) pairs; drop the rest. In IPv6 only for VMs that allow it;
* ``AGENTVM_HOST`` (mangle INPUT): DHCP, DNS to a sandbox gateway, and the connections
  the nat table redirected to the egress proxy, through; anything else from a sandbox
  tap dropped.

Host-wide and persistent like the network: every agent-vm process adds and removes its
own VMs' chains, and orphans are removed with their other network pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv6Address

from agent_vm.errors import NetworkError
from agent_vm.logs import get_logger
from agent_vm.network.ipsets import GATEWAYS_SET, LOCAL_SET, NONPUBLIC_SET
from agent_vm.network.tools import run_tool

log = get_logger(__name__)

TABLE = "mangle"
EGRESS = "AGENTVM_EGRESS"
HOST = "AGENTVM_HOST"
FAMILIES = ("ipv4", "ipv6")
TOOLS = {
    "ipv4": ("iptables-save", "iptables-restore"),
    "ipv6": ("ip6tables-save", "ip6tables-restore"),
}
GLOBAL_UNICAST6 = "2000::/3"


def vm_chain(tap: str) -> str:
    return f"E-{tap}"


ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"


@dataclass(frozen=True)
class VMRules:
    """What layer 3 enforces for one sandbox."""

    tap: str
    ipset: str  # hash:net,port of allowed (destination, tcp port) pairs
    cidr_set: str  # hash:net,port of its allow_cidrs per allowed port
    local_set: str = LOCAL_SET  # host addresses and the sandbox subnet
    nonpublic_set: str = NONPUBLIC_SET
    ipv6_ports: tuple[int, ...] | None = None  # TCP ports to 2000::/3, None: no IPv6
    host_addresses6: tuple[IPv6Address, ...] = ()

    def chain_rules(self, family: str) -> list[str] | None:
        """The rules of ``E-<tap>`` as ``iptables-save`` prints them; None: no chain."""
        chain = vm_chain(self.tap)
        if family == "ipv4":
            return [
                f"-A {chain} {ESTABLISHED}",
                f"-A {chain} -m set --match-set {self.local_set} dst -j DROP",
                f"-A {chain} -p tcp -m set --match-set {self.cidr_set} dst,dst -j RETURN",
                f"-A {chain} -m set --match-set {self.nonpublic_set} dst -j DROP",
                f"-A {chain} -p tcp -m set --match-set {self.ipset} dst,dst -j RETURN",
                f"-A {chain} -j DROP",
            ]
        if self.ipv6_ports is None:
            return None
        rules = [f"-A {chain} {ESTABLISHED}"]
        rules += [f"-A {chain} -d {host}/128 -j DROP" for host in self.host_addresses6]
        rules += [
            f"-A {chain} -d {GLOBAL_UNICAST6} -p tcp -m tcp --dport {port} -j RETURN"
            for port in self.ipv6_ports
        ]
        return [*rules, f"-A {chain} -j DROP"]

    def dispatch(self) -> str:
        return _dispatch(self.tap)


def _dispatch(tap: str) -> str:
    return f"-A {EGRESS} -m physdev --physdev-in {tap} -g {vm_chain(tap)}"


def shared_rules(tap_prefix: str) -> dict[str, dict[str, list[str]]]:
    """family -> shared chain -> its fixed rules (the egress chain's per-VM dispatch
    rules come before these)."""
    physdev = f"-m physdev --physdev-in {tap_prefix}+"
    drop = {EGRESS: [f"-A {EGRESS} {physdev} -j DROP"], HOST: [f"-A {HOST} {physdev} -j DROP"]}
    gateways = f"-m set --match-set {GATEWAYS_SET} dst"
    host4 = [
        f"-A {HOST} -p udp {physdev} -m udp --dport 67 -j RETURN",
        f"-A {HOST} -p udp {physdev} -m udp --dport 53 {gateways} -j RETURN",
        f"-A {HOST} -p tcp {physdev} -m tcp --dport 53 {gateways} -j RETURN",
        # web traffic the nat table redirected to the egress proxy (``redirect.py``)
        f"-A {HOST} -p tcp {physdev} -m conntrack --ctstate DNAT -j RETURN",
    ]
    return {
        "ipv4": {EGRESS: drop[EGRESS], HOST: [*host4, *drop[HOST]]},
        "ipv6": {EGRESS: drop[EGRESS], HOST: drop[HOST]},  # no IPv6 to the host at all
    }


BASE_JUMPS = (f"-A FORWARD -j {EGRESS}", f"-A INPUT -j {HOST}")


@dataclass(frozen=True)
class Tables:
    """``*-save -t mangle`` output per family, read once per check."""

    ipv4: str
    ipv6: str

    def of(self, family: str) -> str:
        return self.ipv4 if family == "ipv4" else self.ipv6


READ_ATTEMPTS = 5
WRITE_ATTEMPTS = 5


def read_tables() -> Tables:
    """Both families' mangle tables (reads are retried: see ``tools.py``)."""
    return Tables(
        ipv4=run_tool([TOOLS["ipv4"][0], "-t", TABLE], attempts=READ_ATTEMPTS),
        ipv6=run_tool([TOOLS["ipv6"][0], "-t", TABLE], attempts=READ_ATTEMPTS),
    )


def _restore(family: str, lines: Iterable[str]) -> None:
    """Apply ``lines`` to the mangle table in one transaction (declared chains are
    created, or flushed and refilled)."""
    script = "\n".join([f"*{TABLE}", *lines, "COMMIT", ""])
    run_tool([TOOLS[family][1], "-w", "--noflush"], stdin=script)


def _rules(table: str, chain: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith(f"-A {chain} ")]


def base_problems(tables: Tables, tap_prefix: str) -> list[str]:
    """What is wrong with the shared chains and their jumps."""
    found = []
    for family, chains in shared_rules(tap_prefix).items():
        table = tables.of(family)
        for jump in BASE_JUMPS:
            if table.splitlines().count(jump) != 1:
                found.append(f"{family}: {jump!r} missing or doubled")
        for chain, fixed in chains.items():
            rules = _rules(table, chain)
            if rules[len(rules) - len(fixed) :] != fixed:
                found.append(f"{family} {chain}: its final rules are not {fixed}")
    return found


def ensure_base(tap_prefix: str, tables: Tables | None = None) -> list[str]:
    """Create or repair the shared chains, keeping the dispatch rules already there."""
    tables = tables or read_tables()
    problems = base_problems(tables, tap_prefix)
    if not problems:
        return []
    for family, chains in shared_rules(tap_prefix).items():
        table = tables.of(family)
        keep = [r for r in _rules(table, EGRESS) if " -g E-" in r]
        lines = [f":{EGRESS} - [0:0]", f":{HOST} - [0:0]", *keep, *chains[EGRESS], *chains[HOST]]
        for jump in BASE_JUMPS:
            builtin, target = jump.split(" ")[1], jump.split(" ")[-1]
            lines += [f"-D {builtin} -j {target}"] * table.splitlines().count(jump)
            lines.append(f"-I {builtin} 1 -j {target}")
        _restore(family, lines)
    log.info("egress_l3_base_installed", repaired=problems)
    return problems


def _retried(operation: Callable[[], None]) -> None:
    """Run a read-then-write operation again (re-reading) when a concurrent writer made
    it fail: restores build their own view of the table and race like reads do."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            operation()
            return
        except NetworkError:
            if attempt + 1 == WRITE_ATTEMPTS:
                raise
            time.sleep(0.05 * (attempt + 1))


def add_vm(vm: VMRules) -> None:
    """Chains before dispatch: until the dispatch rule exists the tap gets nothing."""
    _retried(lambda: _add_vm(vm))


def _add_vm(vm: VMRules) -> None:
    tables = read_tables()
    for family in FAMILIES:
        rules = vm.chain_rules(family)
        chain = vm_chain(vm.tap)
        table = tables.of(family)
        present = vm.dispatch() in table.splitlines()
        if rules is None:
            if present or f":{chain} " in table:
                _remove(family, vm.tap, table)
            continue
        lines = [f":{chain} - [0:0]", *rules]
        if not present:
            lines.append(vm.dispatch().replace(f"-A {EGRESS}", f"-I {EGRESS} 1", 1))
        _restore(family, lines)


def remove_vm(tap: str) -> None:
    """Remove a sandbox's dispatch rules and chains (both families); idempotent."""

    def remove() -> None:
        tables = read_tables()
        for family in FAMILIES:
            _remove(family, tap, tables.of(family))

    _retried(remove)


def _remove(family: str, tap: str, table: str) -> None:
    chain = vm_chain(tap)
    dispatch = _dispatch(tap)
    lines = [dispatch.replace("-A ", "-D ", 1)] * table.splitlines().count(dispatch)
    if f":{chain} " in table:
        lines += [f"-F {chain}", f"-X {chain}"]
    if lines:
        _restore(family, lines)


def vm_problems(tables: Tables, vm: VMRules) -> list[str]:
    found = []
    for family in FAMILIES:
        table = tables.of(family)
        rules = vm.chain_rules(family)
        if rules is None:
            continue
        if _rules(table, vm_chain(vm.tap)) != rules:
            found.append(f"{family} {vm_chain(vm.tap)}: rules differ")
        if table.splitlines().count(vm.dispatch()) != 1:
            found.append(f"{family} {EGRESS}: no dispatch to {vm_chain(vm.tap)}")
    return found


def taps_in(tables: Tables) -> set[str]:
    """Taps that have a layer-3 chain (to find orphans)."""
    return {
        line[1:].split(" ")[0].removeprefix("E-")
        for family in FAMILIES
        for line in tables.of(family).splitlines()
        if line.startswith(":E-")
    }
