"""The local backend: sandboxes on this host's VMs, from a warm pool when one matches,
else a clone of a golden state (or a cold boot, or a snapshot). What ``AsyncSandbox()``
uses without a server, and what ``agent-vm serve`` holds behind its API. Its commands:
``localcmd.py``; the backend: ``localbackend.py``; what a pause writes down:
``localsave.py``.

Pause writes the sandbox to disk (``<state>/paused/<id>/``) and frees its VM; resume
brings the same machine back, every process where it was. The workspace is detached
around a pause, snapshot or fork (a mounted 9p share blocks QEMU's migration) and
attached again after; a fork's children get none.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from agent_vm import timeutil
from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.files import FileService
from agent_vm.communication.transport import UnixTransport
from agent_vm.communication.workspace import Workspace
from agent_vm.errors import AgentVMError, NotFoundError
from agent_vm.execution import lifecycle
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.suspend import PausedMeta
from agent_vm.logs import get_logger
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox.base import (
    CommandInfo,
    CommandSpec,
    ExposedPort,
    GuestFigures,
    SandboxHandle,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from agent_vm.sandbox.journal import prune
from agent_vm.sandbox.localcmd import LocalCommand, new_id
from agent_vm.sandbox.localsave import record, snapshot_info
from agent_vm.sandbox.ports import PortForwarder

log = get_logger(__name__)
Release = Callable[[RunningVM], Awaitable[None]]


class Holder(Protocol):
    """Where a sandbox lives (``localbackend.LocalBackend``): its runtime, and the
    table that fork's children join."""

    runtime: Runtime

    def hold(self, handle: LocalSandbox) -> LocalSandbox: ...


