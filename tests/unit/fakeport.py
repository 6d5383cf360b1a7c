"""A virtio-serial port in one process: the real guest agent on one side, the real host
channel on the other, no VM.

It behaves as the port does for the agent: one byte stream that outlives host
connections. Each ``open()`` (a host connecting) replaces the previous connection, which
sees end-of-file. Bytes the agent writes while no host is connected are kept and handed
to the next connection first (the worst case for stale data, which the session handshake
must make harmless). Writes block while the host does not read: backpressure is real.
"""

from __future__ import annotations

import asyncio
import socket
import threading

from agent_vm.guest import cgroups
from agent_vm.guest.agent import Agent, Link


class FakePort(Link):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._guest_end: socket.socket | None = None
        self._pending = bytearray()
        self.connections = 0

    # ------------------------------------------------------------ the agent's side (Link)

    def read(self) -> bytes:
        while True:
            with self._cond:
                while self._guest_end is None:
                    self._cond.wait()
                sock = self._guest_end
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                return data
            with self._cond:  # that host went away: wait for the next one
                if self._guest_end is sock:
                    self._guest_end = None
            sock.close()

    def write_all(self, data: bytes) -> None:
        with self._cond:
            sock = self._guest_end
            if sock is None:
                self._pending += data
                return
        try:
            sock.sendall(data)
        except OSError:
            with self._cond:
                self._pending += data

    # ------------------------------------------------------------ the host's side (Transport)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, guest = socket.socketpair()
        with self._cond:
            old, self._guest_end = self._guest_end, guest
            pending, self._pending = bytes(self._pending), bytearray()
            self.connections += 1
            self._cond.notify_all()
        if old is not None:
            old.shutdown(socket.SHUT_RDWR)  # the previous host sees EOF
        if pending:
            guest.sendall(pending)
        host.setblocking(False)
        return await asyncio.open_unix_connection(sock=host, limit=1 << 22)

    def describe(self) -> str:
        return "in-process fake port"

    def disconnect(self) -> None:
        """The host end goes away (as when QEMU's socket client closes)."""
        with self._cond:
            sock, self._guest_end = self._guest_end, None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


class Shutdowns:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def start_agent(port: FakePort) -> Agent:
    """The real guest agent serving ``port`` in a daemon thread. Commands run on this
    host, as this user, without per-command cgroups (they would move the test process)."""
    agent = Agent(port)
    cgroups.disable()
    agent.on_shutdown = Shutdowns()
    threading.Thread(target=agent.serve_forever, name="fake-guest-agent", daemon=True).start()
    return agent
