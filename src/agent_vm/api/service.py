"""What the server holds: warm pools, sandboxes by owner, executions that can be
re-attached to, lifetimes, quotas. HTTP-free (``app.py`` maps it to routes).

Where sandboxes come from is one seam, :class:`SandboxSource`: today the local runtime
(its pools first, then a fresh clone from a golden state); a backend on other hosts would
implement the same two calls and nothing above it would change.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from agent_vm import timeutil
from agent_vm.api.tokens import TokenRecord
from agent_vm.api.watch import Watch
from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.workspace import Workspace
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.shells import PoolStats
from agent_vm.logs import get_logger
from agent_vm.network.policy import EgressPolicy

log = get_logger(__name__)

MAX_EVENT_BYTES = 16 * 2**20  # kept per execution for re-attaching clients
FINISHED_BUDGET = 256 * 2**20  # output of finished executions kept, all together
FINISHED_KEEP = 1000
REAP_INTERVAL = 1.0


class NotFound(AgentVMError):
    """No such sandbox or execution for this token (also when another token owns it)."""


class OverQuota(AgentVMError):
    """The token's quota is used up."""


class Paused(AgentVMError):
    """The sandbox is paused (an anomaly rule's action): resume it first."""


@dataclass(frozen=True)
class PoolSpec:
    """A warm pool the server holds: ``image:profile:network:min:max`` on the command line."""

    image: str | None = None
    profile: str = "light"
    network: str = "nat"
    min_size: int = 2
    max_size: int = 4

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        parts = text.split(":")
        if len(parts) != 5:
            raise ConfigError(f"--pool {text!r}: give IMAGE:PROFILE:NETWORK:MIN:MAX")
        image, profile, network, low, high = parts
        try:
            min_size, max_size = int(low), int(high)
        except ValueError:
            raise ConfigError(f"--pool {text!r}: MIN and MAX must be numbers") from None
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"--pool {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
        return cls(image or None, profile, network, min_size, max_size)


class SandboxSource(Protocol):
    """Where sandboxes come from (the seam for other backends)."""

    async def acquire(
        self, image: str | None, profile: str, network: str, policy: EgressPolicy | None
    ) -> tuple[RunningVM, VMPool | None]: ...

    async def release(self, vm: RunningVM, pool: VMPool | None) -> None: ...

    def pool_stats(self) -> Mapping[str, PoolStats]: ...


class LocalSource:
    """The local runtime: a matching warm pool when there is one, else a fresh clone."""

    def __init__(self, runtime: Runtime, pools: dict[PoolSpec, VMPool]) -> None:
        self.runtime = runtime
        self.pools = pools

    async def acquire(
        self, image: str | None, profile: str, network: str, policy: EgressPolicy | None
    ) -> tuple[RunningVM, VMPool | None]:
        for held, pool in self.pools.items():
            if (held.image, held.profile, held.network) == (image, profile, network):
                vm = await pool.acquire(timeout=60)
                if policy is not None:
                    try:
                        await vm.set_policy(policy)
                    except BaseException:
                        await pool.release(vm)
                        raise
                return vm, pool
        spec = self.runtime.spec(profile=profile, network=network)
        return await self.runtime.vm(image=image, spec=spec, policy=policy), None

    async def release(self, vm: RunningVM, pool: VMPool | None) -> None:
        if pool is not None:
            try:
                await vm.detach_workspace()  # the user's directory goes before the VM does
            finally:
                await pool.release(vm)
        else:
            await vm.close()

    def pool_stats(self) -> dict[str, PoolStats]:
        return {
            f"{spec.image or ''}:{spec.profile}:{spec.network}": pool.stats()
            for spec, pool in self.pools.items()
        }


@dataclass
class Hosted:
    """A sandbox the server hands out."""

    id: str
    owner: str
    vm: RunningVM
    pool: VMPool | None
    image: str | None
    profile: str
    network: str
    labels: dict[str, str]
    created_at: datetime
    lifetime: float
    deadline: float  # monotonic
    executions: set[str] = field(default_factory=set)
    owner_name: str = ""
    anomaly_action: str | None = None  # None: the server's
    paused: str | None = None  # why, while paused

    def view(self) -> dict[str, Any]:
        remaining = max(0.0, self.deadline - time.monotonic())
        return {
            "id": self.id,
            "image": self.image,
            "profile": self.profile,
            "network": self.network,
            "labels": self.labels,
            "created_at": self.created_at.isoformat(),
            "expires_at": (timeutil.now() + timedelta(seconds=remaining)).isoformat(),
            "pooled": self.pool is not None,
            "state": "paused" if self.paused else "running",
            "paused_because": self.paused,
        }


