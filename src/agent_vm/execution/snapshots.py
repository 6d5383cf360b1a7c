"""Snapshots: a running sandbox captured as a golden state of its own, to start many from.

``<state>/snapshots/<name>/`` holds what a golden state holds (``disk.qcow2``,
``device.state``, ``golden.json``, the RAM in ``memory.ram``; on disk, not in /dev/shm:
an unused snapshot costs no memory) plus ``snapshot.json`` (image, hardware, policy,
who took it). A start from a snapshot is a clone of that golden state, given its own
clock, entropy, hostname, machine-id and network like any clone.

The source VM stops only for the capture and the copy of its overlay, then runs on.
Fork takes a hidden snapshot (``.fork-*``) and starts children from it; hidden ones go
once nothing uses them (``prune``). A snapshot whose disk backs a VM or a paused sandbox
is not removed (``remove`` says which ones use it).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent_vm import timeutil
from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import ConfigError, NotFoundError, SnapshotError
from agent_vm.execution.capture import RAM_FILE, capture_memory, check_room
from agent_vm.execution.confine import Confinement, harden
from agent_vm.execution.golden import GoldenKey, GoldenMeta, GoldenState
from agent_vm.execution.pins import backing_of, carry_base, hold, pin_base, release
from agent_vm.execution.running import RunningVM
from agent_vm.execution.spec import MachineSpec
from agent_vm.execution.suspend import unmount_share
from agent_vm.image.store import Image, ImageStore
from agent_vm.logs import get_logger
from agent_vm.network.policy import EgressPolicy

log = get_logger(__name__)

META_FILE = "snapshot.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HIDDEN_PREFIX = ".fork-"


class SnapshotMeta(BaseModel):
    name: str
    created_at: datetime
    image_name: str
    image_key: str
    image_build: str
    spec: MachineSpec
    policy: dict[str, Any] | None = None
    source: str = ""  # the sandbox (or VM) it was taken from
    owner: str | None = None  # the server token that took it
    capture_seconds: float = 0.0
    pause_seconds: float = 0.0  # how long the source stood still
    ram_bytes: int = 0
    disk_bytes: int = 0

    @property
    def hidden(self) -> bool:
        return self.name.startswith(HIDDEN_PREFIX)

    def egress(self) -> EgressPolicy | None:
        return EgressPolicy.model_validate(self.policy) if self.policy is not None else None


def check_name(name: str) -> None:
    if not NAME.match(name):
        raise ConfigError(
            f"bad snapshot name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 64), starting alnum",
        )


class SnapshotStore:
    def __init__(self, state_dir: Path, vms_dir: Path, paused_dir: Path) -> None:
        self.root = state_dir / "snapshots"
        self.golden_root = state_dir / "golden"
        self.images_root = state_dir / "images"
        self.vms_dir = vms_dir
        self.paused_dir = paused_dir

    def directory(self, name: str) -> Path:
        return self.root / name

    def golden(self, name: str) -> GoldenState:
        directory = self.directory(name)
        return GoldenState(f"snapshot:{name}", directory, directory / RAM_FILE)

    def get(self, name: str) -> SnapshotMeta:
        try:
            return SnapshotMeta.model_validate_json((self.directory(name) / META_FILE).read_text())
        except (OSError, ValidationError):
            raise NotFoundError(
                f"no snapshot {name!r}", hint="agent-vm snapshot list shows them"
            ) from None

    def all(self, *, hidden: bool = False) -> list[SnapshotMeta]:
        if not self.root.is_dir():
            return []
        found = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(HIDDEN_PREFIX) and not hidden:
                continue
            try:
                found.append(self.get(directory.name))
            except NotFoundError:
                continue  # being taken, or half removed
        return found

    def image(self, images: ImageStore, meta: SnapshotMeta) -> Image:
        image = images.get(meta.image_name, meta.image_key)
        if image is None or image.build_id != meta.image_build:
            raise NotFoundError(
                f"the image {meta.image_name} snapshot {meta.name} was taken on is gone",
                hint=f"it cannot start on another build: agent-vm snapshot rm {meta.name}",
            )
        return image

    async def take(
        self,
        connection: LibvirtConnection,
        running: RunningVM,
        name: str,
        *,
        confinement: Confinement | None,
        source: str = "",
        owner: str | None = None,
    ) -> SnapshotMeta:
        """Capture ``running`` as snapshot ``name``; it runs on. Its workspace must be
        detached first (the caller attaches it again)."""
        if not name.startswith(HIDDEN_PREFIX):
            check_name(name)
        spec = running.spec
        if spec is None:
            raise ConfigError(f"{running.name} has no machine spec: it cannot be captured")
        directory = self.directory(name)
        if directory.exists():
            raise SnapshotError(f"a snapshot named {name!r} exists", hint="pick another name")
        overlay = running.workdir / "disk.qcow2"
        extra = (await asyncio.to_thread(overlay.stat)).st_blocks * 512
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(check_room, self.root, spec.profile.memory_mib, extra)
        guard = running.guard
        policy = guard.policy(running.name) if guard is not None else None
        await unmount_share(await running.channel())
        stopped = asyncio.get_running_loop().time()
        try:
            await asyncio.to_thread(running.vm.pause)
            try:
                captured = await capture_memory(connection, running, directory)
                await asyncio.to_thread(_copy_disk, overlay, directory / "disk.qcow2")
            finally:
                await asyncio.shield(asyncio.to_thread(running.vm.resume))
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        paused = asyncio.get_running_loop().time() - stopped
        meta = SnapshotMeta(
            name=name, created_at=timeutil.now(), image_name=running.image.name,
            image_key=running.image.key, image_build=running.image.build_id, spec=spec,
            policy=policy.model_dump(mode="json") if policy is not None else None,
            source=source, owner=owner, capture_seconds=round(captured.seconds, 3),
            pause_seconds=round(paused, 3), ram_bytes=captured.ram_bytes,
        )  # fmt: skip
        await asyncio.to_thread(self._finish, directory, meta, running, confinement)
        log.info("snapshot_taken", name=name, source=source, seconds=meta.pause_seconds)
        return self.get(name)

    def _finish(
        self,
        directory: Path,
        meta: SnapshotMeta,
        running: RunningVM,
        confinement: Confinement | None,
    ) -> None:
        carry_base(running.workdir, directory)  # the source was resumed from a pause
        pin_base(directory / "disk.qcow2", self.golden_root)
        hold(running.image, f"snapshot-{meta.name}")
        ram = directory / RAM_FILE
        if confinement is not None:
            harden(ram, confinement.ram_mode, confinement.identities.shared_gid)
            harden(directory / "disk.qcow2", 0o444)
        else:
            (directory / "disk.qcow2").chmod(0o444)
        st = ram.stat()
        golden = GoldenMeta(
            key=GoldenKey(image_key=running.image.build_id, spec=meta.spec),
            created_at=meta.created_at, boot_seconds=0.0, capture_seconds=meta.capture_seconds,
            state_bytes=(directory / "device.state").stat().st_size,
            ram_ctime_ns=st.st_ctime_ns, ram_inode=st.st_ino,
        )  # fmt: skip
        (directory / "golden.json").write_text(golden.model_dump_json(indent=2) + "\n")
        meta.disk_bytes = sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())
        (directory / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")

    def users(self, name: str) -> list[str]:
        """VMs and paused sandboxes whose disk is backed by this snapshot's."""
        disk = str(self.directory(name) / "disk.qcow2")
        found = []
        places = ((self.vms_dir, "vm"), (self.paused_dir, "paused"), (self.root, "snapshot"))
        for base, label in places:
            if not base.is_dir():
                continue
            for workdir in base.iterdir():
                if backing_of(workdir / "disk.qcow2") == disk:
                    found.append(f"{label} {workdir.name}")
        return found

    def remove(self, name: str) -> None:
        """Refused while anything runs from it (its disk backs theirs)."""
        meta = self.get(name)
        using = self.users(name)
        if using:
            raise SnapshotError(
                f"snapshot {name} is in use by {', '.join(using)}",
                hint="remove those sandboxes first",
            )
        shutil.rmtree(self.directory(name), ignore_errors=True)
        release(self.images_root / meta.image_name / meta.image_key, f"snapshot-{name}")

    def prune(self) -> list[str]:
        """Hidden (fork) snapshots nothing uses any more."""
        removed = []
        for meta in self.all(hidden=True):
            if meta.hidden and not self.users(meta.name):
                self.remove(meta.name)
                removed.append(meta.name)
        return removed

    def held_bytes(self) -> int:
        return sum(m.disk_bytes for m in self.all(hidden=True))


def _copy_disk(overlay: Path, target: Path) -> None:
    """The source's overlay, copied while it stands still (its backing chain is shared)."""
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(overlay), str(target)], check=True
    )
    target.chmod(0o444)
