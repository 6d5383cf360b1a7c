"""The service's lifecycle calls: pause, resume, snapshots, fork, lifetimes that pause,
and paused sandboxes found again when the server starts. Part of ``SandboxService``
(a mixin over its table of sandboxes), with the same checks: the owner's token (404
otherwise), quotas (429), and an audit line for each step, the parent named."""

from __future__ import annotations

import asyncio
import builtins
import math
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from agent_vm import timeutil
from agent_vm.api.tokens import TokenRecord
from agent_vm.api.watch import Watch
from agent_vm.errors import NotFoundError, QuotaError
from agent_vm.logs import get_logger
from agent_vm.sandbox.base import Backend, SandboxHandle, SandboxInfo, SandboxState, SnapshotInfo

log = get_logger(__name__)


@dataclass
class Hosted:
    """A sandbox the server hands out: its handle and what the server adds to it."""

    handle: SandboxHandle
    owner: str
    owner_name: str
    lifetime: float
    deadline: float  # monotonic; a paused sandbox does not expire
    anomaly_action: str | None = None  # None: the server's
    commands: set[str] = field(default_factory=set)
    on_expiry: str = "kill"  # or pause
    pausing: bool = False  # a pause is under way (E2B's door counts it as paused)
    # a front door's own state for it (the E2B door's env vars, pids), this process only
    door: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.handle.id

    def info(self) -> SandboxInfo:
        if self.handle.state is SandboxState.PAUSED or math.isinf(self.deadline):
            return replace(self.handle.info(), expires_at=None)  # (being) paused: no end
        remaining = max(0.0, self.deadline - time.monotonic())
        expires = timeutil.now() + timedelta(seconds=remaining)
        return replace(self.handle.info(), expires_at=expires)

    def notes(self) -> dict[str, Any]:
        """What survives a restart of the server with the paused sandbox."""
        return {
            "owner": self.owner, "owner_name": self.owner_name, "lifetime": self.lifetime,
            "anomaly_action": self.anomaly_action, "on_expiry": self.on_expiry,
        }  # fmt: skip


