"""Sandboxes in the shape users of E2B-style SDKs know: one facade over a backend, with
no branch on where the VM is (``local.py``: this host; ``http.py``: an agent-vm server).
Its parts: ``_async_commands.py`` (commands, terminals), ``_async_files.py`` (files).

This module is the one implementation; ``_sync.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from agent_vm import secrets as secret_store
from agent_vm.communication.workspace import Workspace
from agent_vm.errors import ConfigError, SandboxStateError
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox._async_commands import AsyncCommands, AsyncPty
from agent_vm.sandbox._async_files import AsyncFiles
from agent_vm.sandbox.base import (
    Backend,
    ExposedPort,
    Progress,
    SandboxHandle,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from agent_vm.secrets import Secret

if TYPE_CHECKING:
    from agent_vm.config import Settings
    from agent_vm.core.template import NetworkMode, ResourceProfile
    from agent_vm.execution.pool import VMPool
    from agent_vm.execution.runtime import Runtime


class AsyncSandbox:
    """One isolated VM: ``create()`` it, or use it as a context manager.

    With ``server=`` an ``agent-vm serve`` holds it; with ``pool=`` it comes from that
    pool and goes back on ``kill()``; otherwise a fresh VM is started from the golden
    state (or booted: ``cold=True``) and destroyed on ``kill()``, by ``runtime`` when
    given or by a runtime of the sandbox's own. Arguments are checked here, before any VM
    starts; ``on_progress`` hears about long steps (an image build, a golden state).
    """

    def __init__(
        self,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str | ResourceProfile = "light",
        network: str | NetworkMode = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
        runtime: Runtime | None = None,
        workspace: str | os.PathLike[str] | Workspace | None = None,
        workspace_readonly: bool = False,
        secrets: Mapping[str, str | Secret] | None = None,
        server: str | None = None,
        token: str | None = None,
        labels: Mapping[str, str] | None = None,
        lifetime_seconds: float = 3600.0,
        cold: bool = False,
        on_progress: Progress | None = None,
        snapshot: str | None = None,
        on_expiry: str = "kill",
        auto_resume: bool = False,
    ) -> None:
        self._backend: Backend
        if server is not None:
            if pool is not None or runtime is not None or settings is not None:
                raise ConfigError("server= cannot be combined with pool=, runtime= or settings=")
            from agent_vm.sandbox.http import HttpBackend

            self._backend = HttpBackend(server, token)
        else:  # imported here: a client-only install has no libvirt
            from agent_vm.sandbox.localbackend import LocalBackend

            self._backend = LocalBackend(runtime, settings=settings, pool=pool)
        share = workspace
        if workspace is not None and not isinstance(workspace, Workspace):
            share = Workspace(path=Path(workspace), readonly=workspace_readonly)
        mode = str(network)
        proxied = {k: v for k, v in (secrets or {}).items() if isinstance(v, Secret)}
        self._spec = SandboxSpec(
            image=image, profile=profile, network="nat" if mode == "nat_filtered" else mode,
            policy=policy, workspace=share if isinstance(share, Workspace) else None, cold=cold,
            labels=dict(labels or {}), lifetime=lifetime_seconds, acquire_timeout=timeout,
            snapshot=snapshot, on_expiry=_expiry(on_expiry), auto_resume=auto_resume,
            proxied=proxied,
        )  # fmt: skip
        self._backend.check(self._spec)
        # the guest's environment: plain values, and placeholders for proxied ones
        self._secrets = {
            k: v.placeholder if isinstance(v, Secret) else v for k, v in (secrets or {}).items()
        }
        secret_store.register(
            {k: v.value if isinstance(v, Secret) else v for k, v in (secrets or {}).items()}
        )
        self._progress = on_progress
        self._handle: SandboxHandle | None = None
        self._owns_backend = True  # a fork's children share their parent's
        self.commands = AsyncCommands(self._live, self._secrets)
        self.files = AsyncFiles(self._live, self._wake)
        self.pty = AsyncPty(self._live, self._secrets)

    @classmethod
    async def create(
        cls,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str | ResourceProfile = "light",
        network: str | NetworkMode = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
        runtime: Runtime | None = None,
        workspace: str | os.PathLike[str] | Workspace | None = None,
        workspace_readonly: bool = False,
        secrets: Mapping[str, str | Secret] | None = None,
        server: str | None = None,
        token: str | None = None,
        labels: Mapping[str, str] | None = None,
        lifetime_seconds: float = 3600.0,
        cold: bool = False,
        on_progress: Progress | None = None,
        snapshot: str | None = None,
        on_expiry: str = "kill",
        auto_resume: bool = False,
    ) -> AsyncSandbox:
        """A running sandbox (see the class for the arguments)."""
        sandbox = cls(
            pool=pool, image=image, profile=profile, network=network, policy=policy,
            timeout=timeout, settings=settings, runtime=runtime, workspace=workspace,
            workspace_readonly=workspace_readonly, secrets=secrets, server=server, token=token,
            labels=labels, lifetime_seconds=lifetime_seconds, cold=cold, on_progress=on_progress,
            snapshot=snapshot, on_expiry=on_expiry, auto_resume=auto_resume,
        )  # fmt: skip
        await sandbox.start()
        return sandbox

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        server: str | None = None,
        token: str | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> AsyncSandbox:
        """A sandbox a server already holds (made by this client earlier, or another
        with the same token), or without a server one paused on this host (by another
        process too): its commands, files and terminals, as if created here. A paused
        one is resumed."""
        sandbox = cls(server=server, token=token, secrets=secrets)
        sandbox._handle = await sandbox._backend.get(sandbox_id)
        if sandbox._handle.state is SandboxState.PAUSED:
            await sandbox._handle.resume()
        return sandbox

    @classmethod
    async def list_snapshots(
        cls, *, server: str | None = None, token: str | None = None,
        runtime: Runtime | None = None,
    ) -> list[SnapshotInfo]:  # fmt: skip
        """Snapshots to start sandboxes from (``snapshot=NAME``)."""
        sandbox = cls(server=server, token=token, runtime=runtime)
        try:
            return await sandbox._backend.snapshots()
        finally:
            await sandbox._backend.close()

    @classmethod
    async def remove_snapshot(
        cls, name: str, *, server: str | None = None, token: str | None = None,
        runtime: Runtime | None = None,
    ) -> None:  # fmt: skip
        """Refused (``SnapshotError``) while sandboxes started from it exist."""
        sandbox = cls(server=server, token=token, runtime=runtime)
        try:
            await sandbox._backend.remove_snapshot(name)
        finally:
            await sandbox._backend.close()

    async def _wake(self) -> None:
        """A paused sandbox resumed before a file call, when ``auto_resume`` asks."""
        handle = self._live()
        if self._spec.auto_resume and handle.state is SandboxState.PAUSED:
            await handle.resume()

    def _live(self) -> SandboxHandle:
        if self._handle is None:
            raise SandboxStateError(
                "the sandbox is not running", state="new", hint="create() or start() it first"
            )
        return self._handle

    @property
    def sandbox_id(self) -> str:
        return self._live().id

    @property
    def state(self) -> SandboxState:
        """Where its lifecycle is (``new`` before start: ``SandboxStateError`` then)."""
        return self._live().state

    def info(self) -> SandboxInfo:
        return self._live().info()

    @property
    def secrets(self) -> Mapping[str, str]:
        """Variables every command gets (values redacted from agent-vm's logs)."""
        return self._secrets

    @property
    def workspace(self) -> Workspace | None:
        """The host directory shared with this sandbox, if any."""
        return self._spec.workspace

    @property
    def handle(self) -> SandboxHandle:
        """The backend's handle (``LocalSandbox`` has ``.vm``, the RunningVM)."""
        return self._live()

    async def get_host(self, port: int) -> str:
        """``address:port`` on the host that reaches TCP ``port`` inside the sandbox
        (HTTP, WebSocket, anything over TCP) while it runs, in every network mode. Through
        a server, connections must carry the port's token: see :meth:`expose`."""
        return (await self.expose(port)).host

    async def expose(self, port: int) -> ExposedPort:
        """The sandbox's ``port`` on the host: address, URL and (through a server) the
        token every connection's first request carries (``X-Agent-VM-Port-Token``)."""
        return await self._live().expose(port)

    async def blocked_attempts(self) -> list[Blocked]:
        """Recent blocked network attempts: destination, port, why."""
        return await self._live().blocked()

    async def get_policy(self) -> EgressPolicy | None:
        """The egress policy in force (None: no filtered network, e.g. isolated)."""
        return await self._live().policy()

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Change what this sandbox may reach; in force when this returns."""
        await self._live().set_policy(policy)

    async def pause(self) -> None:
        """Save it to disk and free its memory and CPU; every process stops where it is
        (commands and files refuse until ``resume``, unless ``auto_resume``)."""
        await self._live().pause()

    async def resume(self) -> None:
        """Continue exactly where it was paused."""
        await self._live().resume()

    async def snapshot(self, name: str) -> SnapshotInfo:
        """Capture it as snapshot ``name`` (it runs on): start new sandboxes from it
        with ``AsyncSandbox.create(snapshot=name)``."""
        return await self._live().snapshot(name)

    async def fork(self, count: int = 1) -> list[AsyncSandbox]:
        """``count`` new sandboxes continuing from this moment (own hostname, machine-id,
        address and randomness; no workspace); this one runs on. They share this one's
        backend: kill them, or they go with it."""
        children = []
        for handle in await self._live().fork(count):
            child = AsyncSandbox.__new__(AsyncSandbox)
            child.__dict__.update(self.__dict__)
            child._spec = replace(self._spec, workspace=None)
            child._handle, child._owns_backend = handle, False
            child.commands = AsyncCommands(child._live, child._secrets)
            child.files = AsyncFiles(child._live, child._wake)
            child.pty = AsyncPty(child._live, child._secrets)
            children.append(child)
        return children

    async def start(self) -> None:
        """Start (or acquire) the VM and attach its workspace; a no-op when running."""
        if self._handle is not None and self._handle.state is not SandboxState.CLOSED:
            return
        self._handle = await self._backend.acquire(self._spec, self._progress)

    async def kill(self) -> None:
        """Destroy the sandbox (or hand it back to its pool). Idempotent."""
        handle, self._handle = self._handle, None
        try:
            if handle is not None:
                await self._backend.release(handle)
        finally:
            if self._owns_backend:
                await self._backend.close()

    async def __aenter__(self) -> AsyncSandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()


def _expiry(action: str) -> str:
    if action not in ("kill", "pause"):
        raise ConfigError(f"on_expiry is 'kill' or 'pause', not {action!r}")
    return action
