"""Sandboxes in the shape users of E2B-style SDKs know, over a pool or a fresh VM.

This module is the one implementation; ``_sync.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from types import TracebackType

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import ResourceProfile
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.golden import GoldenStore, start_clone
from agent_vm.execution.machine import MachineSpec, RunningVM
from agent_vm.execution.pool import VMPool
from agent_vm.execution.result import ExecutionResult
from agent_vm.host.accel import detect_accel
from agent_vm.image.builder import ImageBuilder

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
        user: str = "root",
        stdin: str | bytes | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
    ) -> CommandResult:
        """Run ``cmd`` (a string goes through bash, a list is exec'd) and wait for it."""
        return await self._executor.execute(
            self._sandbox.vm,
            cmd,
            timeout=timeout,
            env=envs,
            cwd=cwd,
            user=user,
            stdin=stdin,
            on_stdout=_text(on_stdout),
            on_stderr=_text(on_stderr),
        )


class AsyncSandbox:
    """One isolated VM: ``create()`` it, or use it as a context manager.

    With ``pool=`` the VM comes from that pool and goes back to it on ``kill()``;
    otherwise a fresh VM is started from the golden state and destroyed on ``kill()``.
    """

    def __init__(
        self,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str = "light",
        timeout: float = 60.0,
        settings: Settings | None = None,
    ) -> None:
        self._pool = pool
        self._image = image
        self._profile = profile
        self._timeout = timeout
        self._settings = settings
        self._vm: RunningVM | None = None
        self._connection: LibvirtConnection | None = None
        self.commands = AsyncCommands(self)

    @classmethod
    async def create(
        cls,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str = "light",
        timeout: float = 60.0,
        settings: Settings | None = None,
    ) -> AsyncSandbox:
        """A running sandbox (from ``pool`` when given)."""
        sandbox = cls(pool=pool, image=image, profile=profile, timeout=timeout, settings=settings)
        await sandbox.start()
        return sandbox

    @property
    def vm(self) -> RunningVM:
        if self._vm is None:
            raise AgentVMError("the sandbox is not running", hint="create() or start() it first")
        return self._vm

    @property
    def sandbox_id(self) -> str:
        return self.vm.name

    async def start(self) -> None:
        """Start (or acquire) the VM; a no-op when already running."""
        if self._vm is not None:
            return
        if self._pool is not None:
            self._vm = await self._pool.acquire(self._timeout)
            return
        settings = self._settings or load_settings()
        image = ImageBuilder(settings).ensure(self._image)
        spec = MachineSpec(
            profile=ResourceProfile.preset(self._profile), accel=detect_accel(settings.accel).accel
        )
        connection = LibvirtConnection(settings.libvirt_uri)
        try:
            connection.open()
            store = GoldenStore(settings.state_dir, settings.vms_dir, settings.ram_dir)
            golden = await store.ensure(connection, image, spec, boot_timeout=settings.boot_timeout)
            self._vm = await start_clone(
                connection, image, golden, spec, vms_dir=settings.vms_dir, timeout=self._timeout
            )
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def kill(self) -> None:
        """Destroy the sandbox (or hand it back to its pool). Idempotent."""
        vm, self._vm = self._vm, None
        if vm is None:
            return
        if self._pool is not None:
            await self._pool.release(vm)
            return
        try:
            await vm.close()
        finally:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

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
