"""A sandbox's file system (``sandbox.files``): E2B's names over the backend's ``Files``.

Part of the one implementation; ``_sync_files.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import IO

from agent_vm.communication.fileapi import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_ENTRIES,
    DownloadReport,
    FileEntry,
    WatchEvent,
)
from agent_vm.communication.fileapi import Files as FileSystem
from agent_vm.sandbox.base import SandboxHandle

Live = Callable[[], SandboxHandle]
Wake = Callable[[], Awaitable[None]]


async def _awake() -> None:
    return None


class AsyncFiles:
    """``sandbox.files``: the sandbox's file system (E2B's names), streamed both ways
    with bounded memory. A missing path raises ``SandboxFileNotFoundError`` (also a
    ``FileNotFoundError``), a directory where a file is expected
    ``SandboxIsADirectoryError``, a refused one ``SandboxPermissionError``: each names
    the path."""

    def __init__(self, live: Live, wake: Wake = _awake) -> None:
        self._live = live
        self._wake = wake  # resumes a paused sandbox first when asked to (auto_resume)

    def _files(self) -> FileSystem:
        return self._live().files

    async def read(self, path: str, format: str = "text") -> str | bytes:
        """The whole file as text (``format="text"``) or bytes (``"bytes"``), up to 64 MiB;
        ``read_stream`` or ``download`` for bigger ones."""
        await self._wake()
        return await self._files().read(path, format)

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks as they arrive."""
        await self._wake()
        async for chunk in self._files().read_stream(path):
            yield chunk

    async def write(
        self,
        path: str,
        data: str | bytes | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes],
        mode: int | None = None,
    ) -> int:
        """Write ``data`` (text, bytes, a binary file object, or an iterable of bytes:
        async or not) to ``path``, parents made, replaced atomically; returns the bytes written."""
        await self._wake()
        return await self._files().write(path, data, mode)

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        """Entries below ``path``, ``depth`` levels deep."""
        await self._wake()
        return await self._files().list(path, depth)

    async def stat(self, path: str) -> FileEntry:
        await self._wake()
        return await self._files().stat(path)

    async def exists(self, path: str) -> bool:
        await self._wake()
        return await self._files().exists(path)

    async def make_dir(self, path: str) -> bool:
        """Create ``path`` with its parents; False when it already was a directory."""
        await self._wake()
        return await self._files().make_dir(path)

    async def remove(self, path: str) -> None:
        """Remove a file, a link, or a directory with everything in it."""
        await self._wake()
        await self._files().remove(path)

    async def rename(self, old_path: str, new_path: str) -> None:
        await self._wake()
        await self._files().rename(old_path, new_path)

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        """Events under ``path`` (create, modify, delete, ...) as the guest's inotify
        reports them, for as long as the caller iterates."""
        await self._wake()
        async for event in self._files().watch(path, recursive):
            yield event

    async def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host file into the sandbox."""
        await self._wake()
        return await self._files().upload(local, remote)

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """A sandbox file onto the host."""
        await self._wake()
        return await self._files().download(remote, local)

    async def upload_dir(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host directory into the sandbox (a tar stream)."""
        await self._wake()
        return await self._files().upload_dir(local, remote)

    async def download_dir(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> DownloadReport:
        """A sandbox directory onto the host, safely: nothing outside ``local`` is read or
        written, links are not followed, devices, FIFOs and setuid bits never appear;
        past a cap it stops with ``ExtractionError``."""
        await self._wake()
        return await self._files().download_dir(
            remote, local, max_bytes=max_bytes, max_entries=max_entries
        )
