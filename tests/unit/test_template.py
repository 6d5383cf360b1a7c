"""Domain XML rendering (libvirt accepting it is checked in integration tests)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent_vm.core.template import (
    QEMU_NS,
    BootSpec,
    MemoryFile,
    NetworkAttachment,
    NetworkMode,
    ResourceProfile,
    VMTemplate,
    channel_socket_path,
    parse_metadata,
)
from agent_vm.errors import ConfigError
from agent_vm.host.accel import Accel
from agent_vm.protocol.ports import CHANNEL_NAME

BOOT = BootSpec(kernel=Path("/i/vmlinux"), initrd=Path("/i/initrd"), cmdline="console=ttyS0")


def render(**kw: object) -> ET.Element:
    template = VMTemplate(name="t1", boot=BOOT, disk_path=Path("/w/disk.qcow2"), **kw)
    return ET.fromstring(template.generate_xml())


def test_tcg_domain_basics() -> None:
    root = render(resources=ResourceProfile(vcpu=2, memory_mib=768))
    assert root.get("type") == "qemu"
    assert root.findtext("memory") == "768" and root.findtext("vcpu") == "2"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/i/vmlinux"
    assert root.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    assert root.find("features/tcg/tb-cache").text == "128"  # type: ignore[union-attr]
    assert root.findtext("on_crash") == "destroy"
    channel = root.find("devices/channel/target")
    assert channel is not None and channel.get("name") == CHANNEL_NAME
    assert root.find("devices/rng/backend").text == "/dev/urandom"  # type: ignore[union-attr]
    assert root.find("devices/interface") is None  # ISOLATED: no NIC at all


def test_kvm_domain_uses_host_cpu_and_no_tcg_features() -> None:
    root = render(accel=Accel.KVM)
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.find("features/tcg") is None


def test_vsock_channel() -> None:
    root = render(channel="vsock", vsock_cid=42)
    assert root.find("devices/channel") is None
    assert root.find("devices/vsock/cid").get("address") == "42"  # type: ignore[union-attr]
    assert "agentvm.transport=vsock" in (root.findtext("os/cmdline") or "")


def test_metadata_round_trip() -> None:
    template = VMTemplate(
        name="t1", boot=BOOT, disk_path=Path("/d"), metadata={"owner": "agent-vm", "pid": "7"}
    )
    assert parse_metadata(template.generate_xml()) == {"owner": "agent-vm", "pid": "7"}


def test_nat_filtered_interface_has_no_libvirt_filter() -> None:
    """agent-vm writes the filter itself (network/l2filter.py, l3filter.py): libvirt's
    nwfilter instantiation cost ~1 s per VM start."""
    root = render(
        network_mode=NetworkMode.NAT_FILTERED,
        network=NetworkAttachment(network="agentnet", mac="52:54:00:00:00:01", target_dev="agvm-1"),
    )
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == "network"
    assert iface.find("filterref") is None
    assert iface.find("target").get("dev") == "agvm-1"  # type: ignore[union-attr]


def test_modes_need_their_attachment() -> None:
    with pytest.raises(ValueError, match="NAT_FILTERED needs"):
        render(network_mode=NetworkMode.NAT_FILTERED)
    with pytest.raises(ValueError, match="BRIDGE needs"):
        render(network_mode=NetworkMode.BRIDGE)


def test_invalid_names_and_resources_are_rejected() -> None:
    with pytest.raises(ValidationError):
        VMTemplate(name="bad name!", boot=BOOT, disk_path=Path("/d"))
    with pytest.raises(ConfigError, match="memory_mib"):  # users' models: one clear line
        ResourceProfile(memory_mib=16)


def test_presets() -> None:
    assert ResourceProfile.light().memory_mib == 512
    assert ResourceProfile.standard().vcpu == 2
    assert ResourceProfile.intensive().memory_mib == 4096
    with pytest.raises(ValueError, match="unknown profile"):
        ResourceProfile.preset("huge")


def test_channel_socket_path_from_live_xml() -> None:
    xml = (
        "<domain><devices><channel type='unix'><source mode='bind' path='/run/x.sock'/>"
        f"<target type='virtio' name='{CHANNEL_NAME}'/></channel></devices></domain>"
    )
    assert channel_socket_path(xml) == Path("/run/x.sock")
    assert channel_socket_path("<domain><devices/></domain>") is None


@pytest.mark.parametrize(
    ("memory_file", "expected"),
    [
        (MemoryFile(path=Path("/s/g.ram"), shared=True), "share=on"),
        (MemoryFile(path=Path("/s/g.ram"), shared=False), "share=off"),
        (
            MemoryFile(path=Path("/s/g.ram"), shared=False, read_only=True),
            "share=off,readonly=on,rom=off",  # QEMU >= 8.2: a read-only open, writable RAM
        ),
    ],
)
def test_golden_ram_backend_arguments(memory_file: MemoryFile, expected: str) -> None:
    root = render(memory_file=memory_file)
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    backend = next(a for a in args if a and a.startswith("memory-backend-file"))
    assert backend.endswith("mem-path=/s/g.ram," + expected)
