"""A booted VM whose guest agent answered: what callers hold while they use a sandbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent_vm import secrets
from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.transport import Transport, UnixTransport, VsockTransport
from agent_vm.communication.workspace import (
    AttachedWorkspace,
    Workspace,
    attach,
    mount_staging,
)
from agent_vm.core.template import channel_socket_path, vsock_cid
from agent_vm.core.vm import VM, VMState
from agent_vm.errors import AgentVMError, ConfigError, VMDiedError, VMError, WorkspaceError
from agent_vm.execution.spec import MachineSpec
from agent_vm.execution.teardown import teardown
from agent_vm.host.identities import Identity
from agent_vm.host.procs import is_alive
from agent_vm.image.store import Image
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from agent_vm.secrets import Secret

if TYPE_CHECKING:
    from agent_vm.execution.nic import Nic

log = get_logger(__name__)
ALIVE_STATES = (VMState.RUNNING, VMState.BLOCKED, VMState.PAUSED)


def transport_for(vm: VM) -> Transport:
    """How to reach the agent of ``vm`` (its channel's socket path changes per start)."""
    xml = vm.xml()
    path = channel_socket_path(xml)
    if path is not None:
        return UnixTransport(path)
    cid = vsock_cid(xml)
    if cid is not None:
        return VsockTransport(cid)
    raise VMError(f"{vm.name} has no agent channel in its domain XML")


def console_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of a console log ("" when there is none), secrets redacted."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return secrets.redact("\n".join(text.splitlines()[-lines:]))


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
        qemu_pid: int | None = None,
        identity: Identity | None = None,
        spec: MachineSpec | None = None,
    ) -> None:
        self.vm = vm
        self.workdir = workdir
        self.image = image
        self.boot_seconds = boot_seconds
        self.nic = nic
        self.guard = guard
        self.qemu_pid = qemu_pid
        self.identity = identity  # the host user its QEMU runs as
        self.spec = spec  # its hardware and limits
        self._channel = channel
        self._closed = False
        self.workspace: AttachedWorkspace | None = None  # the live share, while attached
        self._staging: Path | None = None
        self._staging_tried = False
        self._staging_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def address(self) -> str | None:
        """The VM's IPv4 address on the project's network (NAT_FILTERED only)."""
        if self.nic is None or self.nic.vm_network is None:
            return None
        return str(self.nic.vm_network.addressing.address)

    @property
    def connected(self) -> bool:
        """False once the agent channel closed (QEMU gone, agent restarted, or closed)."""
        return not self._channel.closed

    @property
    def closed(self) -> bool:
        return self._closed

    def alive(self) -> bool:
        """Cheap checks only (no libvirt call, no guest round trip): the channel is open
        and QEMU's process exists and is not a zombie."""
        return self.connected and (self.qemu_pid is None or is_alive(self.qemu_pid))

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def console_tail(self, lines: int = 30) -> str:
        return console_tail(self.console_log, lines)

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Change this VM's egress policy while it runs."""
        if self.guard is None or self.nic is None or self.nic.vm_network is None:
            raise ConfigError(f"{self.name} has no filtered network (mode is not NAT_FILTERED)")
        await self.guard.set_policy(self.name, policy)

    async def set_secrets(self, secrets: Mapping[str, Secret]) -> None:
        """The secrets the host's egress proxy injects for this VM."""
        if self.guard is None or self.nic is None or self.nic.vm_network is None:
            raise ConfigError(f"{self.name} has no egress proxy (mode is not NAT_FILTERED)")
        await self.guard.set_secrets(self.name, secrets)

    @property
    def session(self) -> AgentChannel:
        """The agent channel as it is (no reconnect): what a pause keeps."""
        return self._channel

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

    async def healthy(self, timeout: float = 5.0) -> bool:
        """Does the agent answer a PING within ``timeout``?"""
        try:
            await (await self.channel(timeout=timeout)).ping(timeout=timeout)
        except AgentVMError:
            return False
        return True

    async def explain_failure(self, exc: BaseException, wait: float = 1.5) -> BaseException:
        """Turn a channel failure into VMDiedError when the VM itself is gone.

        The channel notices QEMU's death first (the socket closes at once); libvirt's
        state follows within a moment, so it is polled briefly.
        """
        deadline = time.monotonic() + wait
        while True:
            state = await asyncio.to_thread(self.vm.get_state)
            if state not in ALIVE_STATES:
                tail = self.console_tail(10)
                return VMDiedError(
                    f"VM {self.name} stopped while in use (libvirt state: {state.value})"
                    + (f"; console:\n{tail}" if tail else ""),
                    hint="QEMU was killed or the guest crashed",
                )
            if time.monotonic() >= deadline:
                return exc
            await asyncio.sleep(0.05)

    async def attach_workspace(self, workspace: Workspace) -> AttachedWorkspace:
        """Share ``workspace`` with the guest (one at a time: the previous one goes)."""
        await self.detach_workspace()
        pid = self.qemu_pid or await asyncio.to_thread(self.vm.qemu_pid)
        if pid is None:
            raise VMError(f"{self.name} is not running")
        self.workspace = await attach(workspace, self.workdir, pid, await self.channel())
        return self.workspace

    async def staging(self) -> Path | None:
        """The host end of the bulk lane for file streams (mounted on first use), or None
        where it cannot be had (then file streams go through the channel)."""
        async with self._staging_lock:
            if not self._staging_tried:
                self._staging_tried = True
                pid = self.qemu_pid or await asyncio.to_thread(self.vm.qemu_pid)
                if pid is not None:
                    self._staging = await asyncio.to_thread(mount_staging, self.workdir, pid)
            return self._staging

    async def detach_workspace(self, strict: bool = False) -> None:
        """Unmount the workspace in the guest and on the host; a no-op without one.
        ``strict``: if the guest refuses, it stays attached (``WorkspaceError``)."""
        attached, self.workspace = self.workspace, None
        if attached is not None:
            channel = None if self._channel.closed else self._channel
            try:
                await attached.detach(channel, strict)
            except WorkspaceError:
                if strict:
                    self.workspace = attached
                raise

    async def vacate(self) -> None:
        """Remove the VM (domain, work directory, identity, network) but not its session:
        a pause saved its state, and its disk was linked out first."""
        self._closed = True
        self.workspace = None
        await teardown(
            self.name, vm=self.vm, workdir=self.workdir, guard=self.guard,
            identity=self.identity,
        )  # fmt: skip

    async def close(self) -> None:
        """Destroy the domain and remove everything it left on disk and on the network.
        Idempotent. If libvirtd is unreachable the rest is retried later."""
        if self._closed:
            return
        self._closed = True
        if self.workspace is not None:  # off the VM first, even if its domain must wait
            attached, self.workspace = self.workspace, None
            try:
                await attached.detach(None)
            except AgentVMError as exc:  # the teardown still runs; it never crosses a mount
                log.error("workspace_detach_failed", vm=self.name, error=str(exc))
        await teardown(
            self.name,
            vm=self.vm,
            workdir=self.workdir,
            guard=self.guard,
            channel=self._channel,
            identity=self.identity,
        )
