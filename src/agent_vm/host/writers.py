"""Stopping writes through descriptors a process already holds (a quota's last resort).

A read-only mount stops new opens, not a file QEMU opened for writing before: a guest
could keep one file open and grow it forever. Setting the inode's immutable flag makes
every further write to it fail (``EPERM``, also through open descriptors) until the flag
is cleared. Only files the process has open for writing below a given directory are
touched, and their previous flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010


def open_for_writing(pid: int, below: Path) -> list[Path]:
    """``/proc/<pid>/fd/N`` links of regular files ``pid`` has open for writing whose path
    (as that process sees it) is below ``below``."""
    prefix = str(below).rstrip("/") + "/"
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for link in fd_dir.iterdir():
            try:
                target = str(link.readlink())
                flags = _fdinfo_flags(pid, link.name)
            except (OSError, ValueError):
                continue
            if target.startswith(prefix) and flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.append(link)
    return found


def _fdinfo_flags(pid: int, fd: str) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise ValueError("no flags")


@dataclass(frozen=True)
class Frozen:
    """A file made immutable; ``fd`` stays open so that thawing needs no path lookup in a
    tree the guest controls."""

    fd: int
    previous: int
    inode: tuple[int, int]

    def thaw(self) -> None:
        with contextlib.suppress(OSError):
            _set(self.fd, self.previous)
        os.close(self.fd)


def freeze(link: Path) -> Frozen | None:
    """Make the file behind ``link`` immutable; None when it is not a regular file or its
    file system cannot."""
    try:
        fd = os.open(link, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file")
        previous = _get(fd)
        if not previous & FS_IMMUTABLE_FL:
            _set(fd, previous | FS_IMMUTABLE_FL)
        return Frozen(fd, previous, (info.st_dev, info.st_ino))
    except OSError:
        os.close(fd)
        return None


def inode_of(link: Path) -> tuple[int, int] | None:
    try:
        info = link.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _get(fd: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
    return value


def _set(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
