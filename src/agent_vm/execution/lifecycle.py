"""Pause, resume, snapshot and fork on the runtime's machinery: what the local backend
calls. Each step is the runtime's own (connection, guard, identities, golden clones);
this module only puts them in order and keeps the runtime's list of VMs true."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from agent_vm.communication.channel import AgentChannel
from agent_vm.errors import ConfigError
from agent_vm.execution.clones import start_clone
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.snapshots import HIDDEN_PREFIX, SnapshotMeta
from agent_vm.execution.suspend import PausedMeta, find_image, forget, restore, suspend
from agent_vm.network.policy import EgressPolicy

MAX_FORK = 64


async def pause(
    runtime: Runtime, running: RunningVM, dest: Path, *, reason: str, owner: dict[str, Any]
) -> PausedMeta:
    """``running`` saved into ``dest`` and removed (its session kept for ``resume``)."""
    await runtime.start()
    return await suspend(
        runtime.connection, running, dest, confinement=runtime.confinement,
        golden_root=runtime.golden_store.root, reason=reason, owner=owner,
    )  # fmt: skip


def discard_paused(runtime: Runtime, dest: Path, meta: PausedMeta) -> None:
    """A paused sandbox removed: its files, and its hold on its image (blocking)."""
    forget(dest, runtime.settings.images_dir / meta.image_name / meta.image_key)


async def resume(
    runtime: Runtime, dest: Path, meta: PausedMeta, channel: AgentChannel | None
) -> RunningVM:
    await runtime.start()
    image = await asyncio.to_thread(find_image, runtime.images, meta)
    running = await restore(
        runtime.connection, image, dest, meta, vms_dir=runtime.settings.vms_dir,
        guard=await runtime.guard_for(meta.spec), confinement=runtime.confinement,
        channel=channel, timeout=runtime.settings.boot_timeout,
    )  # fmt: skip
    runtime.track(running)
    return running


async def snapshot(
    runtime: Runtime, running: RunningVM, name: str, *, source: str, owner: str | None = None
) -> SnapshotMeta:
    await runtime.start()
    return await runtime.snapshots.take(
        runtime.connection, running, name, confinement=runtime.confinement, source=source,
        owner=owner,
    )  # fmt: skip


async def from_snapshot(
    runtime: Runtime, name: str, policy: EgressPolicy | None = None
) -> RunningVM:
    """A new VM started from snapshot ``name`` (its own identity; the snapshot's policy
    unless ``policy`` says otherwise)."""
    await runtime.start()
    store = runtime.snapshots
    meta = await asyncio.to_thread(store.get, name)
    image = await asyncio.to_thread(store.image, runtime.images, meta)
    running = await start_clone(
        runtime.connection, image, store.golden(name), meta.spec,
        vms_dir=runtime.settings.vms_dir, guard=await runtime.guard_for(meta.spec),
        policy=policy or meta.egress(), timeout=runtime.settings.boot_timeout,
        confinement=runtime.confinement,
    )  # fmt: skip
    runtime.track(running)
    return running


async def fork(runtime: Runtime, running: RunningVM, count: int, *, source: str) -> list[RunningVM]:
    """``count`` new VMs continuing from this moment of ``running``, which runs on."""
    if not 1 <= count <= MAX_FORK:
        raise ConfigError(f"fork makes 1 to {MAX_FORK} sandboxes, not {count}")
    name = f"{HIDDEN_PREFIX}{os.urandom(6).hex()}"
    await snapshot(runtime, running, name, source=source)
    results = await asyncio.gather(
        *(from_snapshot(runtime, name) for _ in range(count)), return_exceptions=True
    )
    children = [r for r in results if isinstance(r, RunningVM)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
        await asyncio.to_thread(runtime.snapshots.prune)
        raise failure
    return children
