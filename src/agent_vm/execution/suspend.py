"""Pause a VM to disk and resume it: its memory, devices and disk kept in one directory,
nothing of it running, and later the same machine again, every process where it was.

Pause: the guest unmounts its 9p share (a mounted one blocks migration), the agent
session stops sending, the VM is stopped and its memory captured (``capture.py``), its
overlay linked into the directory, and the VM removed like any other (domain, work
directory, host identity, network lease). The session id is written down, so a
resume in another process (a restarted server) continues the same session.

Resume: a VM of the same name is defined with the kept overlay and the saved RAM mapped
privately (pages load from disk as the guest touches them), the device state is loaded,
the session reattached (commands still running in the guest go on sending output to the
same waiters), and the guest gets the clock, fresh entropy and its new network lease.
Its hostname and machine-id stay. On failure the directory is left as it was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent_vm import timeutil
from agent_vm.communication.channel import AgentChannel
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.qmp import load_device_state
from agent_vm.core.template import MemoryFile
from agent_vm.errors import AgentVMError, ConfigError, NotFoundError
from agent_vm.execution.capture import RAM_FILE, STATE_FILE, capture_memory, check_room
from agent_vm.execution.confine import Confinement, harden
from agent_vm.execution.launch import creating, define_vm, start_limited
from agent_vm.execution.pins import carry_base, hold, pin_base, release
from agent_vm.execution.running import RunningVM, transport_for
from agent_vm.execution.spec import MachineSpec
from agent_vm.image.store import Image, ImageStore
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.configure import Configure
from agent_vm.protocol.files import WorkspaceRequest

log = get_logger(__name__)

META_FILE = "paused.json"
DISK_FILE = "disk.qcow2"


class PausedMeta(BaseModel):
    """What a resume needs, in another process too."""

    name: str  # the VM's (and guest's host) name, kept across the pause
    image_name: str
    image_key: str
    image_build: str
    spec: MachineSpec
    policy: dict[str, Any] | None = None  # the egress policy in force
    session: str
    next_id: int
    paused_at: datetime
    reason: str = "requested"
    capture_seconds: float = 0.0
    ram_bytes: int = 0
    owner: dict[str, Any] = {}  # what the sandbox layer keeps about itself


def read_meta(directory: Path) -> PausedMeta | None:
    try:
        return PausedMeta.model_validate_json((directory / META_FILE).read_text())
    except (OSError, ValidationError):
        return None


def disk_bytes(directory: Path) -> int:
    """What a paused sandbox (or a snapshot) holds on disk."""
    total = 0
    for path in directory.rglob("*"):
        try:
            total += path.lstat().st_blocks * 512 if path.is_file() else 0
        except OSError:
            continue
    return total


async def unmount_share(channel: AgentChannel) -> None:
    """The guest's 9p mounts off (a mounted share makes QEMU refuse to migrate)."""
    await channel.workspace(WorkspaceRequest(None))


async def suspend(
    connection: LibvirtConnection,
    running: RunningVM,
    dest: Path,
    *,
    confinement: Confinement | None,
    golden_root: Path,
    reason: str = "requested",
    owner: dict[str, Any] | None = None,
) -> PausedMeta:
    """Save ``running`` into ``dest`` and remove it. Its workspace must be detached
    first (the caller attaches it again after a resume). On failure the VM runs on."""
    spec = running.spec
    if spec is None:
        raise ConfigError(f"{running.name} has no machine spec: it cannot be paused")
    await asyncio.to_thread(check_room, dest.parent, spec.profile.memory_mib)
    guard = running.guard
    policy = guard.policy(running.name) if guard is not None else None
    channel = await running.channel()
    await unmount_share(channel)
    await channel.suspend()
    try:
        await asyncio.to_thread(running.vm.pause)
        captured = await capture_memory(connection, running, dest)
        await asyncio.to_thread(os.link, running.workdir / DISK_FILE, dest / DISK_FILE)
    except BaseException:
        await asyncio.shield(_carry_on(running, channel))
        await asyncio.to_thread(shutil.rmtree, dest, True)
        raise
    session, next_id = channel.session
    meta = PausedMeta(
        name=running.name,
        image_name=running.image.name,
        image_key=running.image.key,
        image_build=running.image.build_id,
        spec=spec,
        policy=policy.model_dump(mode="json") if policy is not None else None,
        session=session,
        next_id=next_id,
        paused_at=timeutil.now(),
        reason=reason,
        capture_seconds=round(captured.seconds, 3),
        ram_bytes=captured.ram_bytes,
        owner=owner or {},
    )
    await asyncio.to_thread(_finish, dest, meta, confinement, running.workdir)
    await asyncio.to_thread(carry_base, running.workdir, dest)  # pinned by a pause before
    await running.vacate()
    await channel.drop_transport()
    try:  # its QEMU gone: the overlay's header may change
        await asyncio.to_thread(pin_base, dest / DISK_FILE, golden_root)
        await asyncio.to_thread(hold, running.image, f"paused-{dest.name}")
    except (OSError, AgentVMError) as exc:  # paused all the same; a recapture may break it
        log.error("paused_state_not_pinned", vm=running.name, error=str(exc))
    log.info("vm_paused", vm=running.name, seconds=meta.capture_seconds, ram=captured.ram_bytes)
    return meta


