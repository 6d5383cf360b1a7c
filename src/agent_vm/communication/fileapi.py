"""The files API's shape, shared by every way to reach a sandbox's file system: the
types callers get, the ``Files`` base (a backend implements the primitives; reading whole
files, copies and trees are built on them once), and the host-side halves of transfers
(streams saved to a file, host trees as tar, the guest's tar extracted safely).

Nothing here talks to a guest or a server: ``files.py`` implements ``Files`` over the
control channel, ``sandbox/http_files.py`` over an ``agent-vm serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from agent_vm import timeutil
from agent_vm.communication.extract import SafeExtractor
from agent_vm.errors import (
    ConfigError,
    SandboxFileError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
)
from agent_vm.protocol.files import DATA_CHUNK, check_entry

DEFAULT_MAX_READ = 64 << 20  # read() into memory; read_stream()/download() have no cap
DEFAULT_MAX_DOWNLOAD = 10 << 30
DEFAULT_MAX_ENTRIES = 1_000_000
_ERRORS: dict[str, type[SandboxFileError]] = {
    "not_found": SandboxFileNotFoundError,
    "permission_denied": SandboxPermissionError,
    "read_only": SandboxPermissionError,
    "exists": SandboxFileExistsError,
    "not_a_directory": SandboxNotADirectoryError,
    "is_a_directory": SandboxIsADirectoryError,
}


@dataclass(frozen=True)
class FileEntry:
    """A file system entry in the sandbox (``lstat``: a symlink is itself, with target)."""

    path: str
    name: str
    type: str  # file, dir, symlink, fifo, socket, char, block, other
    size: int
    mode: int
    modified: datetime
    uid: int
    gid: int
    symlink_target: str | None = None

    @classmethod
    def from_guest(cls, data: object) -> FileEntry:
        e = check_entry(data)
        return cls(
            e["path"], e["name"], e["type"], e["size"], e["mode"],
            timeutil.from_timestamp(e["mtime"]), e["uid"], e["gid"], e["target"],
        )  # fmt: skip


@dataclass(frozen=True)
class WatchEvent:
    type: str  # create, modify, delete, move_from, move_to, overflow
    path: str
    is_dir: bool


@dataclass(frozen=True)
class DownloadReport:
    """What ``download_dir`` wrote, and what it refused to write (name, reason)."""

    bytes: int
    entries: int
    skipped: list[tuple[str, str]]


def file_error(code: str, message: str, path: str) -> SandboxFileError:
    """The exception for a guest's refusal ``code`` (here, or relayed by a server)."""
    return _ERRORS.get(code, SandboxFileError)(message, code=code, path=path)


WriteData = str | bytes | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]


