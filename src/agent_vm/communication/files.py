"""The files API over the control channel (``Files`` implemented on a guest agent):
streamed, bounded both ways.

Everything the guest sends back is checked (``protocol/files.py``); big content is
streamed with credits so that a 1 GB file never sits in memory on either side; the
guest's refusals become exceptions a caller can catch by kind (``SandboxFileNotFoundError``
is also a ``FileNotFoundError``, and so on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.fileapi import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_READ,
    DownloadReport,
    FileEntry,
    Files,
    WatchEvent,
    WriteData,
    chunks_of,
    extract_into,
    file_error,
    save_stream,
    tar_of,
)
from agent_vm.communication.streams import FileStream
from agent_vm.errors import AgentRefusedError, ProtocolError, SandboxFileError
from agent_vm.protocol.files import FileRequest

__all__ = [
    "DEFAULT_MAX_DOWNLOAD",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_READ",
    "DownloadReport",
    "FileEntry",
    "FileService",
    "WatchEvent",
    "extract_into",
    "file_error",
    "save_stream",
    "tar_of",
]

_T = TypeVar("_T")
MAX_LINE = 64 * 1024


Channel = Callable[[], Awaitable[AgentChannel]]
Staging = Callable[[], Awaitable[Path | None]]
BULK_OPS = frozenset({"read", "write", "tar", "untar"})


WATCH_READY_WAIT = 2.0  # a guest that does not say when its watch is in place


class FileService(Files):
    """File operations on one sandbox; ``channel`` returns its (re)connected channel,
    ``staging`` its bulk lane (None: bytes go through the channel itself)."""

    def __init__(self, channel: Channel, staging: Staging | None = None) -> None:
        self._channel = channel
        self._staging = staging

    # ------------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _request(self, request: FileRequest) -> AsyncIterator[FileStream]:
        channel = await self._channel()
        staging = None
        if request.op in BULK_OPS and self._staging is not None and not _pseudo(request.path):
            staging = await self._staging()
            request.staged = staging is not None
        stream = await channel.file_request(request, staging)
        try:
            yield stream
        except AgentRefusedError as exc:
            raise _mapped(exc, request.path) from None
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.cancel()
            raise
        finally:
            channel.forget(stream)

    async def _simple(self, request: FileRequest) -> object:
        async with self._request(request) as stream:
            return await stream.result()

    # ------------------------------------------------------------------ small operations

    async def stat(self, path: str) -> FileEntry:
        return FileEntry.from_guest(await self._simple(FileRequest("stat", path)))

    async def exists(self, path: str) -> bool:
        return _expect(await self._simple(FileRequest("exists", path)), bool)

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """Create ``path`` and its parents; False if it was already a directory."""
        return _expect(await self._simple(FileRequest("make_dir", path, mode=mode)), bool)

    async def remove(self, path: str) -> None:
        """Remove a file, a symlink (not its target) or a whole directory tree."""
        await self._simple(FileRequest("remove", path))

    async def rename(self, old: str, new: str) -> None:
        await self._simple(FileRequest("rename", old, to=new))

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        """Entries below ``path``, ``depth`` levels deep (1: its children)."""
        entries: list[FileEntry] = []
        async with self._request(FileRequest("list", path, depth=depth)) as stream:
            pending = b""
            async for chunk in stream.chunks():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE:
                    raise ProtocolError("list: an entry longer than 64 KiB")
                for line in lines:
                    entries.append(FileEntry.from_guest(_json(line)))
            await stream.result()
        return entries

    # ------------------------------------------------------------------ content

    async def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes as they arrive (memory stays within the credit window)."""
        async with self._request(FileRequest("read", path)) as stream:
            async for chunk in stream.chunks():
                yield chunk
            await stream.result()

    async def write(
        self,
        path: str,
        data: WriteData,
        mode: int | None = None,
    ) -> int:
        """Write ``data`` to ``path`` (parents made; replaced atomically); returns bytes."""
        async with self._request(FileRequest("write", path, mode=mode)) as stream:
            async for chunk in chunks_of(data):
                await stream.send(chunk)
            await stream.end()
            return _expect(await stream.result(), int)

    # ------------------------------------------------------------------ trees

    async def untar(self, remote: str, data: WriteData) -> int:
        """A tar stream (made from the host's files, or an HTTP body) unpacked by the
        guest into ``remote`` (made if missing). Returns the bytes sent."""
        async with self._request(FileRequest("untar", remote)) as stream:
            async for chunk in chunks_of(data):
                await stream.send(chunk)
            await stream.end()
            return _expect(await stream.result(), int)

    async def tar_stream(self, remote: str) -> AsyncGenerator[bytes, None]:
        """The guest's tar of ``remote``, as it arrives: untrusted bytes, for
        ``extract_into`` (or a client that extracts them as safely)."""
        async with self._request(FileRequest("tar", remote)) as stream:
            async for chunk in stream.chunks():
                yield chunk
            await stream.result()

    # ------------------------------------------------------------------ events

    async def watch(
        self, path: str, recursive: bool = False, ready: asyncio.Event | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Events under ``path`` as the guest's inotify reports them, until the caller
        stops iterating. ``overflow`` means some were lost. ``ready`` is set once the
        guest's watch is in place (what happens after it is seen; a guest too old to say
        so is given ``WATCH_READY_WAIT``)."""
        async with self._request(FileRequest("watch", path, recursive=recursive)) as stream:
            try:
                if ready is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stream.watching.wait(), WATCH_READY_WAIT)
                    ready.set()
                async for kind, where, is_dir in stream.events():
                    yield WatchEvent(kind, where, is_dir)
            finally:
                with contextlib.suppress(Exception):
                    await stream.cancel()


def _pseudo(path: str) -> bool:
    """A kernel's file (/proc, /sys): small, and a staged read asks it for a segment at
    once, which /proc/sys refuses (ENOMEM for reads of 4 MiB): through the channel."""
    return path.startswith(("/proc/", "/sys/"))


def _mapped(exc: AgentRefusedError, path: str) -> SandboxFileError:
    return file_error(exc.code, exc.detail or exc.message, path)


def _expect(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"guest answered {type(value).__name__}, expected {kind.__name__}")
    return value


def _json(line: bytes) -> object:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"list: not JSON: {exc}") from exc
