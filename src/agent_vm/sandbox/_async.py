"""Sandboxes in the shape users of E2B-style SDKs know, over a pool or a fresh VM.

This module is the one implementation; ``_sync.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from types import TracebackType

from agent_vm.config import Settings
from agent_vm.core.template import ResourceProfile
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.result import ExecutionResult
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.spec import NetworkChoice
from agent_vm.network.blocked import Blocked
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
    ) -> None:
        self._pool = pool
        self._image = image
        self._policy = policy
        self._timeout = timeout
        self._settings = settings
        self._own_runtime = pool is None and runtime is None
        self._runtime = pool.runtime if pool is not None else runtime or Runtime(settings)
        self._spec = self._runtime.spec(profile=profile, network=network)
        self._vm: RunningVM | None = None
        self.commands = AsyncCommands(self)

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
            runtime=runtime,
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
                try:
                    await vm.set_policy(self._policy)
                except BaseException:
                    self._vm = None
                    await self._pool.release(vm)
                    raise
            return
        if self._own_runtime and self._runtime.closed:  # started again after kill()
            self._runtime = Runtime(self._settings)
        try:
            self._vm = await self._runtime.vm(
                image=self._image, spec=self._spec, policy=self._policy
            )
        except BaseException:
            if self._own_runtime:
                await self._runtime.close()
            raise

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
