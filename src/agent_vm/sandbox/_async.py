"""Sandboxes in the shape users of E2B-style SDKs know, over a pool or a fresh VM.

This module is the one implementation; ``_sync.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import signal
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from agent_vm import secrets as secret_store
from agent_vm.communication.files import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_ENTRIES,
    DownloadReport,
    FileEntry,
    FileService,
    WatchEvent,
)
from agent_vm.communication.workspace import Workspace
from agent_vm.config import Settings
from agent_vm.core.template import ResourceProfile
from agent_vm.errors import AgentVMError, ConfigError, ProtocolError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.result import ExecutionResult
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.spec import NetworkChoice
from agent_vm.network.blocked import Blocked
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.messages import Execute, Result
from agent_vm.sandbox.remote import RemoteClient, RemoteFiles, RemotePty
from agent_vm.terminal import exit_status, wait_for_end

CommandResult = ExecutionResult
TextCallback = Callable[[str], None]


def _text(callback: TextCallback | None) -> Callable[[bytes], None] | None:
    """Turn a str callback into a bytes one that never splits a UTF-8 character."""
    if callback is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(data: bytes) -> None:
        text = decoder.decode(data)
        if text:
            callback(text)

    return feed


def _workspace(
    workspace: str | os.PathLike[str] | Workspace | None, readonly: bool
) -> Workspace | None:
    if workspace is None or isinstance(workspace, Workspace):
        return workspace
    return Workspace(path=Path(workspace), readonly=readonly)


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox
        self._executor = AgentExecutor(default_timeout=None)

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
    ) -> CommandResult:
        """Run ``cmd`` (a string goes through bash, a list is exec'd) and wait for it.
        The sandbox's secrets are in its environment (``envs`` may override them)."""
        remote = self._sandbox.remote
        if remote is not None:
            return await remote.run(
                cmd, timeout=timeout, envs={**self._sandbox.secrets, **(envs or {})}, cwd=cwd,
                user=user, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr,
            )  # fmt: skip
        return await self._executor.execute(
            self._sandbox.vm,
            cmd,
            timeout=timeout,
            env={**self._sandbox.secrets, **(envs or {})},
            cwd=cwd,
            user=user,
            stdin=stdin,
            on_stdout=_text(on_stdout),
            on_stderr=_text(on_stderr),
        )


class AsyncFiles:
    """``sandbox.files``: the sandbox's file system over the control channel (E2B's
    names). Streams both ways with bounded memory; a missing path raises
    ``SandboxFileNotFoundError`` (also a ``FileNotFoundError``), a refused one
    ``SandboxPermissionError`` (also a ``PermissionError``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._service: FileService | RemoteFiles
        if sandbox.remote is not None:  # the server's files API, same names
            self._service = RemoteFiles(sandbox.remote)
        else:
            self._service = FileService(lambda: sandbox.vm.channel(), lambda: sandbox.vm.staging())

    async def read(self, path: str, format: str = "text") -> str | bytes:
        """The whole file as text (``format="text"``) or bytes (``"bytes"``), up to 64 MiB;
        ``read_stream`` or ``download`` for bigger ones."""
        return await self._service.read(path, format)

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks as they arrive."""
        async for chunk in self._service.read_stream(path):
            yield chunk

    async def write(
        self,
        path: str,
        data: str | bytes | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes],
        mode: int | None = None,
    ) -> int:
        """Write ``data`` (text, bytes, a binary file object, or an iterable of bytes:
        async or not) to ``path``, parents made, replaced atomically; returns the bytes written."""
        return await self._service.write(path, data, mode)

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        """Entries below ``path``, ``depth`` levels deep."""
        return await self._service.list(path, depth)

    async def stat(self, path: str) -> FileEntry:
        return await self._service.stat(path)

    async def exists(self, path: str) -> bool:
        return await self._service.exists(path)

    async def make_dir(self, path: str) -> bool:
        """Create ``path`` with its parents; False when it already was a directory."""
        return await self._service.make_dir(path)

    async def remove(self, path: str) -> None:
        """Remove a file, a link, or a directory with everything in it."""
        await self._service.remove(path)

    async def rename(self, old_path: str, new_path: str) -> None:
        await self._service.rename(old_path, new_path)

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        """Events under ``path`` (create, modify, delete, ...) as the guest's inotify
        reports them, for as long as the caller iterates."""
        async for event in self._service.watch(path, recursive):
            yield event

    async def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host file into the sandbox."""
        return await self._service.upload(local, remote)

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """A sandbox file onto the host."""
        return await self._service.download(remote, local)

    async def upload_dir(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host directory into the sandbox (a tar stream)."""
        return await self._service.upload_dir(local, remote)

    async def download_dir(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> DownloadReport:
        """A sandbox directory onto the host, safely: nothing outside ``local`` is read or
        written, links are not followed, devices, FIFOs and setuid bits never appear;
        past a cap it stops with ``ExtractionError``."""
        return await self._service.download_dir(
            remote, local, max_bytes=max_bytes, max_entries=max_entries
        )


@dataclass(frozen=True)
class PtyHandle:
    """A terminal session in the sandbox (``sandbox.pty.create``); ``pid`` names it."""

    pid: int


class AsyncPty:
    """``sandbox.pty``: interactive commands in a terminal (raw bytes both ways; the
    guest's line discipline turns ``\\x03`` into SIGINT for the foreground group)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox
        self._running: dict[int, asyncio.Future[Result]] = {}
        self._remote = RemotePty(sandbox.remote) if sandbox.remote is not None else None

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        on_data: Callable[[bytes], None] | None = None,
        *,
        cmd: str | Sequence[str] | None = None,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        """Start ``cmd`` (default: a login shell) in a ``cols`` x ``rows`` terminal;
        ``on_data`` gets its output as it comes."""
        if self._remote is not None:
            handle = await self._remote.create(
                cols, rows, on_data, cmd=cmd, envs={**self._sandbox.secrets, **(envs or {})},
                cwd=cwd, user=user, timeout=timeout,
            )  # fmt: skip
            return PtyHandle(handle)
        vm = self._sandbox.vm
        argv = ["bash", "-l"] if cmd is None else None
        try:
            request = Execute(
                argv=argv if cmd is None else (None if isinstance(cmd, str) else list(cmd)),
                shell=cmd if isinstance(cmd, str) else None,
                env={**self._sandbox.secrets, **(envs or {})},
                cwd=cwd
                if cwd is not None or vm.workspace is None
                else vm.workspace.workspace.mount,
                user=user,
                timeout=timeout,
                pty=[cols, rows],
            )
        except ProtocolError as exc:
            raise ConfigError(f"invalid terminal request: {exc.message}") from exc
        channel = await vm.channel()
        rid, future = await channel.start_terminal(request, on_data or (lambda data: None))
        self._running[rid] = future
        return PtyHandle(rid)

    async def send_input(self, pty: PtyHandle, data: str | bytes) -> None:
        """Keystrokes for the terminal (``"\\x03"`` is Ctrl-C)."""
        payload = data.encode() if isinstance(data, str) else data
        if self._remote is not None:
            await self._remote.send_input(pty.pid, payload)
            return
        await (await self._sandbox.vm.channel()).send_input(pty.pid, payload)

    async def resize(self, pty: PtyHandle, cols: int, rows: int) -> None:
        if self._remote is not None:
            await self._remote.resize(pty.pid, cols, rows)
            return
        await (await self._sandbox.vm.channel()).resize(pty.pid, cols, rows)

    async def kill(self, pty: PtyHandle) -> None:
        """End the terminal's whole process tree."""
        if self._remote is not None:
            await self._remote.kill(pty.pid)
            return
        await (await self._sandbox.vm.channel()).signal(pty.pid, signal.SIGKILL)

    async def wait(self, pty: PtyHandle, timeout: float | None = None) -> int:
        """The exit code once the terminal's command ended (128+N if signal N ended it)."""
        if self._remote is not None:
            return await self._remote.wait(pty.pid, timeout)
        result = await wait_for_end(self._running[pty.pid], pty.pid, timeout)
        self._running.pop(pty.pid, None)
        (await self._sandbox.vm.channel()).end_terminal(pty.pid)
        return exit_status(result.exit_code, result.signal)


class AsyncSandbox:
    """One isolated VM: ``create()`` it, or use it as a context manager.

    With ``pool=`` the VM comes from that pool and goes back to it on ``kill()``;
    otherwise a fresh VM is started from the golden state and destroyed on ``kill()``,
    by ``runtime`` when given (one runtime can serve many sandboxes) or by a runtime of
    the sandbox's own. Arguments are checked here, before any VM starts.
    """

    def __init__(
        self,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str | ResourceProfile = "light",
        network: NetworkChoice = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
        runtime: Runtime | None = None,
        workspace: str | os.PathLike[str] | Workspace | None = None,
        workspace_readonly: bool = False,
        secrets: Mapping[str, str] | None = None,
        server: str | None = None,
        token: str | None = None,
        labels: Mapping[str, str] | None = None,
        lifetime_seconds: float = 3600.0,
    ) -> None:
        self.remote: RemoteClient | None = None
        self.server, self.token = server, token
        if server is not None:  # an `agent-vm serve` holds the VM
            if pool is not None or runtime is not None or isinstance(workspace, Workspace):
                raise ConfigError("server= cannot be combined with pool= or runtime=")
            self.remote = RemoteClient(server, token)
            self._request = {
                "image": image, "profile": profile if isinstance(profile, str) else "light",
                "network": network if isinstance(network, str) else "nat",
                "labels": dict(labels or {}), "lifetime_seconds": lifetime_seconds,
                "policy": policy.model_dump(mode="json") if policy is not None else None,
                "workspace": {"path": os.fspath(workspace), "readonly": workspace_readonly}
                if workspace is not None else None,  # below the server's --workspace-root
            }  # fmt: skip
            workspace = None
        self._workspace = _workspace(workspace, workspace_readonly)
        self._secrets = dict(secrets or {})
        secret_store.register(self._secrets)
        self._pool = pool
        self._image = image
        self._policy = policy
        self._timeout = timeout
        self._settings = settings
        self._own_runtime = pool is None and runtime is None and server is None
        self._runtime = pool.runtime if pool is not None else runtime or Runtime(settings)
        if server is None:
            self._spec = self._runtime.spec(profile=profile, network=network)
        self._vm: RunningVM | None = None
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)

    @classmethod
    async def create(
        cls,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str | ResourceProfile = "light",
        network: NetworkChoice = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
        runtime: Runtime | None = None,
        workspace: str | os.PathLike[str] | Workspace | None = None,
        workspace_readonly: bool = False,
        secrets: Mapping[str, str] | None = None,
        server: str | None = None,
        token: str | None = None,
        labels: Mapping[str, str] | None = None,
        lifetime_seconds: float = 3600.0,
    ) -> AsyncSandbox:
        """A running sandbox (from ``pool`` when given; then its network comes from the
        pool; from an ``agent-vm serve`` at ``server`` when given)."""
        sandbox = cls(
            pool=pool,
            image=image,
            profile=profile,
            network=network,
            policy=policy,
            timeout=timeout,
            settings=settings,
            runtime=runtime,
            workspace=workspace,
            workspace_readonly=workspace_readonly,
            secrets=secrets,
            server=server,
            token=token,
            labels=labels,
            lifetime_seconds=lifetime_seconds,
        )
        await sandbox.start()
        return sandbox

    @property
    def blocked(self) -> list[Blocked]:
        """Recent blocked network attempts of this sandbox (destination, port, reason);
        through a server: ``await blocked_attempts()``."""
        vm = self.vm
        return vm.guard.blocked(vm.name) if vm.guard is not None else []

    async def blocked_attempts(self) -> list[Blocked]:
        """Recent blocked network attempts, locally or through the server."""
        if self.remote is not None:
            return await self.remote.blocked()
        return self.blocked

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Change what this sandbox may reach; in force when this returns."""
        if self.remote is not None:
            await self.remote.set_policy(policy)
            return
        await self.vm.set_policy(policy)

    @property
    def vm(self) -> RunningVM:
        if self.remote is not None:
            raise AgentVMError("this sandbox runs on a server: it has no local VM")
        if self._vm is None:
            raise AgentVMError("the sandbox is not running", hint="create() or start() it first")
        return self._vm

    @property
    def sandbox_id(self) -> str:
        if self.remote is not None:
            return self.remote.prefix.rsplit("/", 1)[1]
        return self.vm.name

    async def start(self) -> None:
        """Start (or acquire) the VM and attach its workspace; a no-op when running."""
        if self.remote is not None:
            if self.remote.id is None:
                await self.remote.create(self._request)
            return
        if self._vm is not None:
            return
        if self._pool is not None:
            vm = await self._pool.acquire(self._timeout)
            try:
                if self._policy is not None:
                    await vm.set_policy(self._policy)
                if self._workspace is not None:
                    await vm.attach_workspace(self._workspace)
            except BaseException:
                await self._pool.release(vm)
                raise
            self._vm = vm
            return
        if self._own_runtime and self._runtime.closed:  # started again after kill()
            self._runtime = Runtime(self._settings)
        try:
            vm = await self._runtime.vm(image=self._image, spec=self._spec, policy=self._policy)
            try:
                if self._workspace is not None:
                    await vm.attach_workspace(self._workspace)
            except BaseException:
                await vm.close()
                raise
            self._vm = vm
        except BaseException:
            if self._own_runtime:
                await self._runtime.close()
            raise

    @property
    def secrets(self) -> Mapping[str, str]:
        """Variables every command gets (values redacted from agent-vm's logs)."""
        return self._secrets

    @property
    def workspace(self) -> Workspace | None:
        """The host directory shared with this sandbox, if any."""
        return self._workspace

    async def kill(self) -> None:
        """Destroy the sandbox (or hand it back to its pool). Idempotent."""
        if self.remote is not None:
            await self.remote.delete()
            return
        vm, self._vm = self._vm, None
        if vm is None:
            return
        if self._pool is not None:
            try:
                await vm.detach_workspace()  # before anything else may use the VM
            finally:
                await self._pool.release(vm)
            return
        try:
            await vm.close()
        finally:
            if self._own_runtime:
                await self._runtime.close()

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
