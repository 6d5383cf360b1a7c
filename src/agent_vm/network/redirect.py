"""The host's redirection of a sandbox's web traffic to its egress proxy (nat table).

``AGENTVM_PROXY`` (nat PREROUTING) holds one rule per sandbox, by its tap (which a guest
cannot spoof): TCP to ports 80 and 443 (those its policy allows) of a public address is
redirected to the proxy of the agent-vm process that owns the sandbox, listening on the
gateway. The host, other sandboxes and non-public ranges are left to the filters, which
drop them as before (``allow_cidrs`` ranges pass layer 3 directly). Clients
that ignore ``HTTP_PROXY`` are covered. A redirected connection never passes the
layer-3 FORWARD chain: the proxy enforces the same policy (and more: names), and layer 3
lets it into the host only because conntrack says it was redirected (``AGENTVM_HOST``
in ``l3filter.py``); a guest that connects to the proxy's port itself is dropped.
"""

from __future__ import annotations

from agent_vm.network.ipsets import LOCAL_SET, NONPUBLIC_SET
from agent_vm.network.tools import run_tool

TABLE = "nat"
CHAIN = "AGENTVM_PROXY"
JUMP = f"-A PREROUTING -j {CHAIN}"
WEB_PORTS = (80, 443)
ATTEMPTS = 5


def _rule(tap: str, port: int, web_ports: tuple[int, ...]) -> str:
    ports = ",".join(str(p) for p in web_ports)
    skip = " ".join(f"-m set ! --match-set {name} dst" for name in (LOCAL_SET, NONPUBLIC_SET))
    return (
        f"-A {CHAIN} -p tcp -m physdev --physdev-in {tap} {skip} "
        f"-m multiport --dports {ports} -j REDIRECT --to-ports {port}"
    )


def _table() -> list[str]:
    return run_tool(["iptables-save", "-t", TABLE], attempts=ATTEMPTS).splitlines()


def _restore(lines: list[str]) -> None:
    script = "\n".join([f"*{TABLE}", *lines, "COMMIT", ""])
    run_tool(["iptables-restore", "-w", "--noflush"], stdin=script)


def ensure_base() -> None:
    """The chain and one jump to it from PREROUTING (idempotent)."""
    table = _table()
    declared = any(line.startswith(f":{CHAIN} ") for line in table)
    lines = [] if declared else [f":{CHAIN} - [0:0]"]
    count = table.count(JUMP)
    if count == 1 and not lines:
        return
    lines += [f"-D PREROUTING -j {CHAIN}"] * count + [f"-I PREROUTING 1 -j {CHAIN}"]
    _restore(lines)


def add_vm(tap: str, port: int, allowed_ports: tuple[int, ...]) -> None:
    """Redirect ``tap``'s web traffic (the web ports its policy allows) to ``port``,
    replacing the rule it had; none when its policy allows neither."""
    table = _table()
    stale = [line for line in table if line.startswith(f"-A {CHAIN} ") and f" {tap} " in line]
    lines = [line.replace("-A ", "-D ", 1) for line in stale]
    web = tuple(p for p in WEB_PORTS if p in allowed_ports)
    if lines or web:
        _restore([*lines, *([_rule(tap, port, web)] if web else [])])


def remove_vm(tap: str) -> None:
    """Remove ``tap``'s rule; idempotent."""
    stale = [line for line in _table() if line.startswith(f"-A {CHAIN} ") and f" {tap} " in line]
    if stale:
        _restore([line.replace("-A ", "-D ", 1) for line in stale])


def taps_in() -> set[str]:
    """Taps that have a rule (to find orphans)."""
    found = set()
    for line in _table():
        if line.startswith(f"-A {CHAIN} ") and "--physdev-in " in line:
            found.add(line.split("--physdev-in ", 1)[1].split(" ", 1)[0])
    return found