class Files(ABC):
    """A sandbox's file system (E2B's names). Subclasses implement the primitives; the
    rest is built on them here, once."""

    @abstractmethod
    async def stat(self, path: str) -> FileEntry: ...

    @abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abstractmethod
    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """Create ``path`` and its parents; False if it was already a directory."""

    @abstractmethod
    async def remove(self, path: str) -> None:
        """Remove a file, a symlink (not its target) or a whole directory tree."""

    @abstractmethod
    async def rename(self, old: str, new: str) -> None: ...

    @abstractmethod
    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        """Entries below ``path``, ``depth`` levels deep (1: its children)."""

    @abstractmethod
    def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes as they arrive. A refusal (missing, a directory, ...) is
        raised before the first chunk."""

    @abstractmethod
    async def write(self, path: str, data: WriteData, mode: int | None = None) -> int:
        """Write ``data`` to ``path`` (parents made; replaced atomically); returns bytes."""

    @abstractmethod
    async def untar(self, remote: str, data: WriteData) -> int:
        """A tar stream unpacked by the guest into ``remote`` (made if missing)."""

    @abstractmethod
    def tar_stream(self, remote: str) -> AsyncGenerator[bytes, None]:
        """The guest's tar of ``remote``: untrusted bytes, for ``extract_into``."""

    @abstractmethod
    def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        """Events under ``path`` as the guest's inotify reports them, until the caller
        stops iterating. ``overflow`` means some were lost."""

    async def read(
        self, path: str, format: str = "text", max_bytes: int = DEFAULT_MAX_READ
    ) -> str | bytes:
        """The whole file, as text (UTF-8) or bytes; over ``max_bytes`` is refused (use
        ``read_stream`` or ``download`` for big files)."""
        if format not in ("text", "bytes"):
            raise ConfigError("format must be 'text' or 'bytes' (read_stream() streams)")
        parts: list[bytes] = []
        size = 0
        async for chunk in self.read_stream(path):
            size += len(chunk)
            if size > max_bytes:
                raise SandboxFileError(
                    f"{path} is larger than {max_bytes} bytes",
                    code="too_large", path=path,
                    hint="use read_stream() or download() for big files",
                )  # fmt: skip
            parts.append(chunk)
        data = b"".join(parts)
        return data.decode() if format == "text" else data

    async def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host file into the sandbox, streamed."""
        source = await asyncio.to_thread(Path(local).open, "rb")
        try:
            mode = (await asyncio.to_thread(os.fstat, source.fileno())).st_mode & 0o755
            return await self.write(remote, source, mode=mode)
        finally:
            source.close()

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """A sandbox file onto the host, streamed; written to a temporary name first."""
        return await save_stream(self.read_stream(remote), local)

    async def upload_dir(self, local: str | os.PathLike[str], remote: str) -> int:
        """A host directory into ``remote`` (made if missing), as a tar stream; symlinks
        stay symlinks; files belong to root in the sandbox. Returns bytes sent."""
        source = Path(local)
        if not await asyncio.to_thread(source.is_dir):
            raise ConfigError(f"{source} is not a directory")
        return await self.untar(remote, tar_of(source))

    async def download_dir(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> DownloadReport:
        """A sandbox directory into ``local`` through ``SafeExtractor``: nothing is written
        outside ``local``, no link is followed, no device or FIFO made, no setuid bit
        kept; past a cap it stops with ExtractionError."""
        return await extract_into(
            self.tar_stream(remote), local, max_bytes=max_bytes, max_entries=max_entries
        )


async def save_stream(chunks: AsyncIterator[bytes], local: str | os.PathLike[str]) -> int:
    """Bytes onto a host file, under a temporary name until complete (a failed transfer
    leaves no partial file); returns the bytes written."""
    target = Path(local)
    temporary = target.with_name(f".{target.name}.agentvm-part")
    total = 0
    try:
        with temporary.open("wb") as out:
            async for chunk in chunks:
                await asyncio.to_thread(out.write, chunk)
                total += len(chunk)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
    return total


async def chunks_of(data: WriteData) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), DATA_CHUNK):
            yield bytes(view[start : start + DATA_CHUNK])
    elif hasattr(data, "read"):
        while chunk := await asyncio.to_thread(data.read, DATA_CHUNK):
            yield chunk
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            yield chunk
    else:
        for chunk in data:  # a blocking caller's iterable (the sync API's)
            yield bytes(chunk)


def _tar_to(source: Path, fd: int) -> None:
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with (
        os.fdopen(fd, "wb", buffering=DATA_CHUNK) as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, recursive=True, filter=as_root)


async def tar_of(source: Path) -> AsyncGenerator[bytes, None]:
    """A host directory as a tar stream, made in a thread as it is read."""
    read_fd, write_fd = os.pipe()
    producer = asyncio.create_task(asyncio.to_thread(_tar_to, source, write_fd))
    try:
        while chunk := await asyncio.to_thread(os.read, read_fd, DATA_CHUNK):
            yield chunk
        await producer
    finally:
        os.close(read_fd)  # a producer still writing fails fast
        with contextlib.suppress(BaseException):
            await producer


async def extract_into(
    chunks: AsyncGenerator[bytes, None],
    local: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> DownloadReport:
    """Untrusted tar bytes (a guest's, or a server's) written below ``local`` by
    ``SafeExtractor`` in a thread; a cap it hits stops the stream and raises."""
    read_fd, write_fd = os.pipe()
    extractor = SafeExtractor(os.fspath(local), max_bytes, max_entries)
    reader = os.fdopen(read_fd, "rb", buffering=DATA_CHUNK)
    consumer = asyncio.create_task(asyncio.to_thread(_extract_from, extractor, reader))
    writer_open = True
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if consumer.done():
                    break  # the extractor stopped (a cap): its error is raised below
                try:
                    await asyncio.to_thread(_write_all, write_fd, chunk)
                except BrokenPipeError:
                    break  # likewise
            os.close(write_fd)
            writer_open = False
            await consumer
        return DownloadReport(extractor.written_bytes, extractor.entries, extractor.skipped)
    finally:
        if writer_open:
            os.close(write_fd)
        with contextlib.suppress(BaseException):
            await consumer
        reader.close()
        extractor.close()


def _extract_from(extractor: SafeExtractor, reader: IO[bytes]) -> None:
    try:
        extractor.extract(reader)
    finally:
        reader.close()  # the writer then fails fast instead of blocking on a full pipe


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