async def _carry_on(running: RunningVM, channel: AgentChannel) -> None:
    try:
        await asyncio.to_thread(running.vm.resume)
    finally:
        channel.unsuspend()


def _finish(dest: Path, meta: PausedMeta, confinement: Confinement | None, workdir: Path) -> None:
    console = workdir / "console.log"
    if console.exists():
        shutil.copyfile(console, dest / "console.log")
    if confinement is not None:  # any identity of a later resume reads it (group agentvm)
        harden(dest / RAM_FILE, confinement.ram_mode, confinement.identities.shared_gid)
    (dest / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")


def forget(dest: Path, image_path: Path) -> None:
    """A paused state no longer needed (resumed, or the sandbox removed)."""
    shutil.rmtree(dest, ignore_errors=True)
    release(image_path, f"paused-{dest.name}")


def find_image(images: ImageStore, meta: PausedMeta) -> Image:
    image = images.get(meta.image_name, meta.image_key)
    if image is None or image.build_id != meta.image_build:
        raise NotFoundError(
            f"the image {meta.image_name} this sandbox was started from is gone",
            hint="its saved state cannot run on another build: remove it",
        )
    return image


async def restore(
    connection: LibvirtConnection,
    image: Image,
    dest: Path,
    meta: PausedMeta,
    *,
    vms_dir: Path,
    guard: NetworkGuard | None,
    confinement: Confinement | None,
    channel: AgentChannel | None = None,
    timeout: float = 60.0,
) -> RunningVM:
    """The paused VM running again; ``dest`` is removed once it runs. ``channel``: the
    session as this process held it (else one adopts the saved session)."""
    started = time.monotonic()
    missing = [n for n in (RAM_FILE, STATE_FILE, DISK_FILE) if not (dest / n).is_file()]
    if missing:
        raise NotFoundError(
            f"the saved state of {meta.name} is incomplete: {', '.join(missing)} missing",
            hint=f"it cannot be resumed; remove it ({dest})",
        )
    policy = EgressPolicy.model_validate(meta.policy) if meta.policy is not None else None
    read_only = confinement is not None and confinement.ram_read_only
    async with creating(vms_dir, meta.name, guard, confinement) as held:
        vm = await define_vm(
            connection, image, meta.spec, held, backing_disk=dest / DISK_FILE, policy=policy,
            memory_file=MemoryFile(path=dest / RAM_FILE, shared=False, read_only=read_only),
            incoming=True, disk=dest / DISK_FILE,
        )  # fmt: skip
        await asyncio.to_thread(carry_base, dest, held.workdir)
        await start_limited(vm, meta.spec)
        pid = await asyncio.to_thread(vm.qemu_pid)
        await asyncio.to_thread(load_device_state, vm, dest / STATE_FILE, timeout)
        transport = await asyncio.to_thread(transport_for, vm)
        if channel is None or channel.closed:
            channel = AgentChannel(transport, name=meta.name)
            channel.adopt(meta.session, meta.next_id)
        try:
            await channel.reattach(transport, timeout)
            await channel.configure(
                Configure(
                    time_ns=time.time_ns(),
                    entropy=os.urandom(64).hex(),
                    net=held.nic.guest if held.nic is not None else None,
                ),
                timeout=timeout,
            )
        except BaseException:
            await channel.close()
            raise
        running = RunningVM(
            vm, held.workdir, image, channel, time.monotonic() - started, held.nic, guard,
            pid, held.identity, meta.spec,
        )  # fmt: skip
    await asyncio.to_thread(forget, dest, image.path)  # QEMU maps the RAM it had opened
    log.info("vm_resumed", vm=meta.name, seconds=round(running.boot_seconds, 3))
    return running
