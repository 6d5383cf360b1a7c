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
from agent_vm.core.template import NetworkMode, ResourceProfile
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.golden import GoldenStore, start_clone
from agent_vm.execution.machine import MachineSpec, RunningVM, parse_network
from agent_vm.execution.pool import VMPool
from agent_vm.execution.result import ExecutionResult
from agent_vm.host.accel import detect_accel
from agent_vm.image.builder import ImageBuilder
from agent_vm.network.guard import Blocked, NetworkGuard
from agent_vm.network.policy import EgressPolicy

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
        network: str = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
    ) -> None:
        self._pool = pool
        self._image = image
        self._profile = profile
        self._network = network
        self._policy = policy
        self._timeout = timeout
        self._settings = settings
        self._vm: RunningVM | None = None
        self._connection: LibvirtConnection | None = None
        self._guard: NetworkGuard | None = None
        self.commands = AsyncCommands(self)

    @classmethod
    async def create(
        cls,
        *,
        pool: VMPool | None = None,
        image: str | None = None,
        profile: str = "light",
        network: str = "nat",
        policy: EgressPolicy | None = None,
        timeout: float = 60.0,
        settings: Settings | None = None,
    ) -> AsyncSandbox:
        """A running sandbox (from ``pool`` when given; then its network comes from the pool)."""
        sandbox = cls(
            pool=pool,
            image=image,
            profile=profile,
            network=network,
            policy=policy,
            timeout=timeout,
            settings=settings,
        )
        await sandbox.start()
        return sandbox

    @property
    def blocked(self) -> list[Blocked]:
        """Recent blocked network attempts of this sandbox (destination, port, reason)."""
        vm = self.vm
        return vm.guard.blocked(vm.name) if vm.guard is not None else []

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Change what this sandbox may reach; in force when this returns."""
        await self.vm.set_policy(policy)

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
            vm = await self._pool.acquire(self._timeout)
            self._vm = vm
            if self._policy is not None:
                await vm.set_policy(self._policy)
            return
        settings = self._settings or load_settings()
        image = ImageBuilder(settings).ensure(self._image)
        mode, bridge = parse_network(self._network)
        spec = MachineSpec(
            profile=ResourceProfile.preset(self._profile),
            accel=detect_accel(settings.accel).accel,
            network_mode=mode,
            bridge=bridge,
        )
        connection = LibvirtConnection(settings.libvirt_uri)
        guard = NetworkGuard(connection, settings) if mode is NetworkMode.NAT_FILTERED else None
        try:
            connection.open()
            if guard is not None:
                await guard.start()
            store = GoldenStore(settings.state_dir, settings.vms_dir, settings.ram_dir)
            golden = await store.ensure(
                connection, image, spec, guard=guard, boot_timeout=settings.boot_timeout
            )
            self._vm = await start_clone(
                connection, image, golden, spec, vms_dir=settings.vms_dir, guard=guard,
                policy=self._policy, timeout=self._timeout,
            )  # fmt: skip
        except BaseException:
            if guard is not None:
                await guard.close()
            connection.close()
            raise
        self._connection, self._guard = connection, guard

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
            if self._guard is not None:
                await self._guard.close()
                self._guard = None
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