class LocalSandbox(SandboxHandle):
    """A sandbox on one of this host's VMs (``vm`` None while paused to disk)."""

    def __init__(
        self,
        vm: RunningVM | None,
        spec: SandboxSpec,
        release: Release,
        backend: Holder,
        pooled: bool = False,
        *,
        paused: PausedMeta | None = None,
    ) -> None:
        self.id = new_id("sb")
        self.spec = spec
        self.state = SandboxState.RUNNING if paused is None else SandboxState.PAUSED
        self.created_at: datetime = timeutil.now()
        self.paused_because: str | None = paused.reason if paused is not None else None
        self.keep: dict[str, Any] = {}
        self.parent: str | None = None  # the sandbox it was forked from
        self._release = release
        self._backend = backend
        self.pooled = pooled
        self._commands: dict[str, LocalCommand] = {}
        self._ports: dict[int, tuple[PortForwarder, ExposedPort]] = {}
        self._moving = asyncio.Lock()  # pause and resume, one at a time
        self._paused = paused
        self.on_disk = paused is not None
        self._session: AgentChannel | None = None  # kept across a pause in this process
        self._vm = vm
        self._files = FileService(vm.channel, vm.staging) if vm is not None else None

    @property
    def vm(self) -> RunningVM:
        if self._vm is None:
            self._require("run")  # says: paused
            raise AgentVMError(f"sandbox {self.id} has no VM")
        return self._vm

    def info(self) -> SandboxInfo:
        profile = self.spec.profile if isinstance(self.spec.profile, str) else "custom"
        return SandboxInfo(
            self.id, self.state, self.spec.image, profile, self.spec.network, self.created_at,
            dict(self.spec.labels), self._vm.name if self._vm is not None else None,
            paused_because=self.paused_because, pooled=self.pooled,
        )  # fmt: skip

    @property
    def paused_dir(self) -> Path:
        return self._backend.runtime.settings.paused_dir / self.id

    # ------------------------------------------------------------------ commands

    async def run(self, spec: CommandSpec) -> LocalCommand:
        await self._running("run")
        command = LocalCommand(self, spec)
        await command.start()
        self._commands[command.id] = command
        return command

    async def _running(self, call: str) -> None:
        """A paused sandbox resumes first when it was asked for (``auto_resume``)."""
        if self.state is SandboxState.PAUSED and self.spec.auto_resume:
            await self.resume()
        self._require(call)

    async def command(self, command_id: str) -> LocalCommand:
        self._require("command")
        found = self._commands.get(command_id)
        if found is None:
            raise NotFoundError(f"no command {command_id!r} in sandbox {self.id}")
        return found

    async def commands(self) -> list[CommandInfo]:
        self._require("commands")
        return [command.info() for command in self._commands.values()]

    def running_commands(self) -> list[dict[str, Any]]:
        """Commands still running, as a restarted process needs them (``localsave``)."""
        return [saved for c in self._commands.values() if (saved := c.saved()) is not None]

    def command_ids(self) -> list[str]:
        return list(self._commands)

    def restore_commands(self, saved: list[dict[str, Any]]) -> None:
        for data in saved:
            command = LocalCommand.restored(self, data)
            self._commands[command.id] = command

    def _adopted_session(self, meta: PausedMeta) -> AgentChannel:
        """The saved session, its commands waiting on it again (before any byte of the
        resumed guest arrives: their output goes on where it was)."""
        channel = AgentChannel(UnixTransport(self.paused_dir / "none"), name=meta.name)
        channel.adopt(meta.session, meta.next_id)
        for command in self._commands.values():
            if not command.journal.done:
                command.follow_on(channel)
        return channel

    def ended(self, command: LocalCommand) -> None:
        """A command ended: forget the oldest ended ones past the budget."""
        held = list(self._commands.values())
        for index in prune([c.journal for c in held]):
            self._commands.pop(held[index].id, None)

    # ------------------------------------------------------------------ the rest

    @property
    def files(self) -> FileService:
        self._require("files")
        assert self._files is not None
        return self._files

    async def policy(self) -> EgressPolicy | None:
        self._require("policy")
        if self._vm is None:
            saved = self._paused.policy if self._paused is not None else None
            return EgressPolicy.model_validate(saved) if saved is not None else None
        guard = self._vm.guard
        return guard.policy(self._vm.name) if guard is not None else None

    async def set_policy(self, policy: EgressPolicy) -> None:
        self._require("set_policy")
        await self.vm.set_policy(policy)

    async def blocked(self) -> list[Blocked]:
        self._require("blocked")
        guard = self._vm.guard if self._vm is not None else None
        return guard.blocked(self.vm.name) if guard is not None else []

    async def blocked_count(self) -> int:
        self._require("blocked_count")
        guard = self._vm.guard if self._vm is not None else None
        return guard.blocked_count(self.vm.name) if guard is not None else 0

    async def stats(self) -> GuestFigures:
        self._require("stats")
        status = await (await self.vm.channel()).ping(timeout=2.0)
        return GuestFigures(status.uptime, status.running, status.load1, status.mem_available_kib)

    # ------------------------------------------------------------------ lifecycle

    async def expose(
        self, port: int, *, token: str | None = None, host: str = "127.0.0.1"
    ) -> ExposedPort:
        self._require("expose")
        if port in self._ports:
            return self._ports[port][1]

        async def me() -> SandboxHandle:
            self._require("run")
            return self

        forwarder = PortForwarder(me, port, token)
        address, listening = await forwarder.start(host)
        shown = f"[{address}]" if ":" in address else address
        exposed = ExposedPort(port, f"{shown}:{listening}", f"http://{shown}:{listening}/", token)
        self._ports[port] = (forwarder, exposed)
        return exposed

    async def _close_ports(self) -> None:
        ports, self._ports = self._ports, {}
        for forwarder, _ in ports.values():
            await forwarder.close()

    async def pause(self, reason: str = "requested", to_disk: bool = True) -> None:
        """Save the sandbox to disk and free its VM: no memory, no CPU while paused. Or
        freeze it (``to_disk=False``): stopped at once, whatever its guest does."""
        self._require("pause")
        async with self._moving:  # one pause or resume at a time (a user's and an expiry's)
            await self._pause(reason, to_disk)

    async def _pause(self, reason: str, to_disk: bool) -> None:
        if self.state is SandboxState.PAUSED:
            return
        await self._close_ports()  # only while it runs: expose() again after resume
        vm = self.vm
        if not to_disk:
            await asyncio.to_thread(vm.vm.pause)
            self.state, self.paused_because = SandboxState.PAUSED, reason
            return
        async with self._workspace_off(vm):
            meta = await lifecycle.pause(
                self._backend.runtime, vm, self.paused_dir, reason=reason, owner=record(self)
            )
        self._session = vm.session
        self._vm, self._files, self._paused = None, None, meta
        self.on_disk = True
        self.state, self.paused_because = SandboxState.PAUSED, reason
        await self._release(vm)  # a pool frees its place (the VM itself is gone)
        self._release = _destroy

    async def resume(self) -> None:
        self._require("resume")
        async with self._moving:
            await self._resume()

    async def _resume(self) -> None:
        if self.state is not SandboxState.PAUSED:
            return
        if self._vm is not None:  # frozen, not saved
            await asyncio.to_thread(self._vm.vm.resume)
            self.state, self.paused_because = SandboxState.RUNNING, None
            return
        if self._paused is None:
            raise NotFoundError(f"sandbox {self.id} has no saved state to resume")
        runtime = self._backend.runtime
        if self._session is None:  # paused by another process: its session, adopted
            self._session = self._adopted_session(self._paused)
        vm = await lifecycle.resume(runtime, self.paused_dir, self._paused, self._session)
        self._vm, self._files = vm, FileService(vm.channel, vm.staging)
        self._paused = self._session = None
        self.on_disk = False
        self.state, self.paused_because = SandboxState.RUNNING, None
        if self.spec.proxied:  # the new lease's address: the proxy learns it again
            await vm.set_secrets(self.spec.proxied)
        if self.spec.workspace is not None:
            try:
                await vm.attach_workspace(self.spec.workspace)
            except AgentVMError as exc:
                log.error("workspace_not_attached_again", sandbox=self.id, error=str(exc))
                raise

    async def snapshot(self, name: str) -> SnapshotInfo:
        self._require("snapshot")
        vm = self.vm
        async with self._workspace_off(vm):
            meta = await lifecycle.snapshot(
                self._backend.runtime, vm, name, source=self.id, owner=self.keep.get("owner")
            )
        return snapshot_info(meta)

    async def fork(self, count: int = 1) -> builtins.list[SandboxHandle]:
        """Children with no workspace (they must never write into this one's)."""
        self._require("fork")
        vm = self.vm
        async with self._workspace_off(vm):
            vms = await lifecycle.fork(self._backend.runtime, vm, count, source=self.id)
        spec = replace(self.spec, workspace=None, policy=await self.policy())
        children: list[SandboxHandle] = []
        for child_vm in vms:
            if spec.proxied:  # the children hold the same placeholders
                await child_vm.set_secrets(spec.proxied)
            child = self._backend.hold(LocalSandbox(child_vm, spec, _destroy, self._backend))
            child.parent, child.keep = self.id, dict(self.keep)
            children.append(child)
        return children

    @contextlib.asynccontextmanager
    async def _workspace_off(self, vm: RunningVM) -> Any:
        """The workspace detached for the operation and attached again after it (also
        when it fails; not once the VM is gone: a resume attaches it)."""
        workspace: Workspace | None = self.spec.workspace if vm.workspace is not None else None
        await vm.detach_workspace(strict=True)
        try:
            yield
        finally:
            if workspace is not None and not vm.closed:
                await vm.attach_workspace(workspace)

    async def close(self) -> None:
        if self.state in (SandboxState.CLOSING, SandboxState.CLOSED):
            return
        paused = self.state is SandboxState.PAUSED
        self.state = SandboxState.CLOSING
        await self._close_ports()
        try:
            for command in list(self._commands.values()):
                await command.cancel()
            if paused and self._vm is not None:  # frozen: a pool takes it back running
                with contextlib.suppress(AgentVMError):
                    await asyncio.to_thread(self._vm.vm.resume)
                paused = False
            if paused:  # its saved state is all there is of it
                if self._session is not None:
                    await self._session.close()
                if self._paused is not None:
                    await asyncio.to_thread(
                        lifecycle.discard_paused, self._backend.runtime, self.paused_dir,
                        self._paused,
                    )  # fmt: skip
                await asyncio.to_thread(_remove_tree, self.paused_dir)
            else:
                await self._release(self.vm)
        finally:
            self.state = SandboxState.CLOSED
            self._vm = None


async def _destroy(vm: RunningVM) -> None:
    await vm.close()


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
