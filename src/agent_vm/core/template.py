"""Domain XML from typed configuration.

Choices that are not libvirt defaults, and why:

* q35 rather than microvm: microvm has no HPET or ACPI PM timer, and under TCG the
  kernel's TSC calibration against the PIT sometimes fails there and the boot hangs
  (seen in 2 of ~120 boots); q35 costs ~0.1 s more per boot and has both timers.
* Direct kernel boot of an uncompressed ``vmlinux`` through PVH: no firmware, no
  in-guest decompression (see :mod:`agent_vm.image.kernel`).
* ``<cpu mode='maximum'/>`` under TCG and a virtio-rng device: with the default qemu64
  model and no RNG, boots stalled for minutes waiting for entropy and Python ran 3x slower.
* A bounded TCG translation cache: QEMU's default is 1 GiB per guest.
* ``on_crash``/``on_reboot`` destroy: a guest that panics or reboots is gone, not looping.
* Disk ``cache='unsafe'``: the overlay is thrown away with the VM, so flushes buy nothing.
* One virtio-9p share from the start (see ``_share``): a VM started before anyone knew
  its workspace (pooled, golden-cloned) gets it later by a mount inside the export.
* Metadata in our own namespace marks the domain as agent-vm's, with the owning process
  and work directory, so leftovers of a crashed process can be found and reaped.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_vm.errors import ConfigError
from agent_vm.host.accel import Accel
from agent_vm.models import Model
from agent_vm.protocol.ports import CHANNEL_NAME, SHARE_TAG, VSOCK_CMDLINE_FLAG

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RAM_BACKEND_ID = "agentvm-ram"
CPU_PERIOD_US = 100_000
METADATA_URI = "urn:agent-vm:domain:1"
METADATA_KEY = "agentvm"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

ET.register_namespace(METADATA_KEY, METADATA_URI)
ET.register_namespace("qemu", QEMU_NS)


class NetworkMode(enum.StrEnum):
    NAT_FILTERED = "nat_filtered"  # internet through the project's filtered NAT network
    ISOLATED = "isolated"  # no network device at all
    BRIDGE = "bridge"  # attached to a host bridge the user names


class ResourceProfile(Model):
    """CPU, memory and disk of a VM, and the limits the host holds it to.

    Presets: ``light``, ``standard``, ``intensive``. The limits (``LIMITS``) are enforced
    outside the guest: host CPU through the domain's cgroup (``cpu_cores`` of host CPU for
    all of QEMU; default: as many as it has vCPUs), host memory including QEMU's own
    (guest RAM + TCG translation cache + ``memory_overhead_mib``), disk throughput in QEMU,
    the disk's size by its virtual size; and one inside it: at most ``pids_max`` processes
    per command. ``None`` lifts a limit. They are not part of a golden state's key.
    """

    model_config = ConfigDict(frozen=True)

    vcpu: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=512, ge=128, le=1024 * 1024)
    tb_cache_mib: int = Field(default=128, ge=16, le=4096, description="TCG only")
    disk_gib: int = Field(default=2, ge=2, le=16384, description="root disk: grows the file system")
    cpu_cores: float | None = Field(default=0.0, ge=0.0, le=1024.0, description="0: its vCPUs")
    memory_overhead_mib: int | None = Field(default=256, ge=64, le=1024 * 1024)
    disk_mbps: int | None = Field(default=200, ge=1, le=100_000)
    disk_iops: int | None = Field(default=5000, ge=10, le=10_000_000)
    pids_max: int | None = Field(default=4096, ge=16, le=4_194_304)

    LIMITS: ClassVar[frozenset[str]] = frozenset(
        {"cpu_cores", "memory_overhead_mib", "disk_mbps", "disk_iops", "pids_max"}
    )

    def host_cpu_cores(self) -> float | None:
        """Host CPU the whole VM may use (None: unlimited)."""
        if self.cpu_cores is None:
            return None
        return self.cpu_cores or float(self.vcpu)

    def host_memory_mib(self, tcg: bool) -> int | None:
        """The host memory cap of the VM's QEMU (None: none)."""
        if self.memory_overhead_mib is None:
            return None
        return self.memory_mib + (self.tb_cache_mib if tcg else 0) + self.memory_overhead_mib

    def unlimited(self) -> ResourceProfile:
        """The same hardware without the host's limits (benchmarks measure their cost)."""
        return self.model_copy(update=dict.fromkeys(self.LIMITS))

    PRESETS: ClassVar[dict[str, tuple[int, int]]] = {
        "light": (1, 512),
        "standard": (2, 1024),
        "intensive": (4, 4096),
    }

    @classmethod
    def preset(cls, name: str) -> ResourceProfile:
        try:
            vcpu, memory = cls.PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown profile {name!r}; choose one of {sorted(cls.PRESETS)}"
            ) from None
        return cls(vcpu=vcpu, memory_mib=memory)

    @classmethod
    def light(cls) -> ResourceProfile:
        return cls.preset("light")

    @classmethod
    def standard(cls) -> ResourceProfile:
        return cls.preset("standard")

    @classmethod
    def intensive(cls) -> ResourceProfile:
        return cls.preset("intensive")


class BootSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    kernel: Path
    initrd: Path
    cmdline: str


class NetworkAttachment(BaseModel):
    """How the NIC is wired; rendered only for NAT_FILTERED and BRIDGE."""

    model_config = ConfigDict(frozen=True)

    network: str | None = None  # libvirt network name (NAT_FILTERED)
    bridge: str | None = None  # host bridge (BRIDGE)
    mac: str | None = None
    target_dev: str | None = None  # host-side tap name


class MemoryFile(BaseModel):
    """Guest RAM backed by a file, for golden-state templates and their clones.

    The template maps it shared, so the file holds its RAM once it is paused; each clone
    maps it private, i.e. copy-on-write: clones start with the template's memory and share
    every page they do not write. libvirt 9.0 cannot point guest RAM at a file of our
    choosing, so this is rendered as QEMU arguments (``-machine memory-backend=`` replaces
    libvirt's own backend, which then stays unused).
    """

    model_config = ConfigDict(frozen=True)

    path: Path
    shared: bool
    read_only: bool = Field(
        default=False,
        description="open the file read-only, the RAM still writable (private mappings, "
        "QEMU >= 8.2: readonly=on,rom=off); QEMU would otherwise need write access to it",
    )


class VMTemplate(BaseModel):
    """Everything needed to define one VM."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    boot: BootSpec
    disk_path: Path
    resources: ResourceProfile = ResourceProfile()
    accel: Accel = Accel.TCG
    network_mode: NetworkMode = NetworkMode.ISOLATED
    network: NetworkAttachment = NetworkAttachment()
    channel: Literal["virtio-serial", "vsock"] = "virtio-serial"
    vsock_cid: int | None = Field(default=None, ge=3)
    console_log: Path | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    memory_file: MemoryFile | None = None
    incoming: bool = Field(
        default=False, description="start paused, waiting for migrated state (-incoming defer)"
    )
    share_dir: Path | None = Field(
        default=None,
        description="export this directory as the guest's 9p share (tag SHARE_TAG); "
        "a workspace is mounted inside it later, while the VM runs",
    )
    dac_label: str | None = Field(
        default=None,
        description="run QEMU as this uid:gid (libvirt '+uid:+gid'); disks are "
        "not relabelled (the overlay is the VM's already, backing files stay root's)",
    )

    def generate_xml(self) -> str:
        domain = ET.Element("domain", type=self.accel.domain_type)
        ET.SubElement(domain, "name").text = self.name
        self._metadata(domain)
        ET.SubElement(domain, "memory", unit="MiB").text = str(self.resources.memory_mib)
        self._limits(domain)
        ET.SubElement(domain, "vcpu").text = str(self.resources.vcpu)
        self._os(domain)
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        if self.accel is Accel.TCG:
            tcg = ET.SubElement(features, "tcg")
            ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(self.resources.tb_cache_mib)
            ET.SubElement(domain, "cpu", mode="maximum", check="none")
        else:
            ET.SubElement(domain, "cpu", mode="host-passthrough", check="none")
        ET.SubElement(domain, "clock", offset="utc")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(domain, event).text = "destroy"
        self._devices(domain)
        if self.dac_label is not None:
            seclabel = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="yes")
            ET.SubElement(seclabel, "label").text = self.dac_label
        self._qemu_arguments(domain)
        ET.indent(domain)
        return ET.tostring(domain, encoding="unicode")

    def _limits(self, domain: ET.Element) -> None:
        """The host CPU cap through the domain's cgroup. (The memory cap is set on the
        running domain, ``VM.limit_memory``: with ``<memtune>`` libvirt also raises the
        locked-memory rlimit, which needs CAP_SYS_RESOURCE that some hosts withhold.)"""
        cores = self.resources.host_cpu_cores()
        if cores is not None:
            cputune = ET.SubElement(domain, "cputune")
            ET.SubElement(cputune, "global_period").text = str(CPU_PERIOD_US)
            ET.SubElement(cputune, "global_quota").text = str(int(cores * CPU_PERIOD_US))

    def _qemu_arguments(self, domain: ET.Element) -> None:
        args: list[str] = []
        if self.memory_file is not None:
            share = "on" if self.memory_file.shared else "off"
            read_only = ",readonly=on,rom=off" if self.memory_file.read_only else ""
            args += [
                "-object",
                f"memory-backend-file,id={RAM_BACKEND_ID},size={self.resources.memory_mib}M,"
                f"mem-path={self.memory_file.path},share={share}{read_only}",
                "-machine",
                f"memory-backend={RAM_BACKEND_ID}",
            ]
        if self.incoming:
            args += ["-incoming", "defer"]
        if args:
            commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
            for arg in args:
                ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)

    def _metadata(self, domain: ET.Element) -> None:
        meta = ET.SubElement(domain, "metadata")
        ours = ET.SubElement(meta, f"{{{METADATA_URI}}}vm")
        for key, value in sorted(self.metadata.items()):
            ET.SubElement(ours, f"{{{METADATA_URI}}}{key}").text = value

    def _os(self, domain: ET.Element) -> None:
        os_el = ET.SubElement(domain, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
        ET.SubElement(os_el, "kernel").text = str(self.boot.kernel)
        ET.SubElement(os_el, "initrd").text = str(self.boot.initrd)
        cmdline = self.boot.cmdline
        if self.channel == "vsock":
            cmdline += f" {VSOCK_CMDLINE_FLAG}"
        ET.SubElement(os_el, "cmdline").text = cmdline

    def _devices(self, domain: ET.Element) -> None:
        devices = ET.SubElement(domain, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
        source = ET.SubElement(disk, "source", file=str(self.disk_path))
        self._iotune(disk)
        if self.dac_label is not None:  # the whole backing chain: never chowned by libvirt
            ET.SubElement(source, "seclabel", model="dac", relabel="no")
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        ET.SubElement(devices, "controller", type="usb", model="none")
        ET.SubElement(devices, "memballoon", model="none")
        if self.channel == "virtio-serial":
            channel = ET.SubElement(devices, "channel", type="unix")
            ET.SubElement(channel, "source", mode="bind")  # libvirt picks a labelled path
            ET.SubElement(channel, "target", type="virtio", name=CHANNEL_NAME)
        else:
            vsock = ET.SubElement(devices, "vsock", model="virtio")
            if self.vsock_cid is None:
                ET.SubElement(vsock, "cid", auto="yes")
            else:
                ET.SubElement(vsock, "cid", auto="no", address=str(self.vsock_cid))
        rng = ET.SubElement(devices, "rng", model="virtio")
        ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
        if self.console_log is not None:
            serial = ET.SubElement(devices, "serial", type="file")
            ET.SubElement(serial, "source", path=str(self.console_log), append="off")
            ET.SubElement(serial, "target", port="0")
        else:
            serial = ET.SubElement(devices, "serial", type="null")
            ET.SubElement(serial, "target", port="0")
        self._share(devices)
        self._interface(devices)

    def _share(self, devices: ET.Element) -> None:
        """virtio-9p in QEMU's ``mapped`` model: what the guest sets as owner, mode,
        setuid bits or device type is kept in xattrs, never applied to host files, which
        QEMU creates 0644/0755 as its own user (the idmapped workspace mount turns that
        into the workspace's owner). ``multidevs=remap``: the workspace is a mount below
        the export, and inode numbers of the two file systems must not collide."""
        if self.share_dir is None:
            return
        fs = ET.SubElement(
            devices, "filesystem", type="mount", accessmode="mapped",
            fmode="0644", dmode="0755", multidevs="remap",
        )  # fmt: skip
        ET.SubElement(fs, "driver", type="path")
        ET.SubElement(fs, "source", dir=str(self.share_dir))
        ET.SubElement(fs, "target", dir=SHARE_TAG)

    def _iotune(self, disk: ET.Element) -> None:
        """Disk throughput limits, enforced by QEMU itself (no cgroup needed)."""
        profile = self.resources
        if profile.disk_mbps is None and profile.disk_iops is None:
            return
        iotune = ET.SubElement(disk, "iotune")
        if profile.disk_mbps is not None:
            ET.SubElement(iotune, "total_bytes_sec").text = str(profile.disk_mbps * 1_000_000)
        if profile.disk_iops is not None:
            ET.SubElement(iotune, "total_iops_sec").text = str(profile.disk_iops)

    def _interface(self, devices: ET.Element) -> None:
        if self.network_mode is NetworkMode.ISOLATED:
            return
        net = self.network
        if self.network_mode is NetworkMode.NAT_FILTERED:
            if not net.network:
                raise ConfigError("NAT_FILTERED needs network.network (the libvirt network name)")
            iface = ET.SubElement(devices, "interface", type="network")
            ET.SubElement(iface, "source", network=net.network)
        else:
            if not net.bridge:
                raise ConfigError("BRIDGE needs network.bridge (the host bridge name)")
            iface = ET.SubElement(devices, "interface", type="bridge")
            ET.SubElement(iface, "source", bridge=net.bridge)
        if net.mac:
            ET.SubElement(iface, "mac", address=net.mac)
        if net.target_dev:
            ET.SubElement(iface, "target", dev=net.target_dev)
        ET.SubElement(iface, "model", type="virtio")


def parse_metadata(domain_xml: str) -> dict[str, str]:
    """Our metadata from a domain's XML ({} if the domain is not agent-vm's)."""
    root = ET.fromstring(domain_xml)
    ours = root.find(f"metadata/{{{METADATA_URI}}}vm")
    if ours is None:
        return {}
    prefix = f"{{{METADATA_URI}}}"
    return {child.tag.removeprefix(prefix): child.text or "" for child in ours}


def channel_socket_path(domain_xml: str) -> Path | None:
    """Where libvirt put the control channel's unix socket (changes on every start)."""
    root = ET.fromstring(domain_xml)
    for channel in root.findall("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if target is not None and target.get("name") == CHANNEL_NAME and source is not None:
            path = source.get("path")
            return Path(path) if path else None
    return None


def vsock_cid(domain_xml: str) -> int | None:
    root = ET.fromstring(domain_xml)
    cid = root.find("devices/vsock/cid")
    if cid is None or cid.get("address") is None:
        return None
    return int(cid.get("address", "0"))
