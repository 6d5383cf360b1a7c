"""The local backend: where local sandboxes come from (a warm pool, a golden state's
clone, a cold boot or a snapshot) and where paused ones are found again after a restart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent_vm.config import Settings
from agent_vm.errors import NotFoundError
from agent_vm.execution import lifecycle
from agent_vm.execution.pool import VMPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.shells import PoolStats
from agent_vm.execution.suspend import disk_bytes, read_meta
from agent_vm.network.egress import check_secrets
from agent_vm.sandbox.base import (
    PoolInfo,
    Progress,
    SandboxHandle,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from agent_vm.sandbox.local import LocalSandbox, Release, _destroy
from agent_vm.sandbox.localsave import snapshot_info, spec_from


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
        hardware it lacks, a network it cannot make, an image never built, a snapshot
        that does not exist."""
        check_secrets(spec.proxied, spec.policy, spec.network)
        if spec.snapshot is not None:
            self.runtime.snapshots.get(spec.snapshot)
            return
        if self._pool is not None:
            return
        self.runtime.spec(profile=spec.profile, network=spec.network)
        if spec.image is not None and spec.image != self.runtime.settings.image:
            self.runtime.images.require(spec.image)

    async def acquire(self, spec: SandboxSpec, progress: Progress | None = None) -> LocalSandbox:
        if self._own_runtime and self.runtime.closed:  # used again after close()
            self.runtime = Runtime(self._settings)
        pool = None if spec.snapshot is not None else self._pool or self._matching(spec)
        release: Release = _destroy
        if spec.snapshot is not None:
            vm = await lifecycle.from_snapshot(self.runtime, spec.snapshot, spec.policy)
        elif pool is not None:
            vm = await pool.acquire(spec.acquire_timeout)
            release = self._to_pool(pool)
        else:
            machine = self.runtime.spec(profile=spec.profile, network=spec.network)
            vm = await self.runtime.vm(
                image=spec.image, spec=machine, policy=spec.policy, cold=spec.cold,
                **({"progress": progress} if progress is not None else {}),
            )  # fmt: skip
        try:
            if pool is not None and spec.policy is not None:
                await vm.set_policy(spec.policy)
            if spec.proxied:
                await vm.set_secrets(spec.proxied)
            if spec.workspace is not None:
                await vm.attach_workspace(spec.workspace)
        except BaseException:
            await release(vm)
            raise
        return self.hold(LocalSandbox(vm, spec, release, self, pooled=pool is not None))

    def hold(self, handle: LocalSandbox) -> LocalSandbox:
        self._held[handle.id] = handle
        return handle

    def _matching(self, spec: SandboxSpec) -> VMPool | None:
        if spec.cold or not isinstance(spec.profile, str):
            return None
        return self.warm.get(PoolKey(spec.image, spec.profile, spec.network))

    def _to_pool(self, pool: VMPool) -> Release:
        async def release(vm: RunningVM) -> None:
            try:
                await vm.detach_workspace()  # the user's directory goes before the VM does
            finally:
                await pool.release(vm)

        return release

    async def get(self, sandbox_id: str) -> LocalSandbox:
        found = self._held.get(sandbox_id)
        if found is None:  # paused by another process (a server before its restart)
            found = await asyncio.to_thread(self._saved, sandbox_id)
        if found is None or found.state is SandboxState.CLOSED:
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return found

    def _saved(self, sandbox_id: str) -> LocalSandbox | None:
        handle = adopt(self, self.runtime.settings.paused_dir / sandbox_id)
        return self.hold(handle) if handle is not None else None

    def adopt_paused(self) -> builtins.list[LocalSandbox]:
        """Every sandbox paused to disk on this host that this backend does not hold
        yet (a server calls it once at start: paused sandboxes outlive it)."""
        root = self.runtime.settings.paused_dir
        if not root.is_dir():
            return []
        found = []
        for directory in sorted(root.iterdir()):
            if directory.name not in self._held and (handle := self._saved(directory.name)):
                found.append(handle)
        return found

    async def list(self) -> builtins.list[SandboxHandle]:
        return [h for h in self._held.values() if h.state is not SandboxState.CLOSED]

    async def release(self, handle: SandboxHandle) -> None:
        try:
            await handle.close()
        finally:
            self._held.pop(handle.id, None)
        if getattr(handle, "parent", None) is not None:  # its fork's snapshot may be unused
            await asyncio.to_thread(self.runtime.snapshots.prune)

    def pool_stats(self) -> dict[str, PoolStats]:
        """The warm pools' own figures (start times too), for the metrics."""
        return {
            f"{key.image or ''}:{key.profile}:{key.network}": pool.stats()
            for key, pool in self.warm.items()
        }

    def held_figures(self) -> dict[str, int]:
        """Paused sandboxes and snapshots, and the disk they hold (blocking: for a scrape)."""
        paused = [h for h in self._held.values() if h.on_disk]
        snapshots = self.runtime.snapshots.all(hidden=True)
        return {
            "paused": len(paused),
            "paused_bytes": sum(disk_bytes(h.paused_dir) for h in paused),
            "snapshots": len(snapshots),
            "snapshot_bytes": sum(s.disk_bytes for s in snapshots),
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

    async def snapshots(self) -> builtins.list[SnapshotInfo]:
        metas = await asyncio.to_thread(self.runtime.snapshots.all)
        return [snapshot_info(meta) for meta in metas]

    def snapshot_owners(self) -> dict[str, str | None]:
        """Snapshot name → the server token that took it (a server's quota and tenancy)."""
        return {meta.name: meta.owner for meta in self.runtime.snapshots.all()}

    async def remove_snapshot(self, name: str) -> None:
        await asyncio.to_thread(self.runtime.snapshots.remove, name)

    async def close(self) -> None:
        """Release what it holds; paused sandboxes stay on disk (they are data)."""
        for handle in list(self._held.values()):
            if handle.on_disk:
                self._held.pop(handle.id, None)
                continue
            with contextlib.suppress(Exception):
                await self.release(handle)
        if self._own_runtime:
            await self.runtime.close()


def adopt(backend: LocalBackend, directory: Path) -> LocalSandbox | None:
    """The paused sandbox saved in ``directory``, as a handle (None: nothing valid)."""
    meta = read_meta(directory)
    if meta is None or not meta.owner.get("id"):
        return None
    handle = LocalSandbox(None, spec_from(meta), _destroy, backend, paused=meta)
    handle.id = str(meta.owner["id"])
    handle.keep = dict(meta.owner.get("keep") or {})
    handle.parent = meta.owner.get("parent")
    created = meta.owner.get("created_at")
    if isinstance(created, str):
        handle.created_at = datetime.fromisoformat(created)
    handle.pooled = bool(meta.owner.get("pooled"))
    handle.restore_commands(list(meta.owner.get("commands") or []))
    return handle
