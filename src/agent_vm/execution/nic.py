"""A VM's network interface: what the launch wires, what a running VM keeps (its own
module, so that the two need not import each other)."""

from __future__ import annotations

from dataclasses import dataclass

from agent_vm.core.template import NetworkAttachment
from agent_vm.network.vmnet import VMNetwork


@dataclass(frozen=True)
class Nic:
    """A VM's network interface: how libvirt wires it, and what the guest configures."""

    attachment: NetworkAttachment
    guest: dict[str, object]  # CONFIGURE's ``net``
    vm_network: VMNetwork | None = None  # NAT_FILTERED: the guard's record

    @property
    def cmdline(self) -> str:
        g = self.guest
        if g["mode"] == "static":
            ipv6 = "1" if g.get("ipv6") else "0"
            return f"static,{g['mac']},{g['address']},{g['gateway']},{g['dns']},{ipv6}"
        return f"dhcp,{g['mac']}"
