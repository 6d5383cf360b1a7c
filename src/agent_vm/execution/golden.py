"""Golden states: boot once, then start any number of VMs from that moment without booting.

Mechanism (chosen by measurement, see docs/benchmarks.md): the template VM's RAM lives in
a file under /dev/shm mapped shared; once its agent is ready it is migrated with QEMU's
``x-ignore-shared`` capability, which writes only CPU and device state (~0.5 MB) because
the RAM already is the file. A clone is an ordinary libvirt domain whose RAM maps that
file privately (copy-on-write) and which starts with ``-incoming defer``; loading the
device state takes ~25 ms, so a clone costs little more than libvirt's own start. Clones
share every page they do not write, which is also what keeps idle pooled VMs small.

Caveats: all clones start with the template's RNG state, clock, hostname and machine-id;
:func:`start_clone` replaces them through the agent (CONFIGURE) before anyone gets the VM.
Shared pages are a potential side channel between clones of one golden state.
Confinement: QEMU opens the RAM file itself, so a host whose libvirt confines QEMU with
AppArmor or SELinux must allow the golden directory (not needed on hosts without them).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agent_vm import timeutil
from agent_vm.asyncutil import finish_in_thread
from agent_vm.communication.channel import AgentChannel
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.qmp import save_device_state
from agent_vm.core.template import MemoryFile, ResourceProfile
from agent_vm.execution.confine import Confinement, harden
from agent_vm.execution.launch import (
    connect_agent,
    creating,
    define_vm,
    new_vm_name,
    start_limited,
    wait_settled,
)
from agent_vm.execution.spec import MachineSpec
from agent_vm.execution.teardown import teardown
from agent_vm.host.mounts import remove_tree
from agent_vm.image.store import Image, ImageStore
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.protocol.files import WorkspaceRequest
from agent_vm.protocol.messages import Execute

log = get_logger(__name__)

# 2: per-sandbox identities (RAM file owner and mode); 3: 9p share; 4: workspace code warm
GOLDEN_VERSION = "4"
SETTLE_TIMEOUT = 30.0
# Run once in the template so that every clone starts with a warm page cache and agent.
WARM_UP = (["true"], ["python3", "-c", "pass"])


class GoldenKey(BaseModel):
    """Everything a golden state depends on; a change means a new golden state."""

    model_config = ConfigDict(frozen=True)

    image_key: str
    spec: MachineSpec
    version: str = GOLDEN_VERSION

    def digest(self) -> str:
        """Host-side limits (CPU quota, memory cap, I/O throttle, pids) are left out: a
        clone gets them from its own domain, not from the state it starts from."""
        data = self.model_dump_json(exclude={"spec": {"profile": set(ResourceProfile.LIMITS)}})
        return hashlib.sha256(data.encode()).hexdigest()[:16]


class GoldenMeta(BaseModel):
    key: GoldenKey
    created_at: datetime
    boot_seconds: float
    capture_seconds: float
    state_bytes: int
    # the RAM file as capture left it: a write (only possible by a QEMU escape, and only
    # where QEMU needs it writable) changes its ctime, which nobody can set back
    ram_ctime_ns: int = 0
    ram_inode: int = 0


@dataclass(frozen=True)
class GoldenState:
    """Files of one golden state: disk and device state on disk, RAM in shared memory."""

    digest: str
    directory: Path
    ram: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.directory / "device.state"

    @property
    def meta_path(self) -> Path:
        return self.directory / "golden.json"

    def exists(self) -> bool:
        return all(p.exists() for p in (self.disk, self.state, self.meta_path, self.ram))

    def ready(self) -> bool:
        """Complete, readable and intact (blocking: stats and reads files)."""
        return self.exists() and self.intact()

    def intact(self) -> bool:
        """The RAM file is still the one captured (its ctime and inode unchanged)."""
        meta = self.meta()
        if meta is None:
            return False
        try:
            st = self.ram.stat()
        except OSError:
            return False
        if meta.ram_ctime_ns and (st.st_ctime_ns, st.st_ino) != (meta.ram_ctime_ns, meta.ram_inode):
            log.error("golden_ram_changed", digest=self.digest, action="captured again")
            return False
        return True

    def meta(self) -> GoldenMeta | None:
        try:
            return GoldenMeta.model_validate_json(self.meta_path.read_text())
        except (OSError, ValidationError):
            return None


class GoldenStore:
    """Golden states: ``<state>/golden/<digest>/`` plus the RAM file in ``shm_dir``."""

    def __init__(self, state_dir: Path, vms_dir: Path, shm_dir: Path) -> None:
        self.root = state_dir / "golden"
        self.vms_dir = vms_dir
        self.shm_dir = shm_dir

    def locate(self, key: GoldenKey) -> GoldenState:
        digest = key.digest()
        return GoldenState(digest, self.root / digest, self.shm_dir / f"{digest}.ram")

    def locate_for(self, image: Image, spec: MachineSpec) -> GoldenState:
        return self.locate(GoldenKey(image_key=image.build_id, spec=spec))

    def all(self) -> list[GoldenState]:
        if not self.root.is_dir():
            return []
        return [
            GoldenState(p.name, p, self.shm_dir / f"{p.name}.ram")
            for p in sorted(self.root.iterdir())
            if p.is_dir()
        ]

    def remove(self, golden: GoldenState) -> None:
        shutil.rmtree(golden.directory, ignore_errors=True)
        golden.ram.unlink(missing_ok=True)

    def prune(self, live_image_keys: set[str]) -> list[str]:
        """Remove golden states of images that no longer exist, and those of an older
        golden-state format (their RAM is in /dev/shm: nothing should linger)."""
        removed = []
        for golden in self.all():
            meta = golden.meta()
            if meta is not None and (
                meta.key.image_key not in live_image_keys or meta.key.version != GOLDEN_VERSION
            ):
                self.remove(golden)
                removed.append(golden.digest)
        return removed

    async def ensure(
        self,
        connection: LibvirtConnection,
        image: Image,
        spec: MachineSpec,
        *,
        guard: NetworkGuard | None = None,
        boot_timeout: float = 60.0,
        confinement: Confinement | None = None,
    ) -> GoldenState:
        """The golden state for (image, spec), captured now if it does not exist yet, or
        captured again if its RAM file was changed since (see ``GoldenState.intact``).
        File system work runs in threads (the event loop keeps serving other VMs)."""
        key = GoldenKey(image_key=image.build_id, spec=spec)
        golden = self.locate(key)
        if await asyncio.to_thread(golden.ready):
            return golden
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        lock = await finish_in_thread(_lock, self.root / f"{golden.digest}.lock")
        try:
            if await asyncio.to_thread(golden.ready):
                return golden  # captured by another process while we waited
            await self._capture(connection, image, key, golden, guard, boot_timeout, confinement)
            await asyncio.to_thread(self._prune_after_capture, image)
            return golden
        finally:
            os.close(lock)

    def _prune_after_capture(self, image: Image) -> None:
        live = {img.build_id for img, _ in ImageStore(self.root.parent / "images").all()}
        self.prune(live | {image.build_id})

    async def _capture(
        self,
        connection: LibvirtConnection,
        image: Image,
        key: GoldenKey,
        golden: GoldenState,
        guard: NetworkGuard | None,
        boot_timeout: float,
        confinement: Confinement | None,
    ) -> None:
        started = time.monotonic()
        self.remove(golden)
        name = new_vm_name(f"agentvm-golden-{golden.digest[:8]}")
        try:
            async with creating(self.vms_dir, name, guard, confinement) as held:
                vm = await define_vm(
                    connection, image, key.spec, held, backing_disk=image.disk,
                    memory_file=MemoryFile(path=golden.ram, shared=True),
                )  # fmt: skip
                # the template maps its RAM file shared and writes it: its own, for now
                if held.identity is not None:
                    uid, gid = held.identity.uid, held.identity.gid
                else:
                    uid, gid = await asyncio.to_thread(connection.qemu_user)
                memory = key.spec.profile.memory_mib
                await asyncio.to_thread(_prepare_ram_file, golden.ram, memory, uid, gid)
                await start_limited(vm, key.spec)
                agent = await connect_agent(held, boot_timeout)
                booted = time.monotonic() - started
                await _settle(agent)
                capture_started = time.monotonic()
                golden.directory.mkdir(parents=True)
                state_bytes = await asyncio.to_thread(save_device_state, vm, golden.state)
                capture = time.monotonic() - capture_started
                # The template goes like any VM, but its disk is kept: it becomes the
                # golden disk. Clones get network addresses of their own.
                await teardown(
                    name, vm=vm, workdir=None, guard=guard, channel=agent, identity=held.identity
                )
                held.vm = held.agent = held.identity = None
                await asyncio.to_thread(_keep_disk, held.workdir, golden.disk)
                ram = await asyncio.to_thread(_share_ram_file, golden.ram, confinement)
        except BaseException:
            self.remove(golden)
            raise
        meta = GoldenMeta(
            key=key,
            created_at=timeutil.now(),
            boot_seconds=round(booted, 3),
            capture_seconds=round(capture, 3),
            state_bytes=state_bytes,
            ram_ctime_ns=ram.st_ctime_ns,
            ram_inode=ram.st_ino,
        )
        golden.meta_path.write_text(meta.model_dump_json(indent=2) + "\n")
        log.info("golden_captured", digest=golden.digest, boot=meta.boot_seconds, capture=capture)


async def _settle(agent: AgentChannel) -> None:
    """Wait for init's late start-up work, then warm the agent and the page cache."""
    await wait_settled(agent, SETTLE_TIMEOUT)
    for argv in WARM_UP:
        await agent.execute(Execute(argv=argv, timeout=60))
    # the workspace code (and ctypes) loaded in the agent: a clone's first mount is quick
    await agent.workspace(WorkspaceRequest(None))


def _keep_disk(workdir: Path, disk: Path) -> None:
    (workdir / "disk.qcow2").rename(disk)
    harden(disk, 0o444)
    remove_tree(workdir)


def _share_ram_file(path: Path, confinement: Confinement | None) -> os.stat_result:
    """After capture the RAM file is root's, readable (and on QEMU < 8.2 writable) by
    group ``agentvm`` only; returns its stat, whose ctime changes if anyone writes it."""
    if confinement is not None:
        harden(path, confinement.ram_mode, confinement.identities.shared_gid)
    return path.stat()


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _prepare_ram_file(path: Path, memory_mib: int, uid: int, gid: int) -> None:
    """A sparse file of the guest's RAM size that QEMU (running as uid:gid) maps shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o711)
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(memory_mib * 1024 * 1024)
    os.chown(path, uid, gid)
    path.chmod(0o600)
