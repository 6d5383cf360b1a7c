"""envd's ``filesystem.Filesystem`` over the sandbox's files (``communication/fileapi``).

Paths resolve as E2B's do (relative to the user's home); an entry's owner and group
are names read from the guest's ``/etc/passwd`` and ``/etc/group`` (cached per
sandbox, read again when an id is new). Watching is the guest's inotify: a stream
(``WatchDir``) or a watcher polled for its events (``CreateWatcher``), which keeps at
most ``MAX_PENDING`` events between polls (past that, the oldest go).
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import re
import secrets
import stat as stats
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_pb as pb
from protobuf import Oneof
from protobuf.wkt import Timestamp

from agent_vm.api.e2b import door
from agent_vm.api.e2b.errors import rpc_errors, translated
from agent_vm.communication.fileapi import FileEntry, WatchEvent
from agent_vm.communication.files import FileService
from agent_vm.errors import SandboxFileError, SandboxFileNotFoundError
from agent_vm.sandbox.base import CommandSpec

MAX_PENDING = 10_000
SETTLE_SECONDS = 0.05
MAX_WATCHERS = 64  # per sandbox
_KIND_BITS = {"file": stats.S_IFREG, "dir": stats.S_IFDIR, "symlink": stats.S_IFLNK}
_TYPES = {"file": pb.FileType.FILE, "dir": pb.FileType.DIRECTORY, "symlink": pb.FileType.SYMLINK}
_EVENTS = {
    "create": pb.EventType.CREATE, "modify": pb.EventType.WRITE, "delete": pb.EventType.REMOVE,
    "move_from": pb.EventType.RENAME, "move_to": pb.EventType.CREATE,
}  # fmt: skip


async def _names(target: door.Target, uid: int, gid: int) -> tuple[str, str]:
    """The user and group names of ``uid``/``gid`` in the guest (the number if none)."""
    cache: dict[str, dict[int, str]] = target.hosted.door.setdefault("names", {})
    if uid not in cache.get("users", {}) or gid not in cache.get("groups", {}):
        for kind, path in (("users", "/etc/passwd"), ("groups", "/etc/group")):
            with contextlib.suppress(SandboxFileError, ValueError):
                text = str(await target.hosted.handle.files.read(path, max_bytes=4 << 20))
                cache[kind] = {
                    int(fields[2]): fields[0]
                    for line in text.splitlines()
                    if len(fields := line.split(":")) > 2 and fields[2].isdigit()
                }
    return (
        cache.get("users", {}).get(uid, str(uid)),
        cache.get("groups", {}).get(gid, str(gid)),
    )


async def _followed(target: door.Target, entry: FileEntry) -> tuple[str, str | None]:
    """The type of what a symlink leads to, and where (E2B's entries say so, the path
    absolute); a link that leads nowhere stays a symlink to its own target."""
    seen = 0
    where = entry.path
    while entry.type == "symlink" and entry.symlink_target is not None and seen < 8:
        where = posixpath.normpath(posixpath.join(posixpath.dirname(where), entry.symlink_target))
        try:
            entry = await target.hosted.handle.files.stat(where)
        except SandboxFileError:
            return "symlink", where
        seen += 1
    return entry.type, where


async def entry_info(target: door.Target, entry: FileEntry) -> pb.EntryInfo:
    owner, group = await _names(target, entry.uid, entry.gid)
    kind, leads_to = entry.type, None
    if entry.type == "symlink":
        kind, leads_to = await _followed(target, entry)
    mode = entry.mode & 0o7777
    return pb.EntryInfo(
        name=entry.name, type=_TYPES.get(kind, pb.FileType.UNSPECIFIED), path=entry.path,
        size=entry.size, mode=mode, permissions=stats.filemode(_KIND_BITS.get(kind, 0) | mode),
        owner=owner, group=group, modified_time=Timestamp.from_datetime(entry.modified),
        symlink_target=leads_to,
    )  # fmt: skip


_TEMPORARY = re.compile(r"^\.(.+)\.agentvm-\d+$")  # the guest's file server's (atomic writes)


class Converter:
    """E2B's events for the guest's, for one watch of ``root``. A write through the
    file server goes to a temporary name renamed over the file: hidden, but for its
    rename, which reads as what envd's in-place write shows (create, write, chmod of
    the file itself); the rename's other half (``move_to`` the file) is dropped."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.renamed: str | None = None  # the file a temporary was just renamed over

    def __call__(self, event: WatchEvent) -> list[pb.FilesystemEvent]:
        name = posixpath.relpath(event.path, self.root)
        temporary = _TEMPORARY.match(posixpath.basename(name))
        if temporary is None:
            if event.type == "move_to" and name == self.renamed:
                self.renamed = None
                return []
            kind = _EVENTS.get(event.type)
            return [] if kind is None else [pb.FilesystemEvent(name=name, type=kind)]
        if event.type != "move_from":
            return []
        real = posixpath.join(posixpath.dirname(name), temporary.group(1)).removeprefix("./")
        self.renamed = real
        kinds = (pb.EventType.CREATE, pb.EventType.WRITE, pb.EventType.CHMOD)
        return [pb.FilesystemEvent(name=real, type=kind) for kind in kinds]


