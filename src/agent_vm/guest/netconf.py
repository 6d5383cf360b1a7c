"""Network settings inside the guest (standard library only).

Static settings come from the host (it reserved the address); one ``ip -batch`` process
applies them, since every extra process costs tens of milliseconds under TCG. BRIDGE
mode uses DHCP on the user's network through busybox's udhcpc. IPv6 is switched off on
the interface unless the policy allows it (the host filter drops it either way).
"""

from __future__ import annotations

import os
import subprocess
import time

from agent_vm.guest.files import write_file

INTERFACE = "eth0"
BUSYBOX = "/opt/agent-vm/bin/busybox"
UDHCPC_SCRIPT = "/opt/agent-vm/bin/udhcpc.sh"


def _wait_for_interface(timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"/sys/class/net/{INTERFACE}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def apply(net: dict[str, object]) -> None:
    """Apply {"mode": "static"|"dhcp", "mac", "address", "gateway", "dns", "ipv6"}."""
    if not _wait_for_interface():
        raise RuntimeError(f"no {INTERFACE}: the VM has no network interface")
    ipv6 = "0" if net.get("ipv6") else "1"
    write_file(f"/proc/sys/net/ipv6/conf/{INTERFACE}/disable_ipv6", ipv6)
    commands = [f"link set dev {INTERFACE} down"]
    if net.get("mac"):
        commands.append(f"link set dev {INTERFACE} address {net['mac']}")
    commands += [f"addr flush dev {INTERFACE}", f"link set dev {INTERFACE} up"]
    if net.get("mode") == "static":
        commands.insert(-1, f"addr add {net['address']} dev {INTERFACE}")
        commands.append(f"route replace default via {net['gateway']}")
    _ip_batch(commands)
    if net.get("mode") == "static":
        write_file("/etc/resolv.conf", f"nameserver {net['dns']}\n")
    elif net.get("mode") == "dhcp":
        subprocess.run(
            [BUSYBOX, "udhcpc", "-i", INTERFACE, "-s", UDHCPC_SCRIPT, "-q", "-n", "-t", "10"],
            check=True,
            capture_output=True,
        )


def _ip_batch(commands: list[str]) -> None:
    proc = subprocess.run(
        ["ip", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {proc.stderr.strip()}")


def from_cmdline(value: str) -> dict[str, object] | None:
    """``agentvm.net=static,MAC,CIDR,GATEWAY,DNS,IPV6`` or ``agentvm.net=dhcp,MAC``."""
    parts = value.split(",")
    if parts[0] == "static" and len(parts) == 6:
        _, mac, address, gateway, dns, ipv6 = parts
        return {
            "mode": "static",
            "mac": mac,
            "address": address,
            "gateway": gateway,
            "dns": dns,
            "ipv6": ipv6 == "1",
        }
    if parts[0] == "dhcp" and len(parts) == 2:
        return {"mode": "dhcp", "mac": parts[1], "ipv6": False}
    return None


def udhcpc_script() -> str:
    """udhcpc calls this with the lease in its environment."""
    return """#!/bin/sh
# agent-vm: apply a DHCP lease (BRIDGE mode)
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}"
    [ -n "$dns" ] && { for s in $dns; do echo "nameserver $s"; done > /etc/resolv.conf; }
    ;;
esac
exit 0
"""
