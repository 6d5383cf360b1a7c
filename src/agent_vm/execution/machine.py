"""A booted VM with a connected agent, and how to get one from an image.

Each VM gets a work directory (``<state>/vms/<name>/``) holding its qcow2 overlay, its
console log and snapshot tags; closing the VM removes the domain and the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from agent_vm import timeutil
from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.transport import Transport, UnixTransport, VsockTransport
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import (
    BootSpec,
    MemoryFile,
    NetworkAttachment,
    NetworkMode,
    ResourceProfile,
    VMTemplate,
    channel_socket_path,
    vsock_cid,
)
from agent_vm.core.vm import VM, VMState
from agent_vm.errors import AgentVMError, ChannelError, ConfigError, VMDiedError, VMError
from agent_vm.host.accel import Accel
from agent_vm.image.disk import create_overlay
from agent_vm.image.store import Image
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard, VMNetwork, random_mac
from agent_vm.network.policy import EgressPolicy

log = get_logger(__name__)

OWNER = "agent-vm"
T = TypeVar("T")


def process_start_time(pid: int) -> str:
    """Start time of a process in clock ticks since boot: tells a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


class RunningVM:
    """A VM that booted and whose guest agent answered the handshake."""

    def __init__(
        self,
        vm: VM,
        workdir: Path,
        image: Image,
        channel: AgentChannel,
        boot_seconds: float,
        nic: Nic | None = None,
        guard: NetworkGuard | None = None,
    ) -> None:
        self.vm = vm
        self.workdir = workdir
        self.image = image
        self.boot_seconds = boot_seconds
        self.nic = nic
        self.guard = guard
        self._channel = channel
        self._closed = False

    @property
    def address(self) -> str | None:
        """The VM's IPv4 address on the project's network (NAT_FILTERED only)."""
        if self.nic is None or self.nic.vm_network is None:
            return None
        return str(self.nic.vm_network.addressing.address)

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Change this VM's egress policy while it runs."""
        if self.guard is None or self.nic is None or self.nic.vm_network is None:
            raise ConfigError(f"{self.name} has no filtered network (mode is not NAT_FILTERED)")
        await self.guard.set_policy(self.name, policy)

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def connected(self) -> bool:
        """False once the agent channel closed (QEMU gone, agent restarted, or closed)."""
        return not self._channel.closed

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def channel(self, timeout: float = 30.0) -> AgentChannel:
        """The agent channel, reconnected first if it closed (e.g. after a snapshot restore)."""
        if self._closed:
            raise VMError(f"{self.name} was closed")
        if self._channel.closed:
            await self.reconnect(timeout)
        return self._channel

    async def reconnect(self, timeout: float = 30.0) -> None:
        await self._channel.close()
        transport = await asyncio.to_thread(transport_for, self.vm)
        channel = AgentChannel(transport, name=self.name)
        await channel.connect(timeout)
        self._channel = channel

    async def explain_failure(self, exc: BaseException, wait: float = 1.5) -> BaseException:
        """Turn a channel failure into VMDiedError when the VM itself is gone.

        The channel notices QEMU's death first (the socket closes at once); libvirt's
        state follows within a moment, so it is polled briefly.
        """
        deadline = time.monotonic() + wait
        while True:
            state = await asyncio.to_thread(self.vm.get_state)
            if state not in (VMState.RUNNING, VMState.BLOCKED, VMState.PAUSED):
                tail = self.console_tail(10)
                return VMDiedError(
                    f"VM {self.name} stopped while in use (libvirt state: {state.value})"
                    + (f"; console:\n{tail}" if tail else ""),
                    hint="QEMU was killed or the guest crashed",
                )
            if time.monotonic() >= deadline:
                return exc
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Destroy the domain and remove everything it left on disk. Idempotent.

        If libvirtd is unreachable the clean-up is retried later (retry_pending_cleanups).
        """
        if self._closed:
            return
        self._closed = True
        if self.guard is not None:
            self.guard.closing(self.name)
        await self._channel.close()
        await asyncio.to_thread(cleanup_or_defer, self.vm, self.workdir)
        if self.guard is not None:
            await self.guard.detach(self.name)


def transport_for(vm: VM) -> Transport:
    xml = vm.xml()
    path = channel_socket_path(xml)
    if path is not None:
        return UnixTransport(path)
    cid = vsock_cid(xml)
    if cid is not None:
        return VsockTransport(cid)
    raise VMError(f"{vm.name} has no agent channel in its domain XML")


def destroy_and_remove(vm: VM, workdir: Path | None) -> None:
    try:
        vm.destroy()
        vm.undefine()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def new_vm_name(prefix: str = "agentvm") -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


class MachineSpec(BaseModel):
    """The virtual hardware of a VM; golden states are keyed on it (with the image)."""

    model_config = ConfigDict(frozen=True)

    profile: ResourceProfile = ResourceProfile()
    accel: Accel = Accel.TCG
    network_mode: NetworkMode = NetworkMode.NAT_FILTERED
    bridge: str | None = None  # host bridge for BRIDGE mode
    channel: Literal["virtio-serial", "vsock"] = "virtio-serial"


def parse_network(text: str) -> tuple[NetworkMode, str | None]:
    """ "nat" (default), "isolated" or "bridge:NAME" -> (mode, bridge)."""
    mode, _, bridge = text.partition(":")
    if mode == "nat" and not bridge:
        return NetworkMode.NAT_FILTERED, None
    if mode == "isolated" and not bridge:
        return NetworkMode.ISOLATED, None
    if mode == "bridge" and bridge:
        return NetworkMode.BRIDGE, bridge
    raise ConfigError(f"network must be nat, isolated or bridge:NAME, not {text!r}")


def build_template(
    *,
    name: str,
    image: Image,
    workdir: Path,
    spec: MachineSpec,
    nic: Nic | None = None,
    memory_file: MemoryFile | None = None,
    incoming: bool = False,
) -> VMTemplate:
    cmdline = f"{image.cmdline} agentvm.hostname={name}"
    if nic is not None:
        cmdline += f" agentvm.net={nic.cmdline}"
    return VMTemplate(
        name=name,
        boot=BootSpec(kernel=image.kernel, initrd=image.initrd, cmdline=cmdline),
        disk_path=workdir / "disk.qcow2",
        resources=spec.profile,
        accel=spec.accel,
        network_mode=spec.network_mode,
        network=nic.attachment if nic is not None else NetworkAttachment(),
        channel=spec.channel,
        console_log=workdir / "console.log",
        memory_file=memory_file,
        incoming=incoming,
        metadata={
            "owner": OWNER,
            "pid": str(os.getpid()),
            "pid_start": process_start_time(os.getpid()),
            "workdir": str(workdir),
            "image": f"{image.name}/{image.key}",
            "created": timeutil.isoformat(),
        },
    )


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
        raise ConfigError("NAT_FILTERED needs a NetworkGuard (agent_vm.network.guard)")
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


@dataclass
class Held:
    """What a VM being created holds so far, for clean-up if creation fails."""

    workdir: Path
    vm: VM | None = None
    agent: AgentChannel | None = None
    nic: Nic | None = None
    guard: NetworkGuard | None = None


@asynccontextmanager
async def creating(vms_dir: Path, name: str) -> AsyncIterator[Held]:
    """A fresh work directory; on any failure inside, everything made so far is removed."""
    workdir = vms_dir / name
    held = Held(workdir)
    made = False
    try:
        await finish_in_thread(_make_workdir, vms_dir, workdir)
        made = True
        yield held
    except BaseException:
        if held.agent is not None:
            await held.agent.close()
        if held.guard is not None:
            held.guard.closing(name)
        if made or held.vm is not None:
            await asyncio.shield(asyncio.to_thread(cleanup_or_defer, held.vm, workdir))
        elif workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()  # made by the thread after all, and still empty
        if held.guard is not None and held.nic is not None and held.nic.vm_network is not None:
            await asyncio.shield(held.guard.detach(held.nic.vm_network.vm_name))
        raise


async def finish_in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a thread. If the caller is cancelled meanwhile, first wait for the
    thread to finish (it may still create a file or a domain), then re-raise: otherwise
    clean-up would run before, and miss, what the thread made."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


async def define_vm(
    connection: LibvirtConnection,
    image: Image,
    spec: MachineSpec,
    held: Held,
    *,
    backing_disk: Path,
    guard: NetworkGuard | None = None,
    policy: EgressPolicy | None = None,
    memory_file: MemoryFile | None = None,
    incoming: bool = False,
) -> VM:
    """Network interface, overlay on ``backing_disk``, libvirt definition (not started)."""
    held.guard = guard
    held.nic = await make_nic(spec, held.workdir.name, guard, policy)
    template = build_template(
        name=held.workdir.name,
        image=image,
        workdir=held.workdir,
        spec=spec,
        nic=held.nic,
        memory_file=memory_file,
        incoming=incoming,
    )
    await finish_in_thread(create_overlay, backing_disk, template.disk_path)
    future = asyncio.ensure_future(
        asyncio.to_thread(VM.define, connection, template.generate_xml())
    )
    try:
        held.vm = await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            held.vm = await future  # defined after all: clean-up must destroy it
        raise
    return held.vm


async def connect_agent(held: Held, timeout: float) -> AgentChannel:
    """Handshake with the guest agent; a failure carries the console's last lines."""
    assert held.vm is not None
    held.agent = AgentChannel(await asyncio.to_thread(transport_for, held.vm), name=held.vm.name)
    try:
        await held.agent.connect(timeout)
    except ChannelError as exc:
        console = _tail(held.workdir / "console.log")
        raise ChannelError(
            f"{held.vm.name} did not become ready: {exc.message}"
            + (f"\nconsole log (last lines):\n{console}" if console else ""),
            hint=exc.hint,
        ) from exc
    return held.agent