class Lifecycle:
    """Mixed into ``SandboxService`` (which sets these)."""

    backend: Backend
    watch: Watch
    sandboxes: dict[str, Hosted]
    _commands: dict[str, str]  # command id -> sandbox id
    _lock: asyncio.Lock

    def _owned(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        raise NotImplementedError

    def _release_later(self, sandbox_id: str, reason: str) -> None:
        raise NotImplementedError

    def _quota_room(self, token: TokenRecord, more: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ pause

    async def pause(self, token: TokenRecord, sandbox_id: str, reason: str = "requested") -> Hosted:
        hosted = self._owned(token, sandbox_id)
        await self._pause(hosted, reason)
        return hosted

    async def _pause(self, hosted: Hosted, reason: str, to_disk: bool = True) -> None:
        """To disk (a user's pause, an expiry), or frozen (an anomaly: at once, whatever
        the guest does; it does not outlive the server)."""
        if hosted.handle.state is SandboxState.PAUSED:
            return
        hosted.handle.keep = hosted.notes()
        started = time.monotonic()
        hosted.pausing = True
        try:
            await hosted.handle.pause(reason, to_disk)
        finally:
            hosted.pausing = False
        self.watch.record(
            "sandbox_paused", sandbox=hosted.id, owner=hosted.owner, reason=reason,
            to_disk=to_disk, seconds=round(time.monotonic() - started, 3),
        )  # fmt: skip

    async def resume(self, token: TokenRecord, sandbox_id: str) -> Hosted:
        hosted = self._owned(token, sandbox_id)
        await self._resume(hosted)
        return hosted

    async def _resume(self, hosted: Hosted) -> None:
        if hosted.handle.state is SandboxState.PAUSED or hosted.pausing:  # (waits for it)
            started = time.monotonic()
            await hosted.handle.resume()
            hosted.deadline = time.monotonic() + hosted.lifetime
            self.watch.record(
                "sandbox_resumed", sandbox=hosted.id, owner=hosted.owner,
                vm=hosted.handle.info().domain, seconds=round(time.monotonic() - started, 3),
            )  # fmt: skip

    async def expire(self, hosted: Hosted) -> None:
        """A lifetime ran out: kill, or pause when the sandbox asked for that."""
        log.info("sandbox_expired", sandbox=hosted.id, owner=hosted.owner)
        if hosted.on_expiry == "pause" and hosted.handle.state is SandboxState.RUNNING:
            hosted.deadline = math.inf
            try:
                await self._pause(hosted, "expired")
                return
            except Exception as exc:  # could not save it: it goes as a kill would
                log.error("expiry_pause_failed", sandbox=hosted.id, error=str(exc))
        if hosted.handle.state is not SandboxState.PAUSED:
            self._release_later(hosted.id, "expired")

    def adopt(self) -> builtins.list[Hosted]:
        """Sandboxes paused by an earlier server on this host, each back with its owner."""
        found = []
        adopt_paused = getattr(self.backend, "adopt_paused", None)
        for handle in adopt_paused() if adopt_paused is not None else []:
            notes = handle.keep
            if not notes.get("owner") or handle.id in self.sandboxes:
                continue
            hosted = Hosted(
                handle, str(notes["owner"]), str(notes.get("owner_name", "")),
                float(notes.get("lifetime", 3600.0)), math.inf, notes.get("anomaly_action"),
                on_expiry=str(notes.get("on_expiry", "kill")),
            )  # fmt: skip
            self.sandboxes[hosted.id] = hosted
            for command_id in getattr(handle, "command_ids", list)():  # still running
                hosted.commands.add(command_id)
                self._commands[command_id] = hosted.id
            found.append(hosted)
            log.info("paused_sandbox_adopted", sandbox=hosted.id, owner=hosted.owner)
        return found

    # ------------------------------------------------------------------ snapshots

    async def snapshot(self, token: TokenRecord, sandbox_id: str, name: str) -> SnapshotInfo:
        hosted = self._owned(token, sandbox_id)
        held = sum(s.disk_bytes for s in await self._snapshots_of(token))
        if held >= token.max_snapshot_gib * 2**30:
            raise QuotaError(
                f"token {token.name!r} holds {held / 2**30:.1f} GiB of snapshots, its limit",
                hint="remove some (agent-vm snapshot rm), or raise max_snapshot_gib",
            )
        hosted.handle.keep = hosted.notes()
        info = await hosted.handle.snapshot(name)
        self.watch.record(
            "snapshot_taken", sandbox=hosted.id, owner=token.id, snapshot=name,
            memory_bytes=info.memory_bytes, disk_bytes=info.disk_bytes,
            pause_seconds=info.pause_seconds,
        )  # fmt: skip
        return info

    async def _snapshots_of(self, token: TokenRecord) -> builtins.list[SnapshotInfo]:
        owners = getattr(self.backend, "snapshot_owners", None)
        mine = owners() if owners is not None else {}
        return [s for s in await self.backend.snapshots() if mine.get(s.name) == token.id]

    async def snapshots(self, token: TokenRecord) -> builtins.list[SnapshotInfo]:
        return await self._snapshots_of(token)

    async def remove_snapshot(self, token: TokenRecord, name: str) -> None:
        if name not in {s.name for s in await self._snapshots_of(token)}:
            raise NotFoundError(f"no snapshot {name!r}")
        await self.backend.remove_snapshot(name)
        self.watch.record("snapshot_removed", owner=token.id, snapshot=name)

    def owns_snapshot(self, token: TokenRecord, name: str) -> bool:
        owners = getattr(self.backend, "snapshot_owners", None)
        return owners is not None and owners().get(name) == token.id

    async def fork(self, token: TokenRecord, sandbox_id: str, count: int) -> builtins.list[Hosted]:
        hosted = self._owned(token, sandbox_id)
        async with self._lock:
            self._quota_room(token, count)
        started = time.monotonic()
        children = await hosted.handle.fork(count)
        made = []
        for handle in children:
            child = Hosted(
                handle, token.id, token.name, hosted.lifetime, time.monotonic() + hosted.lifetime,
                hosted.anomaly_action, on_expiry=hosted.on_expiry,
            )  # fmt: skip
            self.sandboxes[child.id] = child
            made.append(child)
            self.watch.record(
                "sandbox_forked", sandbox=child.id, parent=hosted.id, owner=token.id,
                vm=handle.info().domain,
            )  # fmt: skip
        log.info("sandbox_forked", sandbox=hosted.id, children=len(made),
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip
        return made

    async def close_paused(self) -> None:
        """At shutdown paused sandboxes stay on disk: forgotten here, found by the next."""
        for sandbox_id, hosted in list(self.sandboxes.items()):
            if hosted.handle.state is SandboxState.PAUSED and hosted.handle.on_disk:
                self.sandboxes.pop(sandbox_id, None)