@dataclass
class Execution:
    """One command's events (output chunks, then its result), kept so that a client that
    lost its connection can come back with the last sequence number it saw."""

    id: str
    sandbox: str
    owner: str
    events: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    dropped: int = 0
    done: bool = False
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    target: tuple[AgentChannel, int] | None = None  # where a signal goes while it runs

    def add(self, event: dict[str, Any], size: int = 0) -> None:
        event["seq"] = len(self.events) + self.dropped
        self.events.append(event)
        self.size += size
        while self.size > MAX_EVENT_BYTES and len(self.events) > 1:  # oldest output first
            old = self.events.pop(0)
            self.dropped += 1
            self.size -= len(old.get("text", ""))
        self.changed.set()

    async def follow(self, after: int) -> AsyncIterator[dict[str, Any]]:
        """Events with ``seq > after``, live until the result."""
        position = after + 1
        while True:
            start = max(0, position - self.dropped)
            for event in self.events[start:]:
                position = event["seq"] + 1
                yield event
            if self.done and position >= len(self.events) + self.dropped:
                return
            self.changed.clear()
            if position < len(self.events) + self.dropped:
                continue
            await self.changed.wait()


class _Text:
    """Bytes to text across chunk boundaries (a character split over two chunks)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, data: bytes) -> str:
        return self.decoder.decode(data)


def resolve_workspace(root: Path | None, relative: str, *, anywhere: bool = False) -> Path:
    """A directory below the server's ``--workspace-root``: the only host directories a
    token holder may share (a path that leaves the root, also through a symlink, is
    refused). ``anywhere`` (the local token, root on this host): any absolute directory."""
    if anywhere:
        target = Path(relative)
        if not target.is_absolute() or not target.is_dir():
            raise ConfigError(f"workspace {relative!r} is not an absolute directory on this host")
        return target.resolve()
    if root is None:
        raise ConfigError(
            "this server shares no host directories",
            hint="start it with --workspace-root DIR to allow directories below DIR",
        )
    base = root.resolve()
    given = Path(relative)
    inside = given.is_absolute() and given.resolve().is_relative_to(base)
    target = given.resolve() if inside else (base / relative.lstrip("/")).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(f"workspace {relative!r} is outside the server's workspace root")
    if not target.is_dir():
        raise ConfigError(f"workspace {relative!r} is not a directory on the server")
    return target


class SandboxService:
    def __init__(
        self,
        runtime: Runtime,
        source: SandboxSource,
        workspace_root: Path | None = None,
        watch: Watch | None = None,
    ) -> None:
        self.runtime = runtime
        self.source = source
        self.watch = watch or Watch(runtime.settings)
        self.workspace_root = workspace_root
        self.sandboxes: dict[str, Hosted] = {}
        self.executions: dict[str, Execution] = {}
        self.executor = AgentExecutor()
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._starting: dict[str, int] = {}  # token id -> sandboxes being acquired
        self._pending: dict[str, int] = {}  # token id -> sandboxes being released
        self._releasing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_expired(), name="agent-vm-lifetimes")
        self.watch.attach(self)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for sandbox_id in list(self.sandboxes):
            with contextlib.suppress(Exception):
                await self._remove(sandbox_id, "shutdown")
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await self.watch.close()

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for hosted in list(self.sandboxes.values()):
                if hosted.deadline <= now:
                    log.info("sandbox_expired", sandbox=hosted.id, owner=hosted.owner)
                    with contextlib.suppress(Exception):
                        await self._remove(hosted.id, "expired")

    # ------------------------------------------------------------------ sandboxes

    def _owned(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None or hosted.owner != token.id:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return hosted

    async def create(
        self,
        token: TokenRecord,
        *,
        image: str | None,
        profile: str,
        network: str,
        labels: dict[str, str],
        lifetime: float,
        policy: EgressPolicy | None,
        workspace: tuple[str, bool] | None = None,
        anomaly_action: str | None = None,
    ) -> Hosted:
        share = None
        if workspace is not None:  # checked before any VM is taken
            path, readonly = workspace
            share = Workspace(
                path=resolve_workspace(self.workspace_root, path, anywhere=token.any_workspace),
                readonly=readonly,
            )
        async with self._lock:  # quota check and reservation in one step
            mine = sum(1 for h in self.sandboxes.values() if h.owner == token.id)
            mine += self._starting.get(token.id, 0) + self._pending.get(token.id, 0)
            if mine >= token.max_sandboxes:
                raise OverQuota(
                    f"token {token.name!r} has {mine} sandboxes, its limit",
                    hint="delete one, or raise max_sandboxes (agent-vm token create)",
                )
            self._starting[token.id] = self._starting.get(token.id, 0) + 1
        started = time.monotonic()
        try:
            vm, pool = await self.source.acquire(image, profile, network, policy)
            if share is not None:
                try:
                    await vm.attach_workspace(share)
                except BaseException:
                    await self.source.release(vm, pool)
                    raise
        finally:
            self._starting[token.id] -= 1
        hosted = Hosted(
            f"sb-{secrets.token_hex(6)}", token.id, vm, pool, image, profile, network, labels,
            timeutil.now(), lifetime, time.monotonic() + lifetime, owner_name=token.name,
            anomaly_action=anomaly_action,
        )  # fmt: skip
        self.sandboxes[hosted.id] = hosted
        seconds = time.monotonic() - started
        self.watch.metrics.acquire_seconds.labels("pool" if pool else "clone").observe(seconds)
        self.watch.record(
            "sandbox_created", sandbox=hosted.id, owner=token.id, owner_name=token.name,
            vm=vm.name, image=image, profile=profile, network=network, labels=labels,
            pooled=pool is not None, workspace=str(share.path) if share else None,
            policy=policy.model_dump(mode="json") if policy else None, seconds=round(seconds, 4),
        )  # fmt: skip
        log.info("sandbox_created", sandbox=hosted.id, owner=token.id, vm=vm.name)
        return hosted

    def list(self, token: TokenRecord) -> list[Hosted]:
        return [h for h in self.sandboxes.values() if h.owner == token.id]

    def get(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        return self._owned(token, sandbox_id)

    def keep_alive(self, token: TokenRecord, sandbox_id: str, lifetime: float) -> Hosted:
        hosted = self.get(token, sandbox_id)
        hosted.lifetime = lifetime
        hosted.deadline = time.monotonic() + lifetime
        return hosted

    async def delete(self, token: TokenRecord, sandbox_id: str) -> None:
        """Gone for the caller at once; the VM is released in the background (a pool
        resets it, a fresh one is destroyed), still counted in the token's quota."""
        self.get(token, sandbox_id)
        self._release_later(sandbox_id, "deleted")

    def _release_later(self, sandbox_id: str, reason: str) -> None:
        hosted = self._detach(sandbox_id, reason)
        if hosted is not None:
            task = asyncio.create_task(self._release(hosted), name=f"release-{sandbox_id}")
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _remove(self, sandbox_id: str, reason: str) -> None:
        hosted = self._detach(sandbox_id, reason)
        if hosted is not None:
            await self._release(hosted)

    async def pause(self, hosted: Hosted, reason: str) -> None:
        """Suspend the domain (an anomaly's action): nothing runs, nothing is lost."""
        await asyncio.to_thread(hosted.vm.vm.pause)
        hosted.paused = reason
        self.watch.record("sandbox_paused", sandbox=hosted.id, owner=hosted.owner, reason=reason)

    async def resume(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        hosted = self.get(token, sandbox_id)
        if hosted.paused:
            await asyncio.to_thread(hosted.vm.vm.resume)
            hosted.paused = None
            self.watch.record("sandbox_resumed", sandbox=hosted.id, owner=hosted.owner)
        return hosted

    async def kill_sandbox(self, hosted: Hosted, reason: str) -> None:
        """Remove the sandbox now (an anomaly's action)."""
        self._release_later(hosted.id, reason)

    def _detach(self, sandbox_id: str, reason: str) -> Hosted | None:
        hosted = self.sandboxes.pop(sandbox_id, None)
        if hosted is None:
            return None
        self.watch.sandbox_gone(hosted, reason)
        for execution_id in list(hosted.executions):
            execution = self.executions.get(execution_id)
            if execution is not None and execution.task is not None:
                execution.task.cancel()
        self._pending[hosted.owner] = self._pending.get(hosted.owner, 0) + 1
        return hosted

    async def _release(self, hosted: Hosted) -> None:
        started = time.monotonic()
        try:
            if hosted.paused:  # a pool takes it back running
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(hosted.vm.vm.resume)
            await self.source.release(hosted.vm, hosted.pool)
            self.watch.metrics.release_seconds.observe(time.monotonic() - started)
            log.info("sandbox_deleted", sandbox=hosted.id, owner=hosted.owner)
        except Exception as exc:  # the VM's own teardown logs and retries what it can
            log.warning("sandbox_release_failed", sandbox=hosted.id, error=str(exc))
        finally:
            self._pending[hosted.owner] -= 1

    # ------------------------------------------------------------------ executions

    def start_execution(
        self,
        token: TokenRecord,
        sandbox_id: str,
        command: str | Sequence[str] | None,
        *,
        code: str | None = None,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        timeout: float | None,
        stdin: str | None,
    ) -> Execution:
        hosted = self.get(token, sandbox_id)
        if hosted.paused:
            raise Paused(
                f"sandbox {sandbox_id} is paused ({hosted.paused})",
                hint=f"POST /v1/sandboxes/{sandbox_id}/resume, or delete it",
            )
        running = sum(1 for e in self.executions.values() if e.owner == token.id and not e.done)
        if running >= token.max_executions:
            raise OverQuota(
                f"token {token.name!r} has {running} executions running, its limit",
                hint="wait for one to finish, or raise max_executions",
            )
        execution = Execution(f"ex-{secrets.token_hex(6)}", sandbox_id, token.id)
        self.executions[execution.id] = execution
        hosted.executions.add(execution.id)
        out, err = _Text(), _Text()
        output = [0]
        self.watch.record(
            "execution_started", sandbox=sandbox_id, execution=execution.id, owner=token.id,
            owner_name=token.name, command=command if command is not None else None,
            code_bytes=len(code) if code is not None else None, env_keys=sorted(env),
            cwd=cwd, user=user, timeout=timeout,
        )  # fmt: skip

        def emit(stream: str, decode: _Text) -> Any:
            def on_data(data: bytes) -> None:
                output[0] += len(data)
                text = decode(data)
                if text:
                    execution.add({"type": stream, "text": text}, len(text))

            return on_data

        async def run() -> None:
            began = time.monotonic()
            try:
                result = await self.executor.execute(
                    hosted.vm, command, code=code, env=env, cwd=cwd, user=user, timeout=timeout,
                    stdin=stdin, on_stdout=emit("stdout", out), on_stderr=emit("stderr", err),
                    on_started=lambda channel, rid: setattr(execution, "target", (channel, rid)),
                )  # fmt: skip
                execution.add({
                    "type": "result", "exit_code": result.exit_code,
                    "timed_out": result.timed_out, "signal": result.signal,
                    "error": result.error, "duration": round(result.duration, 4),
                    "truncated": result.truncated,
                })  # fmt: skip
            except asyncio.CancelledError:
                execution.add({"type": "result", "exit_code": None, "killed": True,
                               "error": "killed"})  # fmt: skip
            except AgentVMError as exc:
                execution.add({"type": "result", "exit_code": None, "error": exc.message})
            finally:
                execution.done = True
                execution.target = None
                execution.changed.set()
                hosted.executions.discard(execution.id)
                self._forget_old_executions()
                final = execution.events[-1] if execution.events else {}
                alerts = self.watch.execution_finished(
                    hosted, execution.id, final, time.monotonic() - began, output[0]
                )
                if alerts and hosted.id in self.sandboxes:
                    await self.watch.act(self, hosted, alerts)

        execution.task = asyncio.create_task(run(), name=execution.id)
        return execution

    def execution(self, token: TokenRecord, execution_id: str) -> Execution:
        execution = self.executions.get(execution_id)
        if execution is None or execution.owner != token.id:
            raise NotFound(f"no execution {execution_id!r}")
        return execution

    def kill(self, token: TokenRecord, execution_id: str) -> Execution:
        execution = self.execution(token, execution_id)
        if execution.task is not None and not execution.done:
            execution.task.cancel()  # the channel sends SIGKILL to the guest's process tree
        return execution

    async def signal(self, token: TokenRecord, execution_id: str, signum: int) -> Execution:
        """Deliver ``signum`` to the command's process group in the guest (a command that
        ended meanwhile gets nothing; its result is already in its events)."""
        execution = self.execution(token, execution_id)
        if execution.target is not None and not execution.done:
            channel, rid = execution.target
            await channel.signal(rid, signum)
        return execution

    def _forget_old_executions(self) -> None:
        """Finished executions stay re-attachable while they fit a count and a byte
        budget (oldest go first): a guest's output never grows the server unbounded."""
        finished = [e for e in self.executions.values() if e.done]  # oldest first
        total = sum(e.size for e in finished)
        for execution in finished:
            if len(finished) <= FINISHED_KEEP and total <= FINISHED_BUDGET:
                break
            self.executions.pop(execution.id, None)
            finished = finished[1:]
            total -= execution.size
