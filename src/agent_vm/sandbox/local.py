"""The local backend: sandboxes on this host's VMs, from a warm pool when one matches,
else a clone of a golden state (or a cold boot). What ``AsyncSandbox()`` uses without a
server, and what ``agent-vm serve`` holds behind its API. Its commands: ``localcmd.py``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent_vm import timeutil
from agent_vm.communication.files import FileService
from agent_vm.config import Settings
from agent_vm.errors import (
    AgentVMError,
    NotFoundError,
)
from agent_vm.execution.pool import VMPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.shells import PoolStats
from agent_vm.logs import get_logger
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox.base import (
    CommandInfo,
    CommandSpec,
    GuestFigures,
    PoolInfo,
    Progress,
    SandboxHandle,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
)
from agent_vm.sandbox.journal import prune
from agent_vm.sandbox.localcmd import LocalCommand, new_id

log = get_logger(__name__)


class LocalSandbox(SandboxHandle):
    """A sandbox on one of this host's VMs."""

    def __init__(
        self,
        vm: RunningVM,
        spec: SandboxSpec,
        release: Callable[[RunningVM], Awaitable[None]],
        pooled: bool = False,
    ) -> None:
        self.id = new_id("sb")
        self.vm = vm
        self.spec = spec
        self.state = SandboxState.RUNNING
        self.created_at = timeutil.now()
        self.paused_because: str | None = None
        self._release = release
        self.pooled = pooled
        self._commands: dict[str, LocalCommand] = {}
        self._files = FileService(vm.channel, vm.staging)

    def info(self) -> SandboxInfo:
        profile = self.spec.profile if isinstance(self.spec.profile, str) else "custom"
        return SandboxInfo(
            self.id, self.state, self.spec.image, profile, self.spec.network, self.created_at,
            dict(self.spec.labels), self.vm.name, paused_because=self.paused_because,
            pooled=self.pooled,
        )  # fmt: skip

    # ------------------------------------------------------------------ commands

    async def run(self, spec: CommandSpec) -> LocalCommand:
        self._require("run")
        command = LocalCommand(self, spec)
        await command.start()
        self._commands[command.id] = command
        return command

    async def command(self, command_id: str) -> LocalCommand:
        self._require("command")
        found = self._commands.get(command_id)
        if found is None:
            raise NotFoundError(f"no command {command_id!r} in sandbox {self.id}")
        return found

    async def commands(self) -> list[CommandInfo]:
        self._require("commands")
        return [command.info() for command in self._commands.values()]

    def ended(self, command: LocalCommand) -> None:
        """A command ended: forget the oldest ended ones past the budget."""
        held = list(self._commands.values())
        for index in prune([c.journal for c in held]):
            self._commands.pop(held[index].id, None)

    # ------------------------------------------------------------------ the rest

    @property
    def files(self) -> FileService:
        self._require("files")
        return self._files

    async def policy(self) -> EgressPolicy | None:
        self._require("policy")
        guard = self.vm.guard
        return guard.policy(self.vm.name) if guard is not None else None

    async def set_policy(self, policy: EgressPolicy) -> None:
        self._require("set_policy")
        await self.vm.set_policy(policy)

    async def blocked(self) -> list[Blocked]:
        self._require("blocked")
        guard = self.vm.guard
        return guard.blocked(self.vm.name) if guard is not None else []

    async def blocked_count(self) -> int:
        self._require("blocked_count")
        guard = self.vm.guard
        return guard.blocked_count(self.vm.name) if guard is not None else 0

    async def stats(self) -> GuestFigures:
        self._require("stats")
        status = await (await self.vm.channel()).ping(timeout=2.0)
        return GuestFigures(status.uptime, status.running, status.load1, status.mem_available_kib)

    async def pause(self, reason: str = "requested") -> None:
        """Suspend the VM: nothing runs in it, nothing is lost (its memory stays)."""
        self._require("pause")
        if self.state is SandboxState.PAUSED:
            return
        await asyncio.to_thread(self.vm.vm.pause)
        self.state, self.paused_because = SandboxState.PAUSED, reason

    async def resume(self) -> None:
        self._require("resume")
        if self.state is SandboxState.RUNNING:
            return
        await asyncio.to_thread(self.vm.vm.resume)
        self.state, self.paused_because = SandboxState.RUNNING, None

    async def close(self) -> None:
        if self.state in (SandboxState.CLOSING, SandboxState.CLOSED):
            return
        paused = self.state is SandboxState.PAUSED
        self.state = SandboxState.CLOSING
        try:
            if paused:  # a pool takes it back running
                with contextlib.suppress(AgentVMError):
                    await asyncio.to_thread(self.vm.vm.resume)
            for command in list(self._commands.values()):
                await command.cancel()
            await self._release(self.vm)
        finally:
            self.state = SandboxState.CLOSED


