"""The virtual hardware of a VM, and how users name it.

``MachineSpec`` has no default accelerator on purpose: a spec that silently said TCG
made pools emulate every instruction on KVM hosts. Specs come from
:meth:`agent_vm.execution.runtime.Runtime.spec`, which resolved the accelerator once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from agent_vm.core.template import NetworkMode, ResourceProfile
from agent_vm.errors import ConfigError
from agent_vm.host.accel import Accel


class MachineSpec(BaseModel):
    """The virtual hardware of a VM; golden states are keyed on it (with the image)."""

    model_config = ConfigDict(frozen=True)

    profile: ResourceProfile = ResourceProfile()
    accel: Accel  # no default (see the module docstring); field order keeps golden digests
    network_mode: NetworkMode = NetworkMode.NAT_FILTERED
    bridge: str | None = None  # host bridge for BRIDGE mode
    channel: Literal["virtio-serial", "vsock"] = "virtio-serial"


NetworkChoice = str | NetworkMode


def parse_network(choice: NetworkChoice) -> tuple[NetworkMode, str | None]:
    """ "nat" (default), "isolated", "bridge:NAME" or a NetworkMode -> (mode, bridge)."""
    if isinstance(choice, NetworkMode):
        if choice is NetworkMode.BRIDGE:
            raise ConfigError("BRIDGE needs the bridge's name: pass network='bridge:NAME'")
        return choice, None
    mode, _, bridge = choice.partition(":")
    if mode in ("nat", "nat_filtered") and not bridge:
        return NetworkMode.NAT_FILTERED, None
    if mode == "isolated" and not bridge:
        return NetworkMode.ISOLATED, None
    if mode == "bridge" and bridge:
        return NetworkMode.BRIDGE, bridge
    raise ConfigError(f"network must be nat, isolated or bridge:NAME, not {choice!r}")
