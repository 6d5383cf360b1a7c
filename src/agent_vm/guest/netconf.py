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

from agent_vm.guest.files import read_file, write_file

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
    """Apply {"mode": "static"|"dhcp", "mac", "address", "gateway", "dns", "ipv6"}.

    A clone arrives with its template's settings already applied; it then changes only
    what differs (MAC live, address, default route), over rtnetlink rather than with an
    ``ip`` process: every path run for the first time in a new QEMU is translated under
    TCG, so fewer and shorter operations start the sandbox sooner.
    """
    if not _wait_for_interface():
        raise RuntimeError(f"no {INTERFACE}: the VM has no network interface")
    ipv6 = "0" if net.get("ipv6") else "1"
    if read_file(f"/proc/sys/net/ipv6/conf/{INTERFACE}/disable_ipv6").strip() != ipv6:
        write_file(f"/proc/sys/net/ipv6/conf/{INTERFACE}/disable_ipv6", ipv6)
    if net.get("mode") == "static" and _STATE.get("address"):
        commands = []
        if net.get("mac") and net["mac"] != _STATE.get("mac"):
            commands.append(f"link set dev {INTERFACE} address {net['mac']}")
        if net["address"] != _STATE["address"]:
            commands.append(f"addr del {_STATE['address']} dev {INTERFACE}")
            commands.append(f"addr add {net['address']} dev {INTERFACE}")
        if net["gateway"] != _STATE.get("gateway") or net["address"] != _STATE["address"]:
            commands.append(f"route replace default via {net['gateway']}")
        if commands and not _netlink_delta(net):
            _ip_batch(commands)
    else:
        commands = [f"link set dev {INTERFACE} down"]
        if net.get("mac"):
            commands.append(f"link set dev {INTERFACE} address {net['mac']}")
        commands += [f"addr flush dev {INTERFACE}", f"link set dev {INTERFACE} up"]
        if net.get("mode") == "static":
            commands.insert(-1, f"addr add {net['address']} dev {INTERFACE}")
            commands.append(f"route replace default via {net['gateway']}")
        _ip_batch(commands)
    if net.get("mode") == "static":
        if net["dns"] != _STATE.get("dns"):
            write_file("/etc/resolv.conf", f"nameserver {net['dns']}\n")
        _STATE.update({k: net[k] for k in ("mac", "address", "gateway", "dns")})
    elif net.get("mode") == "dhcp":
        _STATE.clear()
        subprocess.run(
            [BUSYBOX, "udhcpc", "-i", INTERFACE, "-s", UDHCPC_SCRIPT, "-q", "-n", "-t", "10"],
            check=True,
            capture_output=True,
        )


# What was last applied, in this process's memory: clones inherit it from the template.
_STATE: dict[str, object] = {}


def remember(net: dict[str, object] | None) -> None:
    """What another process (init, at boot) applied."""
    if net is not None and net.get("mode") == "static":
        _STATE.update({k: net[k] for k in ("mac", "address", "gateway", "dns")})


# rtnetlink, for a clone's few changes without starting a process (~0.1 s under TCG)
RTM_SETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE = 19, 20, 21, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 1, 4, 0x200, 0x400, 0x100
NLMSG_ERROR = 2
IFLA_ADDRESS, IFA_ADDRESS, IFA_LOCAL, RTA_OIF, RTA_GATEWAY = 1, 1, 2, 4, 5


def _attr(kind: int, data: bytes) -> bytes:
    import struct

    body = struct.pack("=HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def _netlink_delta(net: dict[str, object]) -> bool:
    """Apply MAC, address and gateway changes over rtnetlink; False (nothing assumed
    done) if anything is refused, so that the caller falls back to ``ip``."""
    import socket
    import struct

    try:
        index = socket.if_nametoindex(INTERFACE)
        messages = []
        if net.get("mac") and net["mac"] != _STATE.get("mac"):
            mac = bytes.fromhex(str(net["mac"]).replace(":", ""))
            info = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
            messages.append((RTM_SETLINK, 0, info + _attr(IFLA_ADDRESS, mac)))
        if net["address"] != _STATE["address"]:
            # the old address goes first: deleting a subnet's primary address would take
            # a secondary one of the same subnet with it; the default route is re-added
            for kind, flags, cidr in (
                (RTM_DELADDR, 0, _STATE["address"]),
                (RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, net["address"]),
            ):
                address, _, prefix = str(cidr).partition("/")
                raw = socket.inet_aton(address)
                head = struct.pack("=BBBBI", socket.AF_INET, int(prefix or 32), 0, 0, index)
                messages.append(
                    (kind, flags, head + _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw))
                )
        if net["gateway"] != _STATE.get("gateway") or net["address"] != _STATE["address"]:
            head = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
            body = _attr(RTA_GATEWAY, socket.inet_aton(str(net["gateway"])))
            body += _attr(RTA_OIF, struct.pack("=i", index))
            messages.append((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, head + body))
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            for seq, (kind, flags, payload) in enumerate(messages, 1):
                header = struct.pack(
                    "=LHHLL", 16 + len(payload), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0
                )
                sock.send(header + payload)
                reply = sock.recv(65536)
                _length, rtype = struct.unpack("=LH", reply[:6])
                if rtype != NLMSG_ERROR or struct.unpack("=i", reply[16:20])[0] != 0:
                    return False
    except (OSError, ValueError, struct.error):
        return False
    return True


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
