"""The guest's end of the control channel: a virtio-serial port (or a vsock listener on
hosts that have one). Standard library only.

A port outlives host connections: while no host is connected it reads end-of-file, which
here means "wait", never "the end".
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from agent_vm.guest.files import read_file
from agent_vm.protocol.ports import CHANNEL_NAME, VSOCK_CMDLINE_FLAG, VSOCK_PORT

CHUNK = 64 * 1024
READ_CHUNK = 1 << 20  # from the port: fewer, larger reads for file streams


class Link:
    """Byte stream to the host: ``read`` blocks until bytes arrive, ``write_all`` may block."""

    def read(self) -> bytes | memoryview:
        raise NotImplementedError

    def write_all(self, data: bytes) -> None:
        raise NotImplementedError


class SerialLink(Link):
    """A virtio-serial port. While no host is connected the port polls HUP and reads EOF,
    so we wait instead of treating it as the end."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        # one buffer for every read: allocating (and faulting in) a large bytes object per
        # read costs more than the data under TCG
        self._buffer = bytearray(READ_CHUNK)
        self._view = memoryview(self._buffer)

    def read(self) -> memoryview:
        """The bytes that arrived; valid until the next read (the decoder copies them)."""
        while True:
            count = os.readv(self.fd, [self._buffer])
            if count:
                return self._view[:count]
            time.sleep(0.01)  # EOF: no host connected (clones resume in this state)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


class VsockLink(Link):
    """AF_VSOCK listener; a new host connection replaces the previous one."""

    def __init__(self, port: int = VSOCK_PORT) -> None:
        import socket  # only needed on vsock hosts

        self.server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.server.bind((socket.VMADDR_CID_ANY, port))
        self.server.listen(4)
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()

    def read(self) -> bytes:
        while True:
            conn = self.conn
            if conn is None:
                new, _ = self.server.accept()
                with self._lock:
                    self.conn = new
                continue
            try:
                data = conn.recv(CHUNK)
            except OSError:
                data = b""
            if data:
                return data
            with self._lock:
                if self.conn is conn:
                    self.conn = None
            conn.close()

    def write_all(self, data: bytes) -> None:
        with self._lock:
            conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(data)


def find_serial_port(name: str = CHANNEL_NAME) -> str | None:
    """Without udev there is no /dev/virtio-ports/<name>; the name is in sysfs."""
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        if read_file(f"{base}/{entry}/name").strip() == name:
            return f"/dev/{entry}"
    return None


def open_link(wait: float = 30.0) -> Link:
    deadline = time.monotonic() + wait
    while True:
        path = find_serial_port()
        if path is not None and os.path.exists(path):
            return SerialLink(path)
        if os.path.exists("/dev/vsock") and VSOCK_CMDLINE_FLAG in read_file("/proc/cmdline"):
            return VsockLink()
        if time.monotonic() > deadline:
            raise RuntimeError("no control channel: neither virtio-serial port nor vsock")
        time.sleep(0.02)