@dataclass(frozen=True)
class PoolKey:
    """What a pool's VMs are: a request matches when all three are the same."""

    image: str | None
    profile: str
    network: str


class LocalBackend:
    """Sandboxes on this host. ``pools``: warm pools by what they hold (a request that
    matches one takes its VM); ``pool``: one pool every request uses. Without a runtime
    the backend makes one and closes it with itself."""

    def __init__(
        self,
        runtime: Runtime | None = None,
        *,
        settings: Settings | None = None,
        pools: dict[PoolKey, VMPool] | None = None,
        pool: VMPool | None = None,
    ) -> None:
        self._own_runtime = runtime is None and pool is None
        self._settings = settings
        self.runtime = pool.runtime if pool is not None else runtime or Runtime(settings)
        self.warm = dict(pools or {})
        self._pool = pool
        self._held: dict[str, LocalSandbox] = {}

    def check(self, spec: SandboxSpec) -> None:
        """Refuse what this host cannot give before anything starts (no daemon, no VM):
        hardware it lacks, a network it cannot make, an image never built."""
        if self._pool is not None:
            return
        self.runtime.spec(profile=spec.profile, network=spec.network)
        if spec.image is not None and spec.image != self.runtime.settings.image:
            self.runtime.images.require(spec.image)

    async def acquire(self, spec: SandboxSpec, progress: Progress | None = None) -> LocalSandbox:
        if self._own_runtime and self.runtime.closed:  # used again after close()
            self.runtime = Runtime(self._settings)
        pool = self._pool or self._matching(spec)
        if pool is not None:
            vm = await pool.acquire(spec.acquire_timeout)
            release = self._to_pool(pool)
        else:
            machine = self.runtime.spec(profile=spec.profile, network=spec.network)
            vm = await self.runtime.vm(
                image=spec.image, spec=machine, policy=spec.policy, cold=spec.cold,
                **({"progress": progress} if progress is not None else {}),
            )  # fmt: skip
            release = _destroy
        try:
            if pool is not None and spec.policy is not None:
                await vm.set_policy(spec.policy)
            if spec.workspace is not None:
                await vm.attach_workspace(spec.workspace)
        except BaseException:
            await release(vm)
            raise
        handle = LocalSandbox(vm, spec, release, pooled=pool is not None)
        self._held[handle.id] = handle
        return handle

    def _matching(self, spec: SandboxSpec) -> VMPool | None:
        if spec.cold or not isinstance(spec.profile, str):
            return None
        return self.warm.get(PoolKey(spec.image, spec.profile, spec.network))

    def _to_pool(self, pool: VMPool) -> Callable[[RunningVM], Awaitable[None]]:
        async def release(vm: RunningVM) -> None:
            try:
                await vm.detach_workspace()  # the user's directory goes before the VM does
            finally:
                await pool.release(vm)

        return release

    async def get(self, sandbox_id: str) -> LocalSandbox:
        found = self._held.get(sandbox_id)
        if found is None or found.state is SandboxState.CLOSED:
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return found

    async def list(self) -> builtins.list[SandboxHandle]:
        return [h for h in self._held.values() if h.state is not SandboxState.CLOSED]

    async def release(self, handle: SandboxHandle) -> None:
        try:
            await handle.close()
        finally:
            self._held.pop(handle.id, None)

    def pool_stats(self) -> dict[str, PoolStats]:
        """The warm pools' own figures (start times too), for the metrics."""
        return {
            f"{key.image or ''}:{key.profile}:{key.network}": pool.stats()
            for key, pool in self.warm.items()
        }

    async def pools(self) -> builtins.list[PoolInfo]:
        found = []
        for key, pool in self.warm.items():
            stats = pool.stats()
            found.append(PoolInfo(
                key.image, key.profile, key.network, pool.min_size, pool.max_size,
                stats.idle, stats.in_use, stats.starting, stats.standby, stats.started,
                stats.replaced_dead,
            ))  # fmt: skip
        return found

    async def close(self) -> None:
        for handle in list(self._held.values()):
            with contextlib.suppress(Exception):
                await self.release(handle)
        if self._own_runtime:
            await self.runtime.close()


async def _destroy(vm: RunningVM) -> None:
    await vm.close()