async def _watch(target: door.Target, path: str, recursive: bool) -> AsyncIterator[WatchEvent]:
    """The guest's events under ``path`` (a directory), once its watch is in place."""
    files = target.hosted.handle.files
    if (await files.stat(path)).type != "dir":
        raise ConnectError(Code.INVALID_ARGUMENT, f"path {path} not a directory")
    ready = asyncio.Event()
    if isinstance(files, FileService):  # it says when the guest's watch is in place
        stream = files.watch(path, recursive, ready=ready)
        first = asyncio.ensure_future(anext(stream))
        waiting = asyncio.ensure_future(ready.wait())
        await asyncio.wait({first, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if first.done() and first.exception() is not None:
            raise first.exception()  # type: ignore[misc]
    else:
        stream = files.watch(path, recursive)
        first = asyncio.ensure_future(anext(stream))
        await files.exists(path)  # a round trip after the watch request, and a while
        await asyncio.sleep(0.1)
    return _following(stream, first)


async def _following(
    stream: AsyncIterator[WatchEvent], first: asyncio.Future[WatchEvent]
) -> AsyncIterator[WatchEvent]:
    try:
        while True:
            yield await first
            first = asyncio.ensure_future(anext(stream))
    except StopAsyncIteration:
        return
    finally:
        first.cancel()
        closing = getattr(stream, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing()


async def _translated(
    target: door.Target, root: str, events: AsyncIterator[WatchEvent], with_entry: bool
) -> AsyncIterator[pb.FilesystemEvent]:
    """E2B's events, each with its entry when asked (best effort: where it still is)."""
    convert = Converter(root)
    async for event in events:
        for one in convert(event):
            if with_entry and one.type != pb.EventType.REMOVE:
                with contextlib.suppress(SandboxFileError):
                    found = await target.hosted.handle.files.stat(posixpath.join(root, one.name))
                    one.entry = await entry_info(target, found)
            yield one


class _Watcher:
    def __init__(self, events: AsyncIterator[pb.FilesystemEvent]) -> None:
        self.pending: deque[pb.FilesystemEvent] = deque(maxlen=MAX_PENDING)
        self.failure: ConnectError | None = None
        self.task = asyncio.ensure_future(self._collect(events))

    async def _collect(self, events: AsyncIterator[pb.FilesystemEvent]) -> None:
        try:
            async for event in events:
                self.pending.append(event)
        except Exception as exc:  # the sandbox went: the next poll says so
            self.failure = ConnectError(Code.UNAVAILABLE, f"the watch ended: {exc}")


def _watchers(target: door.Target) -> dict[str, _Watcher]:
    found: dict[str, _Watcher] = target.hosted.door.setdefault("watchers", {})
    return found


class FilesystemService:
    """``filesystem.Filesystem`` (``FilesystemASGIApplication`` serves it)."""

    @rpc_errors
    async def stat(self, request: pb.StatRequest, ctx: RequestContext[Any, Any]) -> pb.StatResponse:
        target = door.current.get()
        entry = await target.hosted.handle.files.stat(target.path(request.path))
        return pb.StatResponse(entry=await entry_info(target, entry))

    @rpc_errors
    async def make_dir(
        self, request: pb.MakeDirRequest, ctx: RequestContext[Any, Any]
    ) -> pb.MakeDirResponse:
        target = door.current.get()
        path = target.path(request.path)
        if not await target.hosted.handle.files.make_dir(path):
            raise ConnectError(Code.ALREADY_EXISTS, f"directory {path} already exists")
        await give(target, [path])
        entry = await target.hosted.handle.files.stat(path)
        return pb.MakeDirResponse(entry=await entry_info(target, entry))

    @rpc_errors
    async def move(self, request: pb.MoveRequest, ctx: RequestContext[Any, Any]) -> pb.MoveResponse:
        target = door.current.get()
        destination = target.path(request.destination)
        await target.hosted.handle.files.rename(target.path(request.source), destination)
        entry = await target.hosted.handle.files.stat(destination)
        return pb.MoveResponse(entry=await entry_info(target, entry))

    @rpc_errors
    async def list_dir(
        self, request: pb.ListDirRequest, ctx: RequestContext[Any, Any]
    ) -> pb.ListDirResponse:
        target = door.current.get()
        path = target.path(request.path)
        if (await target.hosted.handle.files.stat(path)).type != "dir":
            raise ConnectError(Code.INVALID_ARGUMENT, f"path {path} is not a directory")
        entries = await target.hosted.handle.files.list(path, depth=max(1, request.depth))
        entries.sort(key=lambda e: e.path)  # as envd's walk gives them
        return pb.ListDirResponse(entries=[await entry_info(target, e) for e in entries])

    @rpc_errors
    async def remove(
        self, request: pb.RemoveRequest, ctx: RequestContext[Any, Any]
    ) -> pb.RemoveResponse:
        target = door.current.get()
        with contextlib.suppress(SandboxFileNotFoundError):  # gone already: as E2B, fine
            await target.hosted.handle.files.remove(target.path(request.path))
        return pb.RemoveResponse()

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.WatchDirResponse]:
        target = door.current.get()
        path = target.path(request.path)
        async with translated():
            events = await _watch(target, path, request.recursive)
        yield pb.WatchDirResponse(event=Oneof("start", pb.WatchDirResponse.StartEvent()))  # type: ignore[arg-type]
        async for one in _translated(target, path, events, request.include_entry):
            yield pb.WatchDirResponse(event=Oneof("filesystem", one))  # type: ignore[arg-type]

    @rpc_errors
    async def create_watcher(
        self, request: pb.CreateWatcherRequest, ctx: RequestContext[Any, Any]
    ) -> pb.CreateWatcherResponse:
        target = door.current.get()
        watchers = _watchers(target)
        if len(watchers) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} watchers: remove one")
        path = target.path(request.path)
        events = await _watch(target, path, request.recursive)
        watcher_id = secrets.token_hex(8)
        watchers[watcher_id] = _Watcher(_translated(target, path, events, request.include_entry))
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    @rpc_errors
    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: RequestContext[Any, Any]
    ) -> pb.GetWatcherEventsResponse:
        watcher = _watchers(door.current.get()).get(request.watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id} not found")
        await asyncio.sleep(SETTLE_SECONDS)  # what the guest saw just now is on its way
        events = list(watcher.pending)
        watcher.pending.clear()
        if not events and watcher.failure is not None:
            raise watcher.failure
        return pb.GetWatcherEventsResponse(events=events)

    @rpc_errors
    async def remove_watcher(
        self, request: pb.RemoveWatcherRequest, ctx: RequestContext[Any, Any]
    ) -> pb.RemoveWatcherResponse:
        watcher = _watchers(door.current.get()).pop(request.watcher_id, None)
        if watcher is not None:
            watcher.task.cancel()
        return pb.RemoveWatcherResponse()


async def give(target: door.Target, paths: list[str]) -> None:
    """Make what the door wrote for a user that user's (E2B's files belong to the
    user who wrote them; the guest's file server writes as root)."""
    if target.user == "root" or not paths:
        return
    spec = CommandSpec(
        cmd=("chown", "--no-dereference", f"{target.user}:", "--", *paths), user="root", timeout=60
    )
    exit = await door.run_to_end(target, spec)
    if exit is None or exit.exit_code != 0:
        raise ConnectError(Code.INTERNAL, f"could not give {paths[0]} to {target.user}")