async def wait_settled(agent: AgentChannel, timeout: float) -> None:
    """Wait for init's late start-up work (modules, power button, network settings)."""
    deadline = time.monotonic() + timeout
    while not (await agent.ping()).settled:
        if time.monotonic() > deadline:
            raise VMError(f"{agent.name} did not settle within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def launch_vm(
    connection: LibvirtConnection,
    image: Image,
    *,
    vms_dir: Path,
    spec: MachineSpec | None = None,
    guard: NetworkGuard | None = None,
    policy: EgressPolicy | None = None,
    name: str | None = None,
    boot_timeout: float = 60.0,
    memory_file: MemoryFile | None = None,
) -> RunningVM:
    """Cold boot: overlay, define, start, handshake. On any failure nothing is left behind.

    NAT_FILTERED (the default mode) needs ``guard``; ``policy`` defaults to EgressPolicy().
    """
    started = time.monotonic()
    async with creating(vms_dir, name or new_vm_name()) as held:
        vm = await define_vm(
            connection, image, spec or MachineSpec(), held, backing_disk=image.disk,
            guard=guard, policy=policy, memory_file=memory_file,
        )  # fmt: skip
        await finish_in_thread(vm.start)
        agent = await connect_agent(held, boot_timeout)
        if held.nic is not None:  # the guest configures its interface in late start-up
            await wait_settled(agent, boot_timeout)
        running = RunningVM(
            vm, held.workdir, image, agent, time.monotonic() - started, held.nic, guard
        )
        log.info("vm_ready", vm=vm.name, seconds=round(running.boot_seconds, 3))
        return running


