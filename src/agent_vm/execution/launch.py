"""Building a VM: work directory, network interface, overlay, domain, handshake.

Each VM gets a work directory (``<state>/vms/<name>/``) holding its qcow2 overlay, its
console log and snapshot tags. :func:`creating` tracks what a start has made so far and
hands it to the one teardown path if anything fails (or the start is cancelled), so a
failed start leaves nothing behind. Cold boots use :func:`launch_vm`; starts from a golden
state (``golden.py``) reuse the same steps with a different backing disk.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent_vm import timeutil
from agent_vm.asyncutil import finish_in_thread, finish_then_undo
from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.workspace import SHARE_DIR
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import (
    BootSpec,
    MemoryFile,
    NetworkAttachment,
    NetworkMode,
    VMTemplate,
)
from agent_vm.core.vm import VM
from agent_vm.errors import BootTimeout, ChannelError, ConfigError, HandshakeError
from agent_vm.execution.confine import Confinement
from agent_vm.execution.nic import Nic
from agent_vm.execution.running import RunningVM, console_tail, transport_for
from agent_vm.execution.spec import MachineSpec
from agent_vm.execution.teardown import teardown
from agent_vm.host.accel import Accel
from agent_vm.host.identities import Identity
from agent_vm.host.mounts import make_shared_bind
from agent_vm.host.procs import process_start_time
from agent_vm.image.disk import create_overlay as create_qcow2_overlay
from agent_vm.image.store import Image
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.hostnet import random_mac
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.ports import SHARE_STAGING, SHARE_WORKSPACE

log = get_logger(__name__)

OWNER = "agent-vm"


def new_vm_name(prefix: str = "agentvm") -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


async def make_nic(
    spec: MachineSpec, name: str, guard: NetworkGuard | None, policy: EgressPolicy | None
) -> Nic | None:
    """The interface a VM of ``spec`` gets (None for ISOLATED: no device at all)."""
    if spec.network_mode is NetworkMode.ISOLATED:
        return None
    if spec.network_mode is NetworkMode.BRIDGE:
        if not spec.bridge:
            raise ConfigError("BRIDGE mode needs the name of a host bridge")
        mac = random_mac()
        return Nic(NetworkAttachment(bridge=spec.bridge, mac=mac), {"mode": "dhcp", "mac": mac})
    if guard is None:
        raise ConfigError("NAT_FILTERED needs the runtime's network guard")
    vm_network = await guard.attach(name, policy)
    addressing = vm_network.addressing
    guest: dict[str, object] = {
        "mode": "static",
        "mac": addressing.mac,
        "address": addressing.cidr,
        "gateway": str(addressing.gateway),
        "dns": str(addressing.gateway),
        "ipv6": vm_network.policy.allow_ipv6,
    }
    return Nic(vm_network.attachment(), guest, vm_network)


def build_template(
    *,
    name: str,
    image: Image,
    workdir: Path,
    spec: MachineSpec,
    nic: Nic | None = None,
    memory_file: MemoryFile | None = None,
    incoming: bool = False,
    identity: Identity | None = None,
    boot_files: tuple[Path, Path] | None = None,
) -> VMTemplate:
    cmdline = f"{image.cmdline} agentvm.hostname={name}"
    if nic is not None:
        cmdline += f" agentvm.net={nic.cmdline}"
    kernel, initrd = boot_files or (image.kernel, image.initrd)
    return VMTemplate(
        name=name,
        boot=BootSpec(kernel=kernel, initrd=initrd, cmdline=cmdline),
        disk_path=workdir / "disk.qcow2",
        resources=spec.profile,
        accel=spec.accel,
        network_mode=spec.network_mode,
        network=nic.attachment if nic is not None else NetworkAttachment(),
        channel=spec.channel,
        console_log=workdir / "console.log",
        memory_file=memory_file,
        incoming=incoming,
        dac_label=identity.label if identity is not None else None,
        share_dir=workdir / SHARE_DIR,
        metadata={
            "owner": OWNER,
            "pid": str(os.getpid()),
            "pid_start": process_start_time(os.getpid()),
            "workdir": str(workdir),
            "image": f"{image.name}/{image.key}",
            "created": timeutil.isoformat(),
        },
    )


@dataclass
class Held:
    """What a VM being created holds so far, for clean-up if creation fails."""

    workdir: Path
    guard: NetworkGuard | None = None
    vm: VM | None = None
    agent: AgentChannel | None = None
    nic: Nic | None = None
    made_workdir: bool = False
    confinement: Confinement | None = None
    identity: Identity | None = None

    @property
    def name(self) -> str:
        return self.workdir.name

    async def discard(self) -> None:
        await teardown(
            self.name,
            vm=self.vm,
            workdir=self.workdir if self.made_workdir else None,
            guard=self.guard,
            channel=self.agent,
            identity=self.identity,
        )


@asynccontextmanager
async def creating(
    vms_dir: Path, name: str, guard: NetworkGuard | None, confinement: Confinement | None = None
) -> AsyncIterator[Held]:
    """A fresh work directory; on any failure inside, everything made so far is removed."""
    held = Held(vms_dir / name, guard, confinement=confinement)
    try:
        await finish_in_thread(_make_workdir, vms_dir, held.workdir)
        held.made_workdir = True
        yield held
    except BaseException:
        await held.discard()
        raise


def create_overlay(
    backing: Path, overlay: Path, identity: Identity | None, size_gib: int | None = None
) -> None:
    """The VM's overlay, owned by its QEMU's user and by nobody else (0600); its size is
    the cap on what the guest can write to the host's disk."""
    create_qcow2_overlay(backing, overlay, size_gib)
    if identity is not None:
        os.chown(overlay, identity.uid, identity.gid)
        overlay.chmod(0o600)


