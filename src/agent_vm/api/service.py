"""What the server does, HTTP-free: every route (and every later door) goes through here.

One place for each check: the owner (a token sees only its sandboxes: 404 otherwise),
quotas (sandboxes and running commands per token: 429), lifetimes (a reaper reclaims
expired sandboxes), and the audit log. Whether a call is legal in the sandbox's state
(paused, closing, ...) is the handle's own check (``sandbox/base.py``), the same for
every caller. Sandboxes come from a ``Backend``: the local runtime today; a backend on
other hosts would plug in here and nothing above it would change.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

from agent_vm.api.admission import resolve_workspace
from agent_vm.api.lifecycle import Hosted, Lifecycle
from agent_vm.api.tokens import TokenRecord
from agent_vm.api.watch import Watch, Watched
from agent_vm.communication.fileapi import Files, WriteData
from agent_vm.communication.workspace import Workspace
from agent_vm.errors import NotFoundError, QuotaError
from agent_vm.logs import get_logger
from agent_vm.monitoring.anomaly import Alert
from agent_vm.network.egress import ProxyEvent
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox.base import (
    Backend,
    CommandInfo,
    CommandSource,
    CommandSpec,
    Exit,
    ExposedPort,
    GuestFigures,
    Output,
    PoolInfo,
    SandboxSpec,
    SandboxState,
)

log = get_logger(__name__)

REAP_INTERVAL = 1.0


class SandboxService(Lifecycle):
    def __init__(
        self,
        backend: Backend,
        watch: Watch,
        workspace_root: Path | None = None,
        ports_host: str = "127.0.0.1",
    ) -> None:
        self.backend = backend
        self.ports_host = ports_host  # exposed ports listen where the server does
        self.watch = watch
        self.workspace_root = workspace_root
        self.sandboxes: dict[str, Hosted] = {}
        self._commands: dict[str, str] = {}  # command id -> sandbox id
        self._running: dict[str, int] = {}  # token id -> commands running
        self._starting: dict[str, int] = {}  # token id -> sandboxes being acquired
        self._pending: dict[str, int] = {}  # token id -> sandboxes being released
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.adopt()
        self._reaper = asyncio.create_task(self._reap_expired(), name="agent-vm-lifetimes")
        self.watch.attach(self._watched, self._act)

    def egress_event(self, event: ProxyEvent) -> None:
        """The egress proxy's report of one of our sandboxes (by its domain)."""
        for hosted in self.sandboxes.values():
            if hosted.handle.info().domain == event.vm:
                self.watch.egress(hosted.id, hosted.owner, event.kind, event.data)
                return

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.close_paused()
        for sandbox_id in list(self.sandboxes):
            with contextlib.suppress(Exception):
                await self._remove(sandbox_id, "shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watch.close()

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for hosted in list(self.sandboxes.values()):
                if hosted.deadline <= now and hosted.handle.state is not SandboxState.PAUSED:
                    with contextlib.suppress(Exception):
                        await self.expire(hosted)

    def _watched(self) -> list[Watched]:
        return [
            Watched(h.id, h.owner, h.handle, h.handle.info().domain)
            for h in list(self.sandboxes.values())
        ]

    # ------------------------------------------------------------------ sandboxes

    def _owned(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None or hosted.owner != token.id:
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return hosted

    async def create(
        self,
        token: TokenRecord,
        spec: SandboxSpec,
        workspace: tuple[str, bool] | None = None,
    ) -> Hosted:
        if workspace is not None:  # checked before any VM is taken
            path, readonly = workspace
            found = resolve_workspace(self.workspace_root, path, anywhere=token.any_workspace)
            spec = replace(spec, workspace=Workspace(path=found, readonly=readonly))
        if spec.snapshot is not None and not self.owns_snapshot(token, spec.snapshot):
            raise NotFoundError(f"no snapshot {spec.snapshot!r}")
        self.backend.check(spec)
        async with self._lock:  # quota check and reservation in one step
            self._quota_room(token, 1)
            self._starting[token.id] = self._starting.get(token.id, 0) + 1
        started = time.monotonic()
        try:
            handle = await self.backend.acquire(spec)
        finally:
            self._starting[token.id] -= 1
        hosted = Hosted(
            handle, token.id, token.name, spec.lifetime, time.monotonic() + spec.lifetime,
            spec.anomaly_action, on_expiry=spec.on_expiry,
        )  # fmt: skip
        handle.keep = hosted.notes()
        self.sandboxes[hosted.id] = hosted
        seconds = time.monotonic() - started
        info = handle.info()
        self.watch.metrics.acquire_seconds.labels("pool" if info.pooled else "clone").observe(
            seconds
        )
        self.watch.record(
            "sandbox_created", sandbox=hosted.id, owner=token.id, owner_name=token.name,
            vm=info.domain, image=spec.image, profile=info.profile, network=spec.network,
            labels=dict(spec.labels), pooled=info.pooled, snapshot=spec.snapshot,
            workspace=str(spec.workspace.path) if spec.workspace else None,
            policy=spec.policy.model_dump(mode="json") if spec.policy else None,
            seconds=round(seconds, 4),
        )  # fmt: skip
        log.info("sandbox_created", sandbox=hosted.id, owner=token.id, vm=info.domain)
        return hosted

    def _quota_room(self, token: TokenRecord, more: int) -> None:
        """Refuse (429) past the token's sandboxes (held, starting, being released)."""
        mine = sum(1 for h in self.sandboxes.values() if h.owner == token.id)
        mine += self._starting.get(token.id, 0) + self._pending.get(token.id, 0)
        if mine + more > token.max_sandboxes:
            raise QuotaError(
                f"token {token.name!r} has {mine} sandboxes; {more} more is past its limit",
                hint="delete one, or raise max_sandboxes (agent-vm token create)",
            )

    def list(
        self, token: TokenRecord, labels: Mapping[str, str] | None = None
    ) -> builtins.list[Hosted]:
        wanted = dict(labels or {})
        return [
            h
            for h in self.sandboxes.values()
            if h.owner == token.id
            and all(h.handle.info().labels.get(k) == v for k, v in wanted.items())
        ]

    def get(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        return self._owned(token, sandbox_id)

    def keep_alive(self, token: TokenRecord, sandbox_id: str, lifetime: float) -> Hosted:
        hosted = self._owned(token, sandbox_id)
        hosted.lifetime = lifetime
        hosted.deadline = time.monotonic() + lifetime
        return hosted

    async def delete(self, token: TokenRecord, sandbox_id: str) -> None:
        """Gone for the caller at once; the VM is released in the background (a pool
        resets it, a fresh one is destroyed), still counted in the token's quota."""
        self._owned(token, sandbox_id)
        self._release_later(sandbox_id, "deleted")

    async def _act(self, sandbox_id: str, alerts: builtins.list[Alert]) -> None:
        """The monitor's alerts: audited and counted there, acted on here."""
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None:
            return
        for action, rule in self.watch.actions(alerts, hosted.anomaly_action, hosted.owner):
            if action == "pause":
                await self._pause(hosted, f"anomaly: {rule}", to_disk=False)
            elif action == "kill":
                self._release_later(hosted.id, f"anomaly: {rule}")
                return

    def _release_later(self, sandbox_id: str, reason: str) -> None:
        hosted = self._detach(sandbox_id, reason)
        if hosted is not None:
            self._spawn(self._release(hosted), f"release-{sandbox_id}")

    async def _remove(self, sandbox_id: str, reason: str) -> None:
        hosted = self._detach(sandbox_id, reason)
        if hosted is not None:
            await self._release(hosted)

    def _detach(self, sandbox_id: str, reason: str) -> Hosted | None:
        hosted = self.sandboxes.pop(sandbox_id, None)
        if hosted is None:
            return None
        self.watch.sandbox_gone(hosted.id, hosted.owner, hosted.handle.info().domain, reason)
        for command_id in hosted.commands:
            self._commands.pop(command_id, None)
        self._pending[hosted.owner] = self._pending.get(hosted.owner, 0) + 1
        return hosted

    async def _release(self, hosted: Hosted) -> None:
        started = time.monotonic()
        try:
            await self.backend.release(hosted.handle)
            self.watch.metrics.release_seconds.observe(time.monotonic() - started)
            log.info("sandbox_deleted", sandbox=hosted.id, owner=hosted.owner)
        except Exception as exc:  # the VM's own teardown logs and retries what it can
            log.warning("sandbox_release_failed", sandbox=hosted.id, error=str(exc))
        finally:
            self._pending[hosted.owner] -= 1

    async def pools(self) -> builtins.list[PoolInfo]:
        return await self.backend.pools()

    # ------------------------------------------------------------------ commands

    async def run(self, token: TokenRecord, sandbox_id: str, spec: CommandSpec) -> CommandInfo:
        hosted = self._owned(token, sandbox_id)
        running = self._running.get(token.id, 0)
        if running >= token.max_executions:
            raise QuotaError(
                f"token {token.name!r} has {running} executions running, its limit",
                hint="wait for one to finish, or raise max_executions",
            )
        source = await hosted.handle.run(spec)
        self._commands[source.id] = hosted.id
        hosted.commands.add(source.id)
        self._running[token.id] = running + 1
        terminal = spec.pty is not None
        self.watch.record(
            "terminal_started" if terminal else "execution_started", sandbox=hosted.id,
            execution=source.id, owner=token.id, owner_name=token.name,
            command=list(spec.cmd) if isinstance(spec.cmd, tuple) else spec.cmd,
            code_bytes=len(spec.code) if spec.code is not None else None,
            env_keys=sorted(spec.envs), cwd=spec.cwd, user=spec.user, timeout=spec.timeout,
            pty=list(spec.pty) if terminal and spec.pty else None,
        )  # fmt: skip
        self._spawn(self._account(hosted, token, source, terminal), f"account-{source.id}")
        return source.info()

    async def _account(
        self, hosted: Hosted, token: TokenRecord, source: CommandSource, terminal: bool
    ) -> None:
        """Follow a command to its end: its output's size, the audit line, the quota."""
        began = time.monotonic()
        size = 0
        exit: Exit | None = None
        try:
            async for event in source.follow():
                if isinstance(event, Output):
                    size += len(event.data)
                else:
                    exit = event
        finally:
            self._running[token.id] -= 1
        alerts = self.watch.command_finished(
            hosted.id, hosted.owner, source.id, exit, time.monotonic() - began, size,
            terminal=terminal, live=hosted.id in self.sandboxes,
        )  # fmt: skip
        if alerts:
            await self._act(hosted.id, alerts)

    async def command(self, token: TokenRecord, command_id: str) -> CommandSource:
        sandbox_id = self._commands.get(command_id)
        hosted = self.sandboxes.get(sandbox_id) if sandbox_id is not None else None
        if hosted is None or hosted.owner != token.id:
            raise NotFoundError(f"no execution {command_id!r}")
        try:
            return await hosted.handle.command(command_id)
        except NotFoundError:
            self._commands.pop(command_id, None)  # forgotten by its sandbox meanwhile
            hosted.commands.discard(command_id)
            raise NotFoundError(f"no execution {command_id!r}") from None

    async def commands(self, token: TokenRecord, sandbox_id: str) -> builtins.list[CommandInfo]:
        return await self._owned(token, sandbox_id).handle.commands()

    # ------------------------------------------------------------------ files

    def files(self, token: TokenRecord, sandbox_id: str) -> Files:
        return self._owned(token, sandbox_id).handle.files

    async def download(
        self, token: TokenRecord, sandbox_id: str, path: str, *, tree: bool = False
    ) -> AsyncIterator[bytes]:
        """A file's bytes (or a tree's tar), counted into the audit when done. The first
        chunk is fetched before this returns, so a refusal (missing, a directory) is an
        error answer, never a response that breaks off."""
        files = self.files(token, sandbox_id)
        chunks = files.tar_stream(path) if tree else files.read_stream(path)
        iterator = aiter(chunks)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            first = b""
        op = "download_tree" if tree else "download"

        async def stream() -> AsyncIterator[bytes]:
            size = len(first)
            try:
                if first:
                    yield first
                async for chunk in iterator:
                    size += len(chunk)
                    yield chunk
            finally:
                self.watch.record("file_transfer", sandbox=sandbox_id, owner=token.id, op=op,
                                  path=path, bytes=size)  # fmt: skip

        return stream()

    async def upload(
        self, token: TokenRecord, sandbox_id: str, path: str, data: WriteData, *,
        mode: int | None = None, tree: bool = False,
    ) -> int:  # fmt: skip
        files = self.files(token, sandbox_id)
        written = await files.untar(path, data) if tree else await files.write(path, data, mode)
        self.watch.record("file_transfer", sandbox=sandbox_id, owner=token.id,
                          op="upload_tree" if tree else "upload", path=path,
                          bytes=written)  # fmt: skip
        return written

    # ------------------------------------------------------------------ network, figures

    async def policy(self, token: TokenRecord, sandbox_id: str) -> EgressPolicy | None:
        """None: the sandbox has no filtered network (isolated, a bridge)."""
        return await self._owned(token, sandbox_id).handle.policy()

    async def set_policy(self, token: TokenRecord, sandbox_id: str, policy: EgressPolicy) -> None:
        await self._owned(token, sandbox_id).handle.set_policy(policy)
        self.watch.record("policy_changed", sandbox=sandbox_id, owner=token.id,
                          policy=policy.model_dump(mode="json"))  # fmt: skip

    async def blocked(self, token: TokenRecord, sandbox_id: str) -> builtins.list[Blocked]:
        return await self._owned(token, sandbox_id).handle.blocked()

    async def expose(self, token: TokenRecord, sandbox_id: str, port: int) -> ExposedPort:
        """A sandbox port on this server's host, for whoever holds its own token."""
        handle = self._owned(token, sandbox_id).handle
        exposed = await handle.expose(port, token=token_urlsafe(24), host=self.ports_host)
        self.watch.record("port_exposed", sandbox=sandbox_id, owner=token.id, port=port,
                          host=exposed.host)  # fmt: skip
        return exposed

    async def stats(self, token: TokenRecord, sandbox_id: str) -> GuestFigures:
        return await self._owned(token, sandbox_id).handle.stats()
