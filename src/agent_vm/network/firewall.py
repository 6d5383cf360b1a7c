"""Are the kernel rules libvirt made from a VM's nwfilter still there?

libvirt writes a filter into iptables and ebtables once, when the interface is bound, and
never looks again: ``iptables -F``, a firewall reload or ``ebtables -F`` silently removes
them, and with FORWARD's policy ACCEPT the VM's traffic then goes out unfiltered. The
guard polls this and re-instantiates what is gone.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable

from agent_vm.errors import NetworkError

BASE_RULES = (  # the jumps from the built-in chains into libvirt's nwfilter chains
    "-A FORWARD -j libvirt-in\n",
    "-A FORWARD -j libvirt-out\n",
    "-A FORWARD -j libvirt-in-post\n",
    "-A INPUT -j libvirt-host-in\n",
)


def _output(argv: list[str], attempts: int = 5) -> str:
    """Retried: a listing can race with libvirt changing the tables."""
    for attempt in range(attempts):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
            raise NetworkError(f"cannot read the firewall with {argv[0]}: {exc}") from exc
        if proc.returncode == 0:
            return proc.stdout
        time.sleep(0.05 * (attempt + 1))
    raise NetworkError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def missing(taps: Iterable[str]) -> set[str]:
    """The taps whose rules are (partly) gone from the kernel; one read of each table."""
    taps = list(taps)
    if not taps:
        return set()
    iptables = _output(["iptables-save", "-t", "filter"])
    # read through nft: an ebtables-nft listing is a write transaction that can make
    # libvirt's concurrent ebtables commands fail ("RULE_DELETE failed")
    ebtables = _output(["nft", "list", "table", "bridge", "nat"])
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