def link_overlay(disk: Path, overlay: Path, identity: Identity | None) -> None:
    """An overlay kept from before (a paused sandbox's), linked in: if the start fails,
    removing the work directory leaves the kept one whole."""
    os.link(disk, overlay)
    if identity is not None:
        os.chown(overlay, identity.uid, identity.gid)


def _make_workdir(vms_dir: Path, workdir: Path) -> None:
    vms_dir.mkdir(parents=True, exist_ok=True)
    vms_dir.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the overlay
    workdir.mkdir(mode=0o755)


def make_share(workdir: Path, identity: Identity | None) -> None:
    """The VM's 9p export: root's and not writable by QEMU (a guest mounting it with no
    workspace attached can fill nothing), traversable only by this VM's QEMU (group), a
    shared mount so that a workspace mounted on ``ws`` later reaches QEMU's own mount
    namespace."""
    share = workdir / SHARE_DIR
    share.mkdir(mode=0o750)
    (share / SHARE_WORKSPACE).mkdir(mode=0o755)
    (share / SHARE_STAGING).mkdir(mode=0o755)
    if identity is not None:
        os.chown(share, 0, identity.gid)
    else:
        share.chmod(0o755)  # QEMU runs as libvirt-qemu (other)
    make_shared_bind(share)


async def define_vm(
    connection: LibvirtConnection,
    image: Image,
    spec: MachineSpec,
    held: Held,
    *,
    backing_disk: Path,
    policy: EgressPolicy | None = None,
    memory_file: MemoryFile | None = None,
    incoming: bool = False,
    disk: Path | None = None,
) -> VM:
    """Identity, network interface, overlay on ``backing_disk`` (the VM's own; or
    ``disk``, an overlay kept from before, linked in), libvirt definition (not started)."""
    confinement = held.confinement
    if confinement is not None:

        async def release(identity: Identity) -> None:
            identity.release()

        held.identity = await finish_then_undo(lambda: confinement.allocate(held.name), release)
    held.nic = await make_nic(spec, held.name, held.guard, policy)
    template = build_template(
        name=held.name,
        image=image,
        workdir=held.workdir,
        spec=spec,
        nic=held.nic,
        memory_file=memory_file,
        incoming=incoming,
        identity=held.identity,
        boot_files=confinement.boot_files(image) if confinement is not None else None,
    )
    disk_gib = max(spec.profile.disk_gib, image.min_disk_gib)  # never below its file system
    if disk is not None:
        await finish_in_thread(link_overlay, disk, template.disk_path, held.identity)
    else:
        await finish_in_thread(
            create_overlay, backing_disk, template.disk_path, held.identity, disk_gib
        )
    await finish_in_thread(make_share, held.workdir, held.identity)
    xml = template.generate_xml()

    async def keep_for_cleanup(vm: VM) -> None:
        held.vm = vm  # defined after all: the clean-up must destroy it

    held.vm = await finish_then_undo(lambda: VM.define(connection, xml), keep_for_cleanup)
    return held.vm