def _make_workdir(vms_dir: Path, workdir: Path) -> None:
    vms_dir.mkdir(parents=True, exist_ok=True)
    vms_dir.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the overlay
    workdir.mkdir(mode=0o755)


# Clean-ups that failed (typically: libvirtd was down) and are retried later by
# retry_pending_cleanups(); what a crashed process leaves is found by the reaper instead.
_pending_cleanups: list[tuple[VM, Path]] = []
_pending_lock = threading.Lock()


def cleanup_or_defer(vm: VM | None, workdir: Path) -> None:
    """Destroy and remove now, or remember it for retry_pending_cleanups()."""
    try:
        if vm is not None:
            destroy_and_remove(vm, workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    except AgentVMError as exc:
        log.error("cleanup_failed", workdir=str(workdir), error=str(exc), retry="later")
        if vm is not None:
            with _pending_lock:
                _pending_cleanups.append((vm, workdir))


def retry_pending_cleanups() -> int:
    """Try the clean-ups that failed earlier again; returns how many are still pending."""
    with _pending_lock:
        pending = list(_pending_cleanups)
        _pending_cleanups.clear()
    for vm, workdir in pending:
        try:
            destroy_and_remove(vm, workdir)
        except AgentVMError:
            with _pending_lock:
                _pending_cleanups.append((vm, workdir))
    with _pending_lock:
        return len(_pending_cleanups)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
