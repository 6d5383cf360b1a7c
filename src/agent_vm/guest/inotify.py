"""inotify for ``watch``, through ctypes (standard library only).

Events are read in batches and reported as (type, path, is_dir); a recursive watch adds
directories created later. The kernel's queue overflowing is reported as one
``overflow`` event: the host then knows it missed some.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x40, 0x80, 0x100, 0x200
IN_Q_OVERFLOW, IN_ISDIR = 0x4000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
HEADER = struct.Struct("iIII")
MAX_WATCHES = 8192


class Watcher:
    def __init__(self, path: str, recursive: bool) -> None:
        self.root = path
        self.recursive = recursive
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.paths: dict[int, str] = {}
        if not os.path.isdir(path):
            os.lstat(path)  # not_found when missing
            os.close(self.fd)
            raise NotADirectoryError(20, "not a directory", path)
        self._add(path)
        if recursive:
            for directory, subdirs, _files in os.walk(path):
                for name in subdirs:
                    self._add(os.path.join(directory, name))

    def _add(self, path: str) -> None:
        if len(self.paths) >= MAX_WATCHES:
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd >= 0:
            self.paths[wd] = path

    def read(self, timeout: float) -> list[dict[str, Any]]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events: list[dict[str, Any]] = []
        offset = 0
        while offset + HEADER.size <= len(data):
            wd, mask, _cookie, length = HEADER.unpack_from(data, offset)
            raw = data[offset + HEADER.size : offset + HEADER.size + length]
            offset += HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                events.append({"type": "overflow", "path": self.root, "is_dir": True})
                continue
            base = self.paths.get(wd)
            if base is None:
                continue
            name = raw.split(b"\0", 1)[0].decode(errors="surrogateescape")
            path = os.path.join(base, name) if name else base
            is_dir = bool(mask & IN_ISDIR)
            kind = (
                "create" if mask & IN_CREATE else "delete" if mask & IN_DELETE
                else "move_from" if mask & IN_MOVED_FROM else "move_to" if mask & IN_MOVED_TO
                else "modify"
            )  # fmt: skip
            if self.recursive and is_dir and kind in ("create", "move_to"):
                self._add(path)
            event = {"type": kind, "path": path, "is_dir": is_dir}
            if kind != "modify" or not events or events[-1] != event:  # one per write burst
                events.append(event)
        return events

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
