"""The pieces of file operations in the guest that are not an operation's own logic:
errno to refusal codes, the entries ``stat`` and ``list`` send, the bulk lane's segments,
and the file objects ``tarfile`` reads from and writes to. Standard library only."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from agent_vm.protocol.files import Segment, read_segment
from agent_vm.protocol.ports import SHARE_STAGING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Sender(Protocol):
        unit: int

        def send_data(self, data: bytes) -> None: ...


ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EEXIST: "exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EROFS: "read_only",
    errno.ELOOP: "not_found",
}


class Failed(Exception):
    """An operation's failure as the host sees it: ERROR with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Cancelled(Exception):
    pass


def entry(path: str, st: os.stat_result, name: str | None = None) -> dict[str, Any]:
    mode = st.st_mode
    kind = (
        "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode)
        else "symlink" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode)
        else "socket" if stat.S_ISSOCK(mode) else "char" if stat.S_ISCHR(mode)
        else "block" if stat.S_ISBLK(mode) else "other"
    )  # fmt: skip
    target = None
    if kind == "symlink":
        with contextlib.suppress(OSError):
            target = os.readlink(path)
    return {
        "path": path,
        "name": name if name is not None else os.path.basename(path.rstrip("/")) or "/",
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "target": target,
    }


def staging(name: str) -> str:
    from agent_vm.guest.workspace import SHARE_MOUNT

    return f"{SHARE_MOUNT}/{SHARE_STAGING}/{name}"


def take(segment: Segment) -> bytes:
    """The host's segment, read and removed (it wrote exactly ``segment.bytes``)."""
    path = staging(segment.name)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = read_segment(fd, segment)
    finally:
        os.close(fd)
    os.unlink(path)
    return data


class Writer:
    """A file object for tarfile that sends what it is given as DATA frames."""

    def __init__(self, op: Sender) -> None:
        self.op = op
        self.buffer = bytearray()
        self.total = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= self.op.unit:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.total += len(self.buffer)
            self.op.send_data(bytes(self.buffer))
            self.buffer.clear()


class Reader:
    """A file object for tarfile over the host's DATA chunks (no re-copying of chunks)."""

    def __init__(self, chunks: Any) -> None:
        self.chunks = chunks
        self.current = b""
        self.position = 0
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size != 0:
            if self.position >= len(self.current):
                data = next(self.chunks, None)
                if data is None:
                    break
                self.current, self.position = data, 0
                self.total += len(data)
            left = len(self.current) - self.position
            take = left if size < 0 else min(size, left)
            parts.append(self.current[self.position : self.position + take])
            self.position += take
            if size > 0:
                size -= take
        return b"".join(parts)

    def rest(self) -> Any:
        for data in self.chunks:
            self.total += len(data)
            yield data
