"""libvirt accepts every domain XML variant we render (checked by libvirt itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import (
    BootSpec,
    NetworkAttachment,
    NetworkMode,
    ResourceProfile,
    VMTemplate,
)
from agent_vm.core.vm import VM
from agent_vm.errors import VMError
from agent_vm.host.accel import Accel
from agent_vm.image.store import Image


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"resources": ResourceProfile.standard()},
        {"accel": Accel.KVM},
        {"channel": "vsock", "vsock_cid": 77},
        {"network_mode": NetworkMode.NAT_FILTERED, "network": NetworkAttachment(network="x")},
        {"network_mode": NetworkMode.BRIDGE, "network": NetworkAttachment(bridge="br0")},
    ],
    ids=["isolated", "standard", "kvm", "vsock", "nat", "bridge"],
)
def test_libvirt_accepts_rendered_xml(
    connection: LibvirtConnection, image: Image, variant: dict[str, object], tmp_path: Path
) -> None:
    template = VMTemplate(
        name=f"agentvm-xmltest-{len(variant)}-{abs(hash(str(variant))) % 10000}",
        boot=BootSpec(kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline),
        disk_path=tmp_path / "disk.qcow2",
        console_log=tmp_path / "console.log",
        metadata={"owner": "agent-vm-xml-test"},
        **variant,
    )
    vm = VM.define(connection, template.generate_xml())
    try:
        assert vm.metadata() == {"owner": "agent-vm-xml-test"}
    finally:
        vm.undefine()


def test_invalid_xml_is_a_vm_error(connection: LibvirtConnection) -> None:
    with pytest.raises(VMError, match="libvirt refused"):
        VM.define(connection, "<domain type='qemu'><name>x</name></domain>")
