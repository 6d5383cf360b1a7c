"""How the host reaches the guest agent: one interface, two transports.

virtio-serial appears on the host as a unix socket that QEMU listens on; vsock is an
AF_VSOCK address (guest CID, port). Both end up as an asyncio stream pair.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent_vm.protocol.ports import VSOCK_PORT


class Transport(Protocol):
    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class UnixTransport:
    """virtio-serial through the unix socket libvirt created for the channel."""

    path: Path

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.path), limit=1 << 22)

    def describe(self) -> str:
        return f"virtio-serial {self.path}"


@dataclass(frozen=True)
class VsockTransport:
    """AF_VSOCK to the guest's CID (hosts with /dev/vhost-vsock only)."""

    cid: int
    port: int = VSOCK_PORT

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.cid, self.port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=1 << 22)

    def describe(self) -> str:
        return f"vsock cid={self.cid} port={self.port}"
