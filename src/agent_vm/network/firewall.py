"""Are the kernel rules libvirt made from a VM's nwfilter still there?

libvirt writes a filter into iptables and ebtables once, when the interface is bound, and
never looks again: ``iptables -F``, a firewall reload or ``ebtables -F`` silently removes
them, and with FORWARD's policy ACCEPT the VM's traffic then goes out unfiltered. The
guard polls this and re-instantiates what is gone.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent_vm.network.tools import run_tool

READ_ATTEMPTS = 5  # a listing can race with libvirt changing the tables

BASE_RULES = (  # the jumps from the built-in chains into libvirt's nwfilter chains
    "-A FORWARD -j libvirt-in\n",
    "-A FORWARD -j libvirt-out\n",
    "-A FORWARD -j libvirt-in-post\n",
    "-A INPUT -j libvirt-host-in\n",
)


def missing(taps: Iterable[str]) -> set[str]:
    """The taps whose rules are (partly) gone from the kernel; one read of each table."""
    taps = list(taps)
    if not taps:
        return set()
    iptables = run_tool(["iptables-save", "-t", "filter"], attempts=READ_ATTEMPTS)
    # read through nft: an ebtables-nft listing is a write transaction that can make
    # libvirt's concurrent ebtables commands fail ("RULE_DELETE failed")
    ebtables = run_tool(["nft", "list", "table", "bridge", "nat"], attempts=READ_ATTEMPTS)
    base = all(rule in iptables for rule in BASE_RULES)
    lost = set()
    for tap in taps:
        ip_rules = (f"-A FI-{tap} ", f"-A FO-{tap} ", f"-A HI-{tap} ", f"-g FI-{tap}\n")
        eb_rules = (f"jump libvirt-I-{tap}\n", f"jump libvirt-O-{tap}\n")
        chain = ebtables.partition(f"chain libvirt-I-{tap} {{")[2].partition("}")[0]
        if (
            not base
            or not all(rule in iptables for rule in ip_rules)
            or not all(rule in ebtables for rule in eb_rules)
            or " drop" not in chain  # flushed (or never filled)
        ):
            lost.add(tap)
    return lost


def rules_present(tap: str) -> bool:
    return not missing([tap])
