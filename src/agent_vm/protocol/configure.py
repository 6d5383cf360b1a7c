"""CONFIGURE: what makes a clone of a golden state a sandbox of its own (clock, entropy,
hostname, machine-id, network settings), checked on both sides. Standard library only
(the guest imports this module)."""

from __future__ import annotations

from agent_vm.errors import ProtocolError
from agent_vm.protocol.messages import JsonMessage, _check_only, _field, _loads

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs guest boot time
if TYPE_CHECKING:
    pass


class Configure(JsonMessage):
    """What makes a VM started from a golden state distinct from its siblings.

    Clones share the template's memory: its clock, RNG state, hostname and machine-id.
    """

    __slots__ = ("entropy", "hostname", "machine_id", "net", "time_ns")

    def __init__(
        self,
        time_ns: int,
        entropy: str = "",
        hostname: str | None = None,
        machine_id: str | None = None,
        net: dict[str, object] | None = None,
    ) -> None:
        self.time_ns = time_ns
        self.entropy = entropy  # hex
        self.hostname = hostname
        self.machine_id = machine_id
        self.net = net  # see _check_net
        if net is not None:
            _check_net(net)
        if not 0 < time_ns < 2**63:
            raise ProtocolError("time_ns out of range")
        if len(entropy) > 1024 or any(c not in "0123456789abcdef" for c in entropy):
            raise ProtocolError("entropy must be at most 512 bytes of lower-case hex")
        if hostname is not None and not _is_hostname(hostname):
            raise ProtocolError("invalid hostname")
        if machine_id is not None and (
            len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id)
        ):
            raise ProtocolError("machine_id must be 32 lower-case hex digits")

    @classmethod
    def from_payload(cls, payload: bytes) -> Configure:
        data = _loads(payload)
        _check_only(data, {"time_ns", "entropy", "hostname", "machine_id", "net"})
        return cls(
            time_ns=_field(data, "time_ns", (int,)),
            entropy=_field(data, "entropy", (str,), ""),
            hostname=_field(data, "hostname", (str, type(None)), None),
            machine_id=_field(data, "machine_id", (str, type(None)), None),
            net=_field(data, "net", (dict, type(None)), None),
        )


def _is_ipv4(text: object, prefix: bool = False) -> bool:
    if not isinstance(text, str):
        return False
    address, _, length = text.partition("/") if prefix else (text, "", "")
    if prefix and not (length.isdigit() and 0 < int(length) <= 32):
        return False
    parts = address.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)


def _check_net(net: dict[str, object]) -> None:
    """{"mode": "static", "mac", "address" (CIDR), "gateway", "dns", "ipv6"} or
    {"mode": "dhcp", "mac", "ipv6"}: values end up on an ``ip`` command line, so they are
    checked character by character."""
    allowed = {"mode", "mac", "address", "gateway", "dns", "ipv6"}
    if set(net) - allowed:
        raise ProtocolError(f"unknown net fields {sorted(set(net) - allowed)}")
    mac = net.get("mac")
    if not isinstance(mac, str) or len(mac) != 17 or any(c not in "0123456789abcdef:" for c in mac):
        raise ProtocolError("net.mac must be a lower-case MAC address")
    if not isinstance(net.get("ipv6", False), bool):
        raise ProtocolError("net.ipv6 must be a boolean")
    mode = net.get("mode")
    if mode == "static":
        if not (
            _is_ipv4(net.get("address"), prefix=True)
            and _is_ipv4(net.get("gateway"))
            and _is_ipv4(net.get("dns"))
        ):
            raise ProtocolError("static net needs address (CIDR), gateway and dns as IPv4")
    elif mode != "dhcp":
        raise ProtocolError("net.mode must be static or dhcp")


def _is_hostname(name: str) -> bool:
    allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."
    return 0 < len(name) <= 63 and name[0] != "-" and all(c in allowed for c in name)
