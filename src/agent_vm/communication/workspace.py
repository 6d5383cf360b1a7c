"""The live workspace: a host directory the guest works on in place.

Every VM exports ``<workdir>/share`` over virtio-9p from its start (so pooled and
golden-cloned VMs, started before anyone knew the workspace, have it too). Attaching a
workspace mounts the user's directory on ``share/ws`` on the host (an idmapped bind
mount: QEMU's user, a sandbox identity, is seen by the kernel as the directory's owner,
so files the guest creates come out the owner's; nosuid, nodev; read-only when asked),
then asks the guest agent to mount it at ``Workspace.mount``. The share is a shared
mount, which is how a mount made now reaches the private mount namespace libvirt gave
QEMU at start. QEMU's 9p server runs in its ``mapped`` model: owners, modes, setuid
bits and device nodes the guest asks for live in xattrs, never in the host's inodes.

Detaching undoes both mounts; nothing of the workspace stays attached to the VM.

Quotas: the kernel has no per-directory byte cap that works on every file system, so a
monitor walks the tree (never following a link, never opening a file). While the
workspace is over its byte or file-count cap, or the host's free space is under the
reserve, a read-only mount sits on top of the writable one and the files QEMU still
holds open for writing are immutable (``host/writers.py``); once back under (the user
freed space on the host), both are undone. Between two walks a guest can overshoot by
what it writes in one interval (ten times the last walk's duration, at least
``MIN_INTERVAL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator

from agent_vm.communication.channel import AgentChannel
from agent_vm.errors import AgentRefusedError, AgentVMError, WorkspaceError
from agent_vm.host.idmap import IdMap, bind_idmapped, unmount
from agent_vm.host.mounts import mounted_at, unmount_under
from agent_vm.host.writers import Frozen, freeze, inode_of, open_for_writing
from agent_vm.logs import get_logger
from agent_vm.models import Model
from agent_vm.protocol.files import WorkspaceRequest
from agent_vm.protocol.ports import SHARE_STAGING, SHARE_WORKSPACE

log = get_logger(__name__)

SHARE_DIR = "share"  # below the VM's work directory: the 9p export
LAYOUT = ("input", "output", "work")
DEFAULT_GROWTH_BYTES = 4 << 30  # what a sandbox may add when no quota is given
DEFAULT_GROWTH_FILES = 200_000
FREE_RESERVE_BYTES = 1 << 30  # the host keeps at least this much free
MIN_INTERVAL = 0.5
MAX_INTERVAL = 30.0
MAX_OUTPUT_ENTRIES = 10_000


class Workspace(Model):
    """A host directory shared with a sandbox (``FilesystemShare`` in the seeds).

    ``layout`` makes ``input/`` (read-only in the guest), ``output/`` and ``work/`` in it;
    ``ExecutionResult.output`` then lists what a run left in ``output/``. ``quota_bytes``
    and ``max_files`` cap the whole tree while attached (default: its size and count at
    attach plus 4 GiB and 200 000 entries).
    """

    model_config = ConfigDict(frozen=True)

    path: Path
    readonly: bool = False
    mount: str = "/workspace"
    layout: bool = False
    quota_bytes: int | None = Field(default=None, ge=0)
    max_files: int | None = Field(default=None, ge=0)

    @field_validator("mount")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "" or "\0" in value:
            raise ValueError("the mount point must be an absolute path below /")
        return value.rstrip("/")

    @property
    def work_dir(self) -> str:
        """Where commands start by default."""
        return self.mount


def workspace_for(path: str | os.PathLike[str]) -> Workspace:
    """The workspace for a directory: with the layout when it has input/, output/ and
    work/ already (the seeds' structure), plain otherwise."""
    root = Path(path)
    layout = all((root / name).is_dir() and not (root / name).is_symlink() for name in LAYOUT)
    return Workspace(path=root, layout=layout)


@dataclass(frozen=True)
class OutputFile:
    """One entry a run left in the layout's ``output/`` (path relative to it)."""

    path: str
    size: int
    is_dir: bool = False


@dataclass
class Usage:
    bytes: int = 0
    files: int = 0


def scan(root: Path, stop_at: Usage | None = None) -> Usage:
    """Allocated bytes and entries below ``root``: lstat only (no link followed, no
    file opened, so FIFOs and device nodes cannot block it), each inode counted once,
    iterative (depth cannot exhaust the stack). Stops early once past ``stop_at``."""
    usage = Usage()
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    usage.files += 1
                    if (info.st_dev, info.st_ino) not in seen:
                        seen.add((info.st_dev, info.st_ino))
                        usage.bytes += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue
        if stop_at is not None and (usage.bytes > stop_at.bytes or usage.files > stop_at.files):
            break
    return usage


def list_output(root: Path, limit: int = MAX_OUTPUT_ENTRIES) -> list[OutputFile]:
    """What is below ``root`` (never following links), sorted, at most ``limit``."""
    out: list[OutputFile] = []
    stack = [""]
    while stack and len(out) < limit:
        relative = stack.pop()
        try:
            with os.scandir(root / relative if relative else root) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    path = f"{relative}/{entry.name}" if relative else entry.name
                    is_dir = stat.S_ISDIR(info.st_mode)
                    out.append(OutputFile(path, 0 if is_dir else info.st_size, is_dir))
                    if is_dir:
                        stack.append(path)
                    if len(out) >= limit:
                        break
        except OSError:
            continue
    return sorted(out, key=lambda item: item.path)


def qemu_ids(pid: int) -> tuple[int, int]:
    """The effective uid and gid a process runs as."""
    uid = gid = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                uid = int(line.split()[2])
            elif line.startswith("Gid:"):
                gid = int(line.split()[2])
    if uid is None or gid is None:
        raise WorkspaceError(f"cannot read the ids of process {pid}")
    return uid, gid


def _prepare(workspace: Workspace) -> tuple[Path, os.stat_result]:
    """The directory, checked: it exists, is a directory, and is not itself a link."""
    path = workspace.path.expanduser().absolute()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise WorkspaceError(
            f"workspace {path} does not exist", hint="create the directory first"
        ) from None
    if stat.S_ISLNK(info.st_mode):
        path = path.resolve()
        info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise WorkspaceError(f"workspace {path} is not a directory")
    if workspace.layout and not workspace.readonly:
        for name in LAYOUT:
            sub = path / name
            if not sub.exists():
                sub.mkdir(mode=0o755)
                os.chown(sub, info.st_uid, info.st_gid)
            elif sub.is_symlink() or not sub.is_dir():
                raise WorkspaceError(f"{sub} must be a directory for the workspace layout")
    return path, info


@dataclass
class AttachedWorkspace:
    """A workspace mounted into one VM; ``detach`` undoes it."""

    workspace: Workspace
    source: Path
    target: Path
    limit: Usage
    idmap: IdMap
    qemu_pid: int
    over: bool = False
    usage: Usage = field(default_factory=Usage)
    on_quota: Callable[[bool, Usage], None] | None = None
    _task: asyncio.Task[None] | None = None
    _frozen: list[Frozen] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        """How many files are immutable now (open for writing while over the cap)."""
        return len(self._frozen)

    @property
    def output_dir(self) -> Path | None:
        return self.source / "output" if self.workspace.layout else None

    def outputs(self) -> list[OutputFile]:
        out = self.output_dir
        return list_output(out) if out is not None and out.is_dir() else []

    def check(self) -> bool:
        """One quota walk; blocks or unblocks writes when the verdict changes."""
        self.usage = scan(self.source, stop_at=self.limit)
        free = os.statvfs(self.source)
        short = free.f_bavail * free.f_frsize < FREE_RESERVE_BYTES
        over = short or self.usage.bytes > self.limit.bytes or self.usage.files > self.limit.files
        if over:
            self._freeze_writers()  # also files opened since the mount went read-only
        if over != self.over and not self.workspace.readonly:
            if over:
                self._block()
            else:
                self._unblock()
            log.warning(
                "workspace_quota_exceeded" if over else "workspace_quota_ok",
                path=str(self.source), bytes=self.usage.bytes, files=self.usage.files,
                limit_bytes=self.limit.bytes, limit_files=self.limit.files, host_short=short,
            )  # fmt: skip
            if self.on_quota is not None:
                self.on_quota(over, self.usage)
        return over

    def _block(self) -> None:
        """A read-only mount on top of the writable one (a new mount propagates into
        QEMU's namespace; changing the existing one's flags would not), then the files
        QEMU holds open for writing made immutable."""
        bind_idmapped(self.source, self.target, self.idmap, readonly=True)
        self.over = True
        self._freeze_writers()

    def _unblock(self) -> None:
        unmount(self.target)  # the top one: the writable mount is visible again
        self.over = False
        self._thaw()

    def _freeze_writers(self) -> None:
        """Freeze what QEMU has open for writing; thaw what it closed since (so that the
        user can delete it to get under the cap again)."""
        links = open_for_writing(self.qemu_pid, self.target)
        open_now = {inode_of(link) for link in links}
        keep = []
        for old in self._frozen:
            if old.inode in open_now:
                keep.append(old)
            else:
                old.thaw()
        self._frozen = keep
        held = {old.inode for old in keep}
        for link in links:
            if inode_of(link) not in held and (new := freeze(link)) is not None:
                self._frozen.append(new)
                held.add(new.inode)

    def _thaw(self) -> None:
        while self._frozen:
            self._frozen.pop().thaw()

    async def _monitor(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.check)
            except (OSError, AgentVMError) as exc:  # the next round tries again
                log.warning("workspace_scan_failed", path=str(self.source), error=str(exc))
            spent = time.monotonic() - started
            await asyncio.sleep(min(MAX_INTERVAL, max(MIN_INTERVAL, 10 * spent)))

    def start_monitor(self) -> None:
        if not self.workspace.readonly:
            self._task = asyncio.create_task(self._monitor(), name=f"quota {self.source}")

    async def detach(self, channel: AgentChannel | None, strict: bool = False) -> None:
        """Unmount in the guest (if it still answers), then on the host. ``strict``: a
        guest that refuses (a process holds a file of the workspace) leaves it attached
        and raises ``WorkspaceError`` with the guest's reason."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if channel is not None and not channel.closed:
            try:
                await channel.workspace(WorkspaceRequest(None), timeout=30)
            except AgentVMError as exc:  # a dead or hostile guest: the host side still goes
                if strict:
                    self.start_monitor()
                    raise WorkspaceError(
                        f"the workspace cannot be detached: {exc.message}", hint=exc.hint
                    ) from exc
                log.warning("workspace_guest_unmount_failed", error=str(exc))
        stuck = await asyncio.to_thread(unmount_under, self.target)
        await asyncio.to_thread(self._thaw)
        if stuck:
            raise WorkspaceError(f"cannot unmount the workspace at {stuck[0]}")


async def attach(
    workspace: Workspace, workdir: Path, qemu_pid: int, channel: AgentChannel
) -> AttachedWorkspace:
    """Mount ``workspace`` into the VM whose work directory is ``workdir``."""
    source, info = await asyncio.to_thread(_prepare, workspace)
    target = workdir / SHARE_DIR / SHARE_WORKSPACE
    if not target.is_dir():
        raise WorkspaceError(f"{workdir.name} has no share (it was started before agent-vm 0.4)")
    seen_uid, seen_gid = qemu_ids(qemu_pid)
    idmap = IdMap(info.st_uid, info.st_gid, seen_uid, seen_gid)
    baseline = await asyncio.to_thread(scan, source) if not workspace.readonly else Usage()
    limit = Usage(
        workspace.quota_bytes if workspace.quota_bytes is not None
        else baseline.bytes + DEFAULT_GROWTH_BYTES,
        workspace.max_files if workspace.max_files is not None
        else baseline.files + DEFAULT_GROWTH_FILES,
    )  # fmt: skip
    attached = AttachedWorkspace(workspace, source, target, limit, idmap, qemu_pid)
    await asyncio.to_thread(bind_idmapped, source, target, idmap, readonly=workspace.readonly)
    try:
        if workspace.layout and not workspace.readonly:
            await asyncio.to_thread(
                bind_idmapped, source / "input", target / "input", idmap, readonly=True
            )
        if workspace.quota_bytes is not None or workspace.max_files is not None:
            await asyncio.to_thread(attached.check)  # over its cap already: blocked at once
        try:
            await channel.workspace(
                WorkspaceRequest(workspace.mount, workspace.readonly, workspace.layout)
            )
        except AgentRefusedError as exc:
            raise WorkspaceError(
                f"the guest could not mount the workspace at {workspace.mount}: {exc.detail}"
            ) from exc
    except BaseException:
        await asyncio.to_thread(unmount_under, target)
        raise
    attached.start_monitor()
    log.info("workspace_attached", path=str(source), mount=workspace.mount, vm=workdir.name)
    return attached


STAGING_BYTES = 64 << 20  # the bulk lane's tmpfs: 8 streams of two 4 MiB segments each


def mount_staging(workdir: Path, qemu_pid: int) -> Path | None:
    """The bulk lane of file streams: a size-capped tmpfs on ``share/xfer`` (a guest
    ignoring its credits fills this, nothing else), setgid to QEMU's group so that
    segments the host writes are readable by QEMU. None when it cannot be had here (the
    channel then carries the bytes itself)."""
    target = workdir / SHARE_DIR / SHARE_STAGING
    if mounted_at(target) is not None:
        return target
    _uid, gid = qemu_ids(qemu_pid)
    options = f"size={STAGING_BYTES},nr_inodes=1024,mode=2770,uid=0,gid={gid},nosuid,nodev,noexec"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "agentvm-staging", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        log.warning("staging_unavailable", vm=workdir.name, error=proc.stderr.strip())
        return None
    probe = target / ".xattr-probe"
    try:  # QEMU's mapped model keeps what the guest sets in user xattrs (tmpfs >= 6.6)
        probe.touch()
        os.setxattr(probe, "user.agentvm", b"1")
    except OSError as exc:
        log.warning("staging_unavailable", vm=workdir.name, error=f"no user xattrs: {exc}")
        unmount_under(target)
        return None
    finally:
        probe.unlink(missing_ok=True)
    return target
