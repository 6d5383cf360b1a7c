"""Make bridged traffic visible to iptables, which libvirt's nwfilter layer-3 rules need.

Without ``br_netfilter`` and ``bridge-nf-call-iptables=1`` frames crossing the bridge
(VM to VM, VM to gateway) bypass iptables entirely and those rules silently do nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent_vm.errors import HostError

SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


def ensure_bridge_netfilter(proc: Path = Path("/proc/sys/net/bridge")) -> list[str]:
    """Load br_netfilter if needed and switch the sysctls on; returns what was changed."""
    changed = []
    if not proc.is_dir():
        result = subprocess.run(["modprobe", "br_netfilter"], capture_output=True, text=True)
        if result.returncode != 0 or not proc.is_dir():
            raise HostError(
                "br_netfilter is not available: egress filters would not see bridged traffic",
                hint="load the br_netfilter kernel module (modprobe br_netfilter)",
            )
        changed.append("loaded br_netfilter")
    for name in SYSCTLS:
        path = proc / name
        if path.read_text().strip() != "1":
            path.write_text("1")
            changed.append(f"net.bridge.{name}=1")
    return changed