async def start_limited(vm: VM, spec: MachineSpec) -> None:
    """Start the domain, then cap its host memory before the guest has used much."""
    await finish_in_thread(vm.start)
    memory = spec.profile.host_memory_mib(tcg=spec.accel is Accel.TCG)
    if memory is not None:
        await asyncio.to_thread(vm.limit_memory, memory)


async def connect_agent(held: Held, timeout: float) -> AgentChannel:
    """Handshake with the guest agent; a failure carries the console's last lines."""
    if held.vm is None:
        raise ConfigError("connect_agent needs a defined and started VM")
    held.agent = AgentChannel(await asyncio.to_thread(transport_for, held.vm), name=held.vm.name)
    try:
        await held.agent.connect(timeout)
    except ChannelError as exc:
        console = console_tail(held.workdir / "console.log", 20)
        kind = HandshakeError if isinstance(exc, HandshakeError) else ChannelError
        raise kind(
            f"{held.vm.name} did not become ready: {exc.message}"
            + (f"\nconsole log (last lines):\n{console}" if console else ""),
            hint=exc.hint,
        ) from exc
    return held.agent


async def wait_settled(agent: AgentChannel, timeout: float) -> None:
    """Wait for init's late start-up work (modules, power button, network settings)."""
    deadline = time.monotonic() + timeout
    # one PING may take long on a very slow guest (TCG inside TCG: >5 s): the deadline rules
    while not (await agent.ping(timeout=max(5.0, deadline - time.monotonic()))).settled:
        if time.monotonic() > deadline:
            raise BootTimeout(
                f"{agent.name} did not settle within {timeout:.0f} s",
                hint="the guest is very slow or its init failed; see its console log",
            )
        await asyncio.sleep(0.05)


async def launch_vm(
    connection: LibvirtConnection,
    image: Image,
    spec: MachineSpec,
    *,
    vms_dir: Path,
    guard: NetworkGuard | None = None,
    policy: EgressPolicy | None = None,
    name: str | None = None,
    boot_timeout: float = 60.0,
    memory_file: MemoryFile | None = None,
    confinement: Confinement | None = None,
) -> RunningVM:
    """Cold boot: overlay, define, start, handshake. On any failure nothing is left behind.

    NAT_FILTERED (the default mode) needs ``guard``; ``policy`` defaults to EgressPolicy().
    """
    started = time.monotonic()
    async with creating(vms_dir, name or new_vm_name(), guard, confinement) as held:
        vm = await define_vm(
            connection, image, spec, held, backing_disk=image.disk, policy=policy,
            memory_file=memory_file,
        )  # fmt: skip
        await start_limited(vm, spec)
        pid = await asyncio.to_thread(vm.qemu_pid)
        agent = await connect_agent(held, boot_timeout)
        if held.nic is not None:  # the guest configures its interface in late start-up
            await wait_settled(agent, boot_timeout)
        running = RunningVM(
            vm, held.workdir, image, agent, time.monotonic() - started, held.nic, guard, pid,
            held.identity, spec,
        )  # fmt: skip
        log.info("vm_ready", vm=vm.name, seconds=round(running.boot_seconds, 3))
        return running
